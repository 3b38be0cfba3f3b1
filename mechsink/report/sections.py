"""The sections of the report pipeline (``mechsink.report.pipeline``): each runs one analysis on
one model, adds its text, tables and captioned figures, records every number shown, and adds its
line to the findings (``mechsink.report.findings``). The token set of the causal sections is named
by ``ctx.label``: ``sinks``, or ``top3_norm`` when the rule found none."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .context import PROBE_LABELS, ReportConfig, _Ctx, _num, _part, _subset


def _detection(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..sinks import SinkSpec, detect_dataset
    from ..sinks.norms import NormConfig
    from ..stats import binomial_ci
    from . import findings
    from .figures import norm_histogram, norm_profile_figure
    m, spec = ctx.model, ctx.spec
    rep.section(f"Sink detection ({m.name})")
    samples = list(_subset(ctx, config.limit))
    images = findings.unique_images(samples)          # the ViT sees the image alone: one row per image
    sinks = detect_dataset(m, images, spec, batch_size=config.batch_size, progress="detect", norms=NormConfig())
    pat = sinks.patches
    s = sinks.summary()
    rep.text(f"Rule: `{spec.rule}` at `{spec.site}` with {json.dumps(spec.params)} "
             f"(score `{spec.score}`, judged per {spec.per}). {s['images']} distinct images "
             f"(of {len(samples)} questions; each image counted once).")
    for k in ("images", "images_with_sinks", "mean_per_image", "fraction_of_tokens"):
        _num(rep, f"{ctx.key}.sinks.{k}", s[k])
    rel = pat["norm"] / pat.groupby(["sample", "image", "tile"])["norm"].transform("median")
    thr = spec.params.get("ratio") if spec.rule in ("relative", "ratio") else None
    fig = norm_histogram(rel, threshold=thr, title=f"{m.name}: norm / image median at {spec.site}",
                         xlabel="norm / median norm of the image")
    rep.figure(fig, f"Histogram of every visual token's norm at `{spec.site}` divided by its image's median norm, "
                    f"{s['images']} images, each counted once"
               + (f"; dashed line: the rule's threshold ({thr}x), sinks lie to its right." if thr else "."))
    stats = sinks.norms.table().rename(columns={"median_max_over_median": "median max/median norm",
                                                "frac_images_with_outlier": "images with a token > 3x median"})
    rep.table(stats, "Per ViT layer: how far the largest token norm stands out (natural high-norm tokens).", index=False)
    for r in stats.itertuples(index=False):
        _num(rep, f"{ctx.key}.norms.layer{r.layer}.max_over_median", r[1])
        _num(rep, f"{ctx.key}.norms.layer{r.layer}.frac_images_gt3x", r[2])
    rep.figure(norm_profile_figure(sinks.norms, title=f"{m.name}: outlier norms by layer"),
               f"Per ViT layer (0 = first block): the median over {s['images']} images of the largest token norm "
               f"divided by the image's median norm; dotted line: 3x. No error bars (a median over images).")
    n_with = int(s["images_with_sinks"])
    frac, lo, hi = binomial_ci(n_with, max(int(s["images"]), 1))
    if pat["is_sink"].any():
        grid = pat[pat["is_sink"]].groupby(["row", "col"]).size().reset_index(name="images")
        rep.table(grid.sort_values("images", ascending=False).head(10),
                  "Where sinks sit: the most frequent patch cells (row, col from 0) and in how many images.", index=False)
    else:
        k = config.fallback_topk
        ctx.fallback = True
        ctx.causal_spec = SinkSpec(site=spec.site, rule="topk", params={"k": k}, per=spec.per)
        rep.text(f"**No sinks under this rule.** The sections below therefore use the **top-{k} highest-norm "
                 f"tokens** of each image (rule `topk`), labelled `{ctx.label}` everywhere: they are not sinks, and "
                 f"the sections test whether the largest-norm tokens matter more than matched random ones.")
    _num(rep, f"{ctx.key}.sinks.causal_rule_is_fallback", int(ctx.fallback))
    findings.add(ctx.findings, f"{ctx.key}.findings.sinks", m.name, "fraction of images with >= 1 sink (Wilson CI)",
                 effect=frac, ci=(lo, hi), n_images=int(s["images"]), n_questions=len(samples),
                 verdict=findings.SUPPORTED if frac >= 0.5 else findings.NOT_SUPPORTED,
                 note="" if frac >= 0.5 else ("none found" if n_with == 0 else "in under half of the images"))


def _ratio_text(r) -> str:
    """A ratio for a table: ``n/a (denominator ~0)`` when the other tokens receive about nothing."""
    if not np.isfinite(r.ratio) or r.nonsink_mean <= 1e-6 * max(abs(r.sink_mean), 1e-30):
        return f"n/a: denominator ~0 (other tokens receive {r.nonsink_mean:.2g})"
    return f"{r.ratio:.3g} [{r.ci_low:.3g}, {r.ci_high:.3g}]"


def _bin_labels(bins: pd.DataFrame) -> pd.DataFrame:
    """Norm bins named by rank and their edges at 3 significant digits ("Q1: 1.68-3.07"), never
    an interval with float noise such as (1.6840000000000002, 3.069]."""
    edges = bins[["bin_low", "bin_high"]].drop_duplicates().sort_values("bin_low").itertuples(index=False)
    names = {(lo, hi): f"Q{i + 1}: {lo:.3g}–{hi:.3g}" for i, (lo, hi) in enumerate(edges)}
    return bins.assign(bin=[names[(lo, hi)] for lo, hi in zip(bins["bin_low"], bins["bin_high"])])


def _attention(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..sinks.attention import AttentionConfig, attention_stats, sink_ratio
    from . import findings
    from .figures import binned_bar
    m = ctx.model
    rep.section(f"Norms and LLM attention ({m.name})")
    samples = list(_subset(ctx, config.attention_limit))
    stats = attention_stats(m, samples, ctx.causal_spec, AttentionConfig(batch_size=config.batch_size, seed=config.seed),
                            progress="attention")
    bins = _bin_labels(stats.bins())
    rep.figure(binned_bar(bins.assign(layer=bins["layer"].astype(str)), x="bin", y="attn_mean", hue="layer",
                          title=f"{m.name}: attention received by ViT-norm bin", ylabel="mean attention received",
                          xlabel="ViT norm quartile"),
               "Bars: mean attention each visual token receives from the text/answer tokens, by ViT-norm quartile "
               "(Q1 = lowest; ViT-norm edges in the labels) and LLM layer (0 = first); no error bars (means over all "
               "tokens).")
    # the ratio over images: questions on one image are one unit (their per-question means averaged)
    unit = {i: findings.image_of(sm) for i, sm in enumerate(samples)}
    codes = {u: j for j, u in enumerate(dict.fromkeys(unit.values()))}
    f = stats.frame.assign(sample=stats.frame["sample"].map(lambda i: codes[unit[i]]))
    if "batch" in f:
        f = f.assign(batch=0)
    ratio = sink_ratio(f, n_boot=stats.config.n_boot, alpha=stats.config.alpha, seed=stats.config.seed)
    shown = ratio[["part", "layer", "n_images", "sink_mean", "nonsink_mean"]].rename(
        columns={"sink_mean": f"{ctx.label} mean", "nonsink_mean": "other tokens mean"})
    shown["ratio [95 % CI]"] = [_ratio_text(r) for r in ratio.itertuples(index=False)]
    rep.table(shown, f"Mean attention to the {ctx.label} / to the other visual tokens per LLM layer, 95 % bootstrap CI "
                     f"over {len(codes)} images ({len(samples)} questions averaged within their image).", index=False)
    for r in ratio.itertuples(index=False):
        zero = r.nonsink_mean <= 1e-6 * max(abs(r.sink_mean), 1e-30)
        _num(rep, f"{ctx.key}.attention.layer{r.layer}.{ctx.label}_mean", r.sink_mean)
        _num(rep, f"{ctx.key}.attention.layer{r.layer}.other_mean", r.nonsink_mean)
        _num(rep, f"{ctx.key}.attention.layer{r.layer}.denominator_near_zero", int(zero))
        if not zero:
            _num(rep, f"{ctx.key}.attention.layer{r.layer}.ratio", r.ratio)
            _num(rep, f"{ctx.key}.attention.layer{r.layer}.ci_low", r.ci_low)
            _num(rep, f"{ctx.key}.attention.layer{r.layer}.ci_high", r.ci_high)
    above = int(((ratio["ci_low"] > 1) | (ratio["nonsink_mean"] <= 1e-6 * ratio["sink_mean"].abs())).sum())
    findings.add(ctx.findings, f"{ctx.key}.findings.attention", m.name,
                 f"LLM layers whose attention ratio ({ctx.label} / others) has its CI above 1 (supported: at least half)",
                 effect=f"{above} of {len(ratio)}", n_images=len(codes), n_questions=len(samples),
                 verdict=findings.NOT_TESTABLE if ctx.fallback else
                 (findings.SUPPORTED if 2 * above >= len(ratio) else findings.NOT_SUPPORTED),
                 note=f"no sinks; {ctx.label} tested" if ctx.fallback else "")


def _probes(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..cache.extract import extract
    from ..distributed import rank
    from ..probing import ProbeConfig, probe
    from . import findings
    from .figures import probe_figure
    m = ctx.model
    rep.section(f"Linear probes ({m.name})")
    data = _subset(ctx, config.limit)
    n_img, n_q = findings.counts(data)
    labels = config.probe_labels or [c for c in PROBE_LABELS if c in data.label_columns()][:2]
    if not labels:
        rep.text("The dataset has no image-level label column to probe.")
        findings.add(ctx.findings, f"{ctx.key}.findings.probes", m.name, "no label to probe", n_images=n_img,
                     n_questions=n_q)
        return
    mid = max(0, m.n_vit_layers // 2 - 1)
    sites = list(dict.fromkeys([f"vit.blocks.{mid}.hook_resid_post", "vit.out", "proj.out"]))
    store = extract(m, data, sites=sites, tokens=("image", "cls"), out=ctx.work / "activations", store_dtype="float32",
                    batch_size=config.batch_size, sinks=ctx.causal_spec, progress=rank() == 0)
    rep.text(f"Cache: {len(store.index)} token rows at {', '.join(f'`{s}`' for s in sites)} "
             f"(token sets: `{ctx.label}`, the other patches, CLS, mean-pooled patches).")
    for i, label in enumerate(labels):
        res = probe(store, ProbeConfig(label=label, seed=config.seed, n_boot=500))
        f = res.frame.assign(token_set=res.frame["token_set"].map(ctx.name))
        cols = ["token_set", "site", "accuracy", "ci_low", "ci_high", "control_accuracy", "selectivity", "majority"]
        rep.table(f[[c for c in cols if c in f]], f"Probe for `{label}` (balanced accuracy, 95 % bootstrap CI over "
                                                  f"images, images never split across folds; control = shuffled "
                                                  f"labels).", index=False)
        rep.figure(probe_figure(f, title=f"{m.name}: probing {label}"),
                   f"Balanced accuracy of a linear probe for `{label}` per site (model order) and token set; "
                   f"shaded bands: 95 % bootstrap CI over images; dotted line: chance.")
        for r in f.itertuples(index=False):
            key = f"{ctx.key}.probe.{_part(label)}.{r.token_set}.{r.site}"
            _num(rep, f"{key}.accuracy", r.accuracy)
            _num(rep, f"{key}.control", r.control_accuracy)
        own = f[(f["token_set"] == ctx.label) & (f["site"] == "vit.out")]
        if i == 0 and len(own):
            r = own.iloc[0]
            ok = r["ci_low"] > max(r["control_accuracy"], r.get("majority", 0) or 0)
            findings.add(ctx.findings, f"{ctx.key}.findings.probes", m.name,
                         f"probe accuracy for `{label}` from the {ctx.label} at vit.out (control "
                         f"{r['control_accuracy']:.3g})", effect=float(r["accuracy"]),
                         ci=(float(r["ci_low"]), float(r["ci_high"])), n_images=n_img, n_questions=n_q,
                         verdict=findings.NOT_TESTABLE if ctx.fallback else
                         (findings.SUPPORTED if ok else findings.NOT_SUPPORTED),
                         note=(f"no sinks; {ctx.label}: " + ("above" if ok else "not above") + " control")
                         if ctx.fallback else "")


def _comparison_finding(ctx: _Ctx, key: str, what: str, c, two_sided: bool = False) -> None:
    from . import findings
    findings.add(ctx.findings, f"{ctx.key}.findings.{key}", ctx.model.name, what, effect=c.diff.mean,
                 ci=(c.diff.ci_low, c.diff.ci_high), p=c.p_value, n_images=c.n, n_questions=c.n_obs,
                 verdict=findings.NOT_TESTABLE if ctx.fallback else findings.verdict_of(c.p_value, c.diff.mean,
                                                                                      c.alpha, two_sided=two_sided),
                 note=(f"no sinks; {ctx.label}: p = {c.p_value:.2g}") if ctx.fallback else "")


def _ablation(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..ablation import AblationConfig, ablate
    from ..selection import contrast_foreground
    from .figures import ablation_figure
    m = ctx.model
    rep.section(f"Ablation: {ctx.label} vs matched random tokens ({m.name})")
    # Controls matched on count and on foreground/background: high-norm tokens often sit on objects,
    # and object tokens matter more than background ones whether or not they are sinks.
    cfg = AblationConfig(site="proj.out", mode="zero", metric="logprob", n_draws=config.draws, seed=config.seed,
                         batch_size=config.batch_size, match=("foreground",))
    res = ablate(m, _subset(ctx, config.causal_limit), cfg, sinks=ctx.causal_spec, foreground=contrast_foreground(),
                 progress=True)
    c = res.comparison()
    d = res.summary()
    rep.text(f"Zeroing the `{ctx.label}` at `proj.out` vs the same number of random visual tokens drawn "
             f"from the same foreground/background stratum ({config.draws} draws per question). Effect = drop in the "
             f"gold answer's log-probability, averaged within each image; paired over **{c.n} images** ({c.n_obs} "
             f"questions; {d['n_skipped']} questions without enough matched controls left out). "
             f"Difference {c.diff.mean:.3g} [{c.diff.ci_low:.3g}, {c.diff.ci_high:.3g}], **p = {c.p_value:.3g}** "
             f"(sign-flip permutation test over images of {ctx.label} > random).")
    labels = ctx.names(["sink"])
    rep.figure(ablation_figure(res, labels=labels),
               f"Points: mean effect over {c.n} images of zeroing the {ctx.label} ({labels['sink']}), matched random "
               f"tokens (random) and their paired difference (diff); error bars: 95 % cluster-bootstrap CI over "
               f"images; dashed line: no effect.")
    rows = []
    for name in ("sink_effect", "random_effect", "diff"):
        e = d[name]
        shown = ctx.name(name)
        rows.append({"": shown, "mean": e["mean"], "ci_low": e["ci_low"], "ci_high": e["ci_high"]})
        for k in ("mean", "ci_low", "ci_high"):
            _num(rep, f"{ctx.key}.ablation.{shown}.{k}", e[k])
    rows.append({"": "p (sign flips over images)", "mean": d["p_value"], "ci_low": None, "ci_high": None})
    rep.table(pd.DataFrame(rows), f"Ablation effects over {c.n} images ({c.n_obs} questions), 95 % CIs.", index=False)
    _num(rep, f"{ctx.key}.ablation.p_value", d["p_value"])
    _num(rep, f"{ctx.key}.ablation.n_images", c.n)
    _num(rep, f"{ctx.key}.ablation.n_questions", c.n_obs)
    _comparison_finding(ctx, "ablation", f"zeroing the {ctx.label} at proj.out minus matched random "
                                         f"(drop in log-prob)", c)


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
    n = res.counts()
    c = res.comparison("proj.out", "sinks", n_boot=2000, seed=config.seed)
    rep.text(f"Base: each image with its question; source: the same question with another image of the batch "
             f"(shuffled). Values patched from source into base at each site for the `{ctx.label}`, matched "
             f"random tokens, or all image tokens; recovery = (patched - base) / (source - base) of the gold "
             f"answer's log-probability ({n['n_images']} images, {n['n_questions']} questions). At `proj.out`, the "
             f"drop of the base answer's log-probability when patching the {ctx.label} minus matched random: {c.diff.mean:.3g} "
             f"[{c.diff.ci_low:.3g}, {c.diff.ci_high:.3g}], p = {c.p_value:.3g} over {c.n} images.")
    labels = ctx.names(res.table("recovery").columns)
    rep.figure(patch_heatmap(res, labels=labels),
               f"Cells: normalised recovery of the gold answer's log-probability (0 = base, 1 = source) per site "
               f"(rows; LLM layers from 0) and patched token set (columns), means over {n['n_questions']} questions "
               f"of the aggregate metric; no intervals (see the findings for the image-level test).")
    t = res.table("recovery").rename(columns=labels)
    rep.table(t.reset_index(), "Normalised recovery per site and token set.", index=False)
    for site, row in r["recovery"].items():
        for unit, v in row.items():
            _num(rep, f"{ctx.key}.patching.{site}.{_part(ctx.name(unit))}", v)
    for k, v in n.items():
        _num(rep, f"{ctx.key}.patching.{k}", v)
    for k, v in (("diff", c.diff.mean), ("ci_low", c.diff.ci_low), ("ci_high", c.diff.ci_high), ("p_value", c.p_value)):
        _num(rep, f"{ctx.key}.patching.proj_out_vs_random.{k}", v)
    _comparison_finding(ctx, "patching", f"patching the {ctx.label} at proj.out minus matched random "
                                         f"(drop of the base answer's log-prob)", c)


def _paired(ctx: _Ctx, frame: pd.DataFrame, col: str, a: str, b: str, samples, alternative: str, seed: int):
    """Comparison of per-question correctness under conditions a and b, over images."""
    from ..stats import compare_paired
    from .findings import image_of
    w = frame.pivot_table(index="id", columns=col, values="correct", aggfunc="mean").dropna(subset=[a, b])
    img = {s.id: image_of(s) for s in samples}
    return compare_paired(w[a].to_numpy(float), w[b].to_numpy(float), units=[img.get(i, i) for i in w.index],
                          alternative=alternative, seed=seed, n_boot=2000, method="percentile")


def _subsets(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..analyses.subsets import visual_subsets
    from .figures import subset_figure
    m = ctx.model
    rep.section(f"{ctx.label}-only and other-tokens-only visual input ({m.name})")
    samples = list(_subset(ctx, config.limit))
    res = visual_subsets(m, samples, ctx.causal_spec, batch_size=config.batch_size)
    s = res.table()
    names = ctx.names(s["subset"].unique())
    c = _paired(ctx, res.frame, "subset", "sinks", "nonsinks", samples, "greater", config.seed)
    rep.text(f"Accuracy with the full visual input, the `{ctx.label}` only, or everything but them "
             f"(tokens dropped from the sequence), per question type. {ctx.label} only minus the others only: "
             f"{c.diff.mean:.3g} [{c.diff.ci_low:.3g}, {c.diff.ci_high:.3g}], p = {c.p_value:.3g} over {c.n} images "
             f"({c.n_obs} questions).")
    rep.figure(subset_figure(res, labels=names),
               "Points: accuracy per question type with each visual input; error bars: Wilson 95 % CI over the "
               "questions of the group (questions treated as independent; the image-level test is in the findings).")
    s = s.assign(subset=s["subset"].map(names))
    rep.table(s, index=False)
    for r in s.to_dict("records"):
        _num(rep, f"{ctx.key}.subsets.{_part(r['question_type'])}.{r['subset']}.accuracy", r["accuracy"])
    _comparison_finding(ctx, "subsets", f"accuracy from the {ctx.label} alone minus from the other tokens alone", c)


def _reorder(rep, ctx: _Ctx, config: ReportConfig) -> None:
    from ..interventions.reorder import evaluate_reorder
    from .figures import reorder_figure
    m = ctx.model
    rep.section(f"{ctx.label} to the front ({m.name})")
    samples = list(_subset(ctx, config.limit))
    res = evaluate_reorder(m, samples, ctx.causal_spec, batch_size=config.batch_size)
    s = res.table()
    conds = [x for x in dict.fromkeys(res.frame["condition"]) if x.startswith("front")]
    c = _paired(ctx, res.frame, "condition", conds[0], "original", samples, "two-sided", config.seed) if conds else None
    rep.text(f"The `{ctx.label}` moved to the front of the visual tokens (to the end as control), with "
             f"their position ids kept or reassigned; accuracy per question type and the paired change against "
             f"the original order." + (f" `{conds[0]}` minus original: {c.diff.mean:.3g} [{c.diff.ci_low:.3g}, "
                                       f"{c.diff.ci_high:.3g}], p = {c.p_value:.3g} (two-sided) over {c.n} images."
                                       if c is not None else ""))
    rep.figure(reorder_figure(res),
               f"Points: accuracy per question type and token order ({ctx.label} moved; positions kept or "
               f"reassigned); error bars: Wilson 95 % CI over the questions of the group.")
    rep.table(s, index=False)
    for r in s.to_dict("records"):
        key = f"{ctx.key}.reorder.{_part(r['question_type'])}.{r['condition'].replace('/', '_')}"
        _num(rep, f"{key}.accuracy", r["accuracy"])
        if r.get("delta") is not None and not pd.isna(r.get("delta")):
            _num(rep, f"{key}.delta", r["delta"])
    if c is not None:
        _comparison_finding(ctx, "reorder", f"accuracy with the {ctx.label} at the front ({conds[0]}) minus "
                                            f"original order", c, two_sided=True)
