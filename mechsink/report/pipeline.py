"""The whole analysis, end to end, as one reproducible report (``mechsink demo`` / ``mechsink report``).

For the main model: sink detection and per-layer norms, norm-vs-attention statistics, an
activation cache with linear probes, sinks-vs-matched-random ablation, a patching sweep,
sink-only / non-sink-only input per question type and sink-to-the-front. For the control model
(by default ``planted-llava``, whose answer provably runs through its sinks) the detection and
causal sections again, so a reader sees what a real effect looks like next to the main result.

Everything that shapes a number is in ``ReportConfig``; the manifest stores it, so
``mechsink report --from manifest.json`` re-runs the same analysis and checks the numbers.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..errors import MechsinkError

log = logging.getLogger("mechsink")

MAIN_SECTIONS = ("detection", "attention", "probes", "ablation", "patching", "subsets", "reorder")
CONTROL_SECTIONS = ("detection", "attention", "probes", "ablation", "patching")
# Image-level labels worth probing, by bundled dataset (the first present ones are used).
PROBE_LABELS = ("planted_label", "majority_class", "n_items", "top_left", "folder")


@dataclass(frozen=True)
class ReportConfig(Config):
    model: str = "toy-llava"
    data: str | None = None                    # default: the model's bundled evaluation set
    control: str | None = "planted-llava"      # positive control for the causal sections; None to skip
    control_data: str | None = None
    limit: int = 240                           # samples for detection, probes, subsets, reorder
    causal_limit: int = 96                     # samples for ablation and patching
    attention_limit: int = 64
    draws: int = 16                            # random control draws per sample
    seed: int = 0
    sinks: dict | None = None                  # mechsink.sinks.SinkSpec.to_dict(); None = the default rule
    fallback_topk: int = 3                     # when the rule finds no sinks: top-k norm tokens, labelled as such
    probe_labels: tuple[str, ...] | None = None
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None                   # e.g. "bfloat16" for 7B models on a GPU
    device_map: str | None = None              # "auto" spreads a large model over the GPUs
    title: str | None = None

    def __post_init__(self):
        if self.probe_labels is not None:
            object.__setattr__(self, "probe_labels", tuple(self.probe_labels))


@dataclass
class _Ctx:
    """What one model's sections share."""
    key: str                 # prefix of its numbers in the manifest
    model: Any
    data: Any                # mechsink.data.Dataset
    spec: Any                # the SinkSpec the user asked for
    causal_spec: Any = None  # the spec the causal sections use (the fallback when no sinks exist)
    fallback: bool = False
    work: Path = Path(".")
    notes: list[str] = field(default_factory=list)


def run_report(config: ReportConfig, out: str | os.PathLike = "mechsink-report", *, sections=None,
               control_sections=None) -> Path:
    """Run the pipeline and write ``out/index.html`` + ``out/manifest.json``; returns index.html."""
    from .. import __version__
    from .html import Report
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    t0 = time.perf_counter()
    main = _context(config.model, config.data, config, work, "main")
    rep = Report(config.title or f"mechsink report: {main.model.name}", config=config.to_dict(),
                 seeds={"seed": config.seed}, models={}, data={})
    rep.text(f"mechsink {__version__}. Model **{main.model.name}** ({main.model.adapter.family}) on "
             f"**{main.data.name}** ({len(main.data)} samples). Every number below is also in `manifest.json`; "
             f"`mechsink report --from manifest.json` re-runs this analysis.")
    _register(rep, main)
    _overview(rep, main)
    run_sections(rep, main, config, sections or MAIN_SECTIONS)
    if config.control:
        ctl = _context(config.control, config.control_data, config, work, "control")
        _register(rep, ctl)
        rep.section(f"Positive control: {ctl.model.name}",
                    "A model whose answer is known to run through its sinks (planted by the weights). The same "
                    "sections on it show what a real sink effect looks like next to the main model's result.")
        run_sections(rep, ctl, config, control_sections or CONTROL_SECTIONS)
    rep.section("Run")
    rep.text(f"Finished in {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU thread(s)"
             f"{' / ' + str(main.model.device) if main.model.device.type != 'cpu' else ''}.")
    return rep.write(out)


def run_sections(rep, ctx: _Ctx, config: ReportConfig, sections) -> None:
    from tqdm.auto import tqdm
    table = {"detection": _detection, "attention": _attention, "probes": _probes, "ablation": _ablation,
             "patching": _patching, "subsets": _subsets, "reorder": _reorder}
    bad = set(sections) - set(table)
    if bad:
        raise MechsinkError(f"unknown report section(s) {sorted(bad)}; sections: {', '.join(table)}")
    for name in tqdm(list(sections), desc=f"report {ctx.model.name}", unit="section"):
        log.info("%s: %s", ctx.model.name, name)
        table[name](rep, ctx, config)


# -- set-up -----------------------------------------------------------------------------------------
def _context(name: str, data: str | None, config: ReportConfig, work: Path, key: str) -> _Ctx:
    from .. import load
    from ..data import default_data, open_dataset
    from ..sinks import SinkSpec
    model = load(name, device=None if config.device_map else config.device, dtype=config.dtype,
                 device_map=config.device_map)
    ds = open_dataset(data or default_data(Path(name).name if Path(name).is_dir() else name))
    spec = SinkSpec.from_dict(config.sinks) if config.sinks else SinkSpec()
    return _Ctx(key=key, model=model, data=ds, spec=spec, causal_spec=spec, work=work / key)


def _register(rep, ctx: _Ctx) -> None:
    from .manifest import hash_directory
    src = ctx.model.source
    rep.models[ctx.model.name] = {"source": src, "sha256": hash_directory(src)} if Path(str(src)).is_dir() else {"source": src}
    rep.data[ctx.data.name] = ctx.data.fingerprint()


def _subset(ctx: _Ctx, n: int):
    return ctx.data[:min(n, len(ctx.data))]


def _overview(rep, ctx: _Ctx) -> None:
    m = ctx.model
    rep.section("Model and data")
    rep.table(pd.DataFrame([{"model": m.name, "family": m.adapter.family, "ViT blocks": m.n_vit_layers,
                             "LLM blocks": m.n_llm_layers, "parameters": sum(p.numel() for p in m.hf.parameters()),
                             "dataset": ctx.data.name, "samples": len(ctx.data)}]), index=False)
    metrics = Path(str(m.source)) / "metrics.json"
    if metrics.is_file():   # the bundled toy model ships its measured accuracy
        per = json.loads(metrics.read_text()).get("by_type", {})
        rows = [{"question type": k, "accuracy": v["accuracy"], "majority baseline": v.get("majority_baseline"),
                 "n": v.get("n")} for k, v in per.items()]
        if rows:
            rep.text("Accuracy of the model on its full evaluation set (`metrics.json`, measured when it was trained):")
            rep.table(pd.DataFrame(rows), index=False)
            for r in rows:
                _num(rep, f"{ctx.key}.model.accuracy.{r['question type']}", r["accuracy"])


# -- sections ---------------------------------------------------------------------------------------
def _num(rep, key: str, value) -> None:
    """Record a number under a manifest key made of dotted words."""
    rep.number(key, value)


def _part(label) -> str:
    """One word of a manifest key from a label of the data (a question type, a condition): kept
    as it is when it is a plain word, else a readable slug plus a hash of the label, so that two
    labels never share a key ("颜色" and "形状", "x y" and "x_y"); the label itself stays in the tables."""
    import hashlib
    text = str(label)
    if re.fullmatch(r"[A-Za-z0-9_\-]+", text):
        return text
    slug = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_") or "label"
    return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _detection(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..sinks import SinkSpec, detect_dataset
    from ..sinks.norms import NormConfig
    from .figures import norm_histogram, norm_profile_figure
    m, spec = ctx.model, ctx.spec
    rep.section(f"Sink detection ({m.name})")
    sinks = detect_dataset(m, _subset(ctx, config.limit), spec, batch_size=config.batch_size, progress="detect",
                           norms=NormConfig())
    pat = sinks.patches
    s = sinks.summary()
    rep.text(f"Rule: `{spec.rule}` at `{spec.site}` with {json.dumps(spec.params)} "
             f"(score `{spec.score}`, judged per {spec.per}). {s['images']} images.")
    for k in ("images", "images_with_sinks", "mean_per_image", "fraction_of_tokens"):
        _num(rep, f"{ctx.key}.sinks.{k}", s[k])
    rel = pat["norm"] / pat.groupby(["sample", "image", "tile"])["norm"].transform("median")
    fig = norm_histogram(rel, threshold=spec.params.get("ratio") if spec.rule in ("relative", "ratio") else None,
                         title=f"{m.name}: norm / image median at {spec.site}", xlabel="norm / median norm of the image")
    rep.figure(fig, "Token norms relative to their image's median (sinks sit far right).")
    stats = sinks.norms.table().rename(columns={"median_max_over_median": "median max/median norm",
                                                "frac_images_with_outlier": "images with a token > 3x median"})
    rep.table(stats, "Per ViT layer: how far the largest token norm stands out (natural high-norm tokens).", index=False)
    for r in stats.itertuples(index=False):
        _num(rep, f"{ctx.key}.norms.layer{r.layer}.max_over_median", r[1])
        _num(rep, f"{ctx.key}.norms.layer{r.layer}.frac_images_gt3x", r[2])
    rep.figure(norm_profile_figure(sinks.norms, title=f"{m.name}: outlier norms by layer"),
               "Largest token norm over the image median, per ViT layer (3x dotted).")
    if pat["is_sink"].any():
        grid = pat[pat["is_sink"]].groupby(["row", "col"]).size().reset_index(name="count")
        rep.table(grid.sort_values("count", ascending=False).head(10), "Where sinks sit (most frequent cells).",
                  index=False)
    else:
        k = config.fallback_topk
        ctx.fallback = True
        ctx.causal_spec = SinkSpec(site=spec.site, rule="topk", params={"k": k}, per=spec.per)
        rep.text(f"**No sinks under this rule.** The causal sections below therefore use the **top-{k} highest-norm "
                 f"tokens** of each image (rule `topk`), clearly not sinks: they test whether the largest-norm "
                 f"tokens matter more than matched random ones.")
    _num(rep, f"{ctx.key}.sinks.causal_rule_is_fallback", int(ctx.fallback))


def _token_word(ctx: _Ctx) -> str:
    return f"top-{ctx.causal_spec.params['k']} norm tokens" if ctx.fallback else "sinks"


def _attention(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..sinks.attention import AttentionConfig, attention_stats
    from .figures import binned_bar
    m = ctx.model
    rep.section(f"Norms and LLM attention ({m.name})")
    stats = attention_stats(m, _subset(ctx, config.attention_limit), ctx.causal_spec,
                            AttentionConfig(batch_size=config.batch_size, seed=config.seed), progress="attention")
    bins = stats.bins()
    rep.figure(binned_bar(bins.assign(layer=bins["layer"].astype(str)), x="bin", y="attn_mean", hue="layer",
                          title=f"{m.name}: attention received by ViT-norm bin", ylabel="mean attention received",
                          xlabel="ViT norm quartile"),
               "Attention each visual token receives from the text/answer tokens, by ViT-norm quartile and LLM layer.")
    ratio = stats.ratio()
    rep.table(ratio, f"Mean attention to {_token_word(ctx)} / to the other visual tokens (95 % bootstrap CI over images).",
              index=False)
    for r in ratio.itertuples(index=False):
        _num(rep, f"{ctx.key}.attention.layer{r.layer}.ratio", r.ratio)
        _num(rep, f"{ctx.key}.attention.layer{r.layer}.ci_low", r.ci_low)
        _num(rep, f"{ctx.key}.attention.layer{r.layer}.ci_high", r.ci_high)


def _probes(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..cache.extract import extract
    from ..probing import ProbeConfig, probe
    from .figures import probe_figure
    m = ctx.model
    rep.section(f"Linear probes ({m.name})")
    data = _subset(ctx, config.limit)
    labels = config.probe_labels or [c for c in PROBE_LABELS if c in data.label_columns()][:2]
    if not labels:
        rep.text("The dataset has no image-level label column to probe.")
        return
    mid = max(0, m.n_vit_layers // 2 - 1)
    sites = list(dict.fromkeys([f"vit.blocks.{mid}.hook_resid_post", "vit.out", "proj.out"]))
    store = extract(m, data, sites=sites, tokens=("image", "cls"), out=ctx.work / "cache", store_dtype="float32",
                    batch_size=config.batch_size, sinks=ctx.causal_spec, progress=True)
    rep.text(f"Cache: {len(store.index)} token rows at {', '.join(f'`{s}`' for s in sites)} "
             f"(token sets: {_token_word(ctx)}, the other patches, CLS, mean-pooled patches).")
    for label in labels:
        res = probe(store, ProbeConfig(label=label, seed=config.seed, n_boot=500))
        f = res.frame
        cols = ["token_set", "site", "accuracy", "ci_low", "ci_high", "control_accuracy", "selectivity", "majority"]
        rep.table(f[[c for c in cols if c in f]], f"Probe for `{label}` (balanced accuracy, images never split "
                                                  f"across folds; control = shuffled labels).", index=False)
        rep.figure(probe_figure(res, title=f"{m.name}: probing {label}"))
        for r in f.itertuples(index=False):
            key = f"{ctx.key}.probe.{_part(label)}.{r.token_set}.{r.site}"
            _num(rep, f"{key}.accuracy", r.accuracy)
            _num(rep, f"{key}.control", r.control_accuracy)


def _ablation(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..ablation import AblationConfig, ablate
    from ..selection import contrast_foreground
    from .figures import ablation_figure
    m = ctx.model
    rep.section(f"Ablation: {_token_word(ctx)} vs matched random tokens ({m.name})")
    # Controls matched on count and on foreground/background: high-norm tokens often sit on objects,
    # and object tokens matter more than background ones whether or not they are sinks.
    cfg = AblationConfig(site="proj.out", mode="zero", metric="logprob", n_draws=config.draws, seed=config.seed,
                         batch_size=config.batch_size, match=("foreground",))
    res = ablate(m, _subset(ctx, config.causal_limit), cfg, sinks=ctx.causal_spec, foreground=contrast_foreground(),
                 progress=True)
    d = res.to_dict()
    rep.text(f"Zeroing the {_token_word(ctx)} at `proj.out` vs the same number of random visual tokens drawn "
             f"from the same foreground/background stratum ({config.draws} draws per image). Effect = drop in the "
             f"gold answer's log-probability; paired over {d['n']} images ({d['n_skipped']} without enough matched "
             f"controls left out); p from a sign-flip permutation test of sink > random.")
    rep.figure(ablation_figure(res))
    rows = []
    for name in ("sink_effect", "random_effect", "diff"):
        e = d[name]
        rows.append({"": name, "mean": e["mean"], "ci_low": e["ci_low"], "ci_high": e["ci_high"]})
        for k in ("mean", "ci_low", "ci_high"):
            _num(rep, f"{ctx.key}.ablation.{name}.{k}", e[k])
    rep.table(pd.DataFrame(rows), index=False)
    _num(rep, f"{ctx.key}.ablation.p_value", d["p_value"])
    _num(rep, f"{ctx.key}.ablation.n", d["n"])


def _patching(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..patching import PatchConfig, patch_dataset
    from ..sites import blocks
    from .figures import patch_heatmap
    m = ctx.model
    rep.section(f"Activation patching ({m.name})")
    cfg = PatchConfig(sites=("proj.out", *blocks("llm", "hook_resid_pre", None, m.n_llm_layers)),
                      selections=("sinks", "random", "image"), n_draws=max(2, config.draws // 4), seed=config.seed,
                      batch_size=config.batch_size)
    res = patch_dataset(m, _subset(ctx, config.causal_limit // 2), cfg, corruption="shuffle", sinks=ctx.causal_spec,
                        progress=True)
    r = res.to_dict()
    rep.text(f"Base: each image with its question; source: the same question with another image of the batch "
             f"(shuffled). Values patched from source into base at each site for the {_token_word(ctx)}, matched "
             f"random tokens, or all image tokens; recovery = (patched - base) / (source - base) of the gold "
             f"answer's log-probability (n = {r['n']}).")
    rep.figure(patch_heatmap(res))
    t = res.table("recovery")
    rep.table(t.reset_index(), "Normalised recovery per site and token set.", index=False)
    for site, row in r["recovery"].items():
        for unit, v in row.items():
            _num(rep, f"{ctx.key}.patching.{site}.{_part(unit)}", v)


def _subsets(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..analyses.subsets import visual_subsets
    from .figures import subset_figure
    m = ctx.model
    rep.section(f"Sink-only and non-sink-only visual input ({m.name})")
    res = visual_subsets(m, _subset(ctx, config.limit), ctx.causal_spec, batch_size=config.batch_size)
    s = res.table()
    rep.text(f"Accuracy with the full visual input, the {_token_word(ctx)} only, or everything but them "
             f"(tokens dropped from the sequence), per question type, with Wilson 95 % CIs.")
    rep.figure(subset_figure(res))
    rep.table(s, index=False)
    for r in s.to_dict("records"):
        _num(rep, f"{ctx.key}.subsets.{_part(r['question_type'])}.{r['subset']}.accuracy", r["accuracy"])


def _reorder(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..interventions.reorder import evaluate_reorder
    from .figures import reorder_figure
    m = ctx.model
    rep.section(f"Sink-to-the-front ({m.name})")
    res = evaluate_reorder(m, _subset(ctx, config.limit), ctx.causal_spec, batch_size=config.batch_size)
    s = res.table()
    rep.text(f"The {_token_word(ctx)} moved to the front of the visual tokens (sink-to-the-end as control), with "
             f"their position ids kept or reassigned; accuracy per question type and the paired change against "
             f"the original order.")
    rep.figure(reorder_figure(res))
    rep.table(s, index=False)
    for r in s.to_dict("records"):
        key = f"{ctx.key}.reorder.{_part(r['question_type'])}.{r['condition'].replace('/', '_')}"
        _num(rep, f"{key}.accuracy", r["accuracy"])
        if r.get("delta") is not None and not pd.isna(r.get("delta")):
            _num(rep, f"{key}.delta", r["delta"])


# -- reproduction -----------------------------------------------------------------------------------
def from_manifest(path: str | os.PathLike) -> ReportConfig:
    m = json.loads(Path(path).read_text())
    if "config" not in m:
        raise MechsinkError(f"{path} is not a mechsink manifest (no 'config')")
    return ReportConfig.from_dict(m["config"])


def compare_numbers(old: dict, new: dict, rtol: float = 1e-6) -> list[str]:
    """Keys whose values differ between two manifests' numbers (empty list = reproduced)."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if not np.isclose(a, b, rtol=rtol, atol=1e-9, equal_nan=True):
                diffs.append(k)
        elif a != b:
            diffs.append(k)
    return diffs
