"""Activation patching: write values from a source run into a base run, and measure what changes.

Words: the **base** run is the one we change; the **source** run is where values come from.
``patch`` copies sinks, matched random tokens or every image token from source into base at any
site and reports the normalised recovery

    recovery = (metric(patched) - metric(base)) / (metric(source) - metric(base)),

``sweep`` does it for every layer x position (or layer x token set) and draws heatmaps, and
``path_patch`` lets the source's sink tokens reach only chosen LLM layers: the sink positions'
residual is patched at those layers' inputs and restored to base at their outputs, so every other
layer sees base values there.

The engine underneath (:func:`execute`) is shared with ablation. It stacks ``C`` copies of a batch
along the batch dimension and gives every copy its own writes, so many conditions (layers,
positions, random draws) cost one forward. When nothing is written inside the ViT, the ViT and
projector run once per batch: their output, the language model's ``inputs_embeds``, is captured
(:func:`llm_inputs`) and the copies run the LLM alone.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .atomic import write_parquet, write_text
from .errors import MechsinkError
from .engine import Plan, Write, clean, execute, source_run
from .metrics import Metric
from .sites import Site
from .tokens import _AXIS_COLUMNS, TokenMap


class PatchError(MechsinkError, ValueError):
    """Patching or ablation input that cannot work (mismatched runs, unsupported site or mode)."""


# -- patching ---------------------------------------------------------------------------------------
TOKEN_SETS = ("sinks", "random", "image", "nonsinks")


@dataclass(frozen=True)
class PatchConfig:
    """Which sites and token sets to patch from source into base (serialisable).

    tokens: token sets among TOKEN_SETS ("random" = ``n_draws`` random non-sink sets matched on
    count and ``match``, see mechsink.ablation). sinks_of: whose sinks are patched, the source's
    (the tokens whose values are brought in) or the base's.
    """
    sites: tuple[str, ...] = ("proj.out",)
    tokens: tuple[str, ...] = ("sinks", "random", "image")
    metric: Metric = field(default_factory=Metric)
    n_draws: int = 8
    match: tuple[str, ...] = ()
    sinks_of: str = "source"
    seed: int = 0
    rows_per_forward: int = 64

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("sites", tuple(str(Site.parse(s)) for s in ([self.sites] if isinstance(self.sites, str) else self.sites)))
        for s in self.sites:
            if Site.parse(s).kind in ("pattern", "logits"):
                raise PatchError(f"cannot patch tokens at {s}: it holds attention patterns or logits")
        set_("tokens", tuple([self.tokens] if isinstance(self.tokens, str) else self.tokens))
        bad = set(self.tokens) - set(TOKEN_SETS)
        if bad:
            raise PatchError(f"unknown token set(s) {sorted(bad)}; use {', '.join(TOKEN_SETS)}")
        set_("metric", Metric.coerce(self.metric))
        set_("match", tuple(self.match))
        if self.sinks_of not in ("source", "base"):
            raise PatchError(f"sinks_of must be 'source' or 'base', got {self.sinks_of!r}")
        if self.n_draws < 1:
            raise PatchError(f"n_draws must be at least 1, got {self.n_draws}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(metric=self.metric.to_dict(), sites=list(self.sites), tokens=list(self.tokens), match=list(self.match))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PatchConfig":
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**{**d, "metric": Metric.coerce(d.get("metric"))})


def check_pair(base, source) -> None:
    """Base and source must have the same token layout (same prompts and image sizes)."""
    for key in ("input_ids", "attention_mask", "pixel_values"):
        a, b = base.inputs.get(key), source.inputs.get(key)
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            raise PatchError(f"base and source differ in {key} shape ({None if a is None else tuple(a.shape)} vs "
                             f"{None if b is None else tuple(b.shape)}); patching needs the same prompts and image sizes")
    if not np.array_equal(base.token_map.roles, source.token_map.roles):
        raise PatchError("base and source have different token layouts; prepare both with the same prompts")


def _selections(model, base, source, cfg: PatchConfig, sinks) -> tuple[list[str], list[int], np.ndarray]:
    """(set name per copy, draw per copy, select [n_sets, n_patches]) over the patch rows."""
    from .ablation import draw_controls, token_table
    tm = base.token_map
    need_sinks = any(t in ("sinks", "random", "nonsinks") for t in cfg.tokens)
    table = token_table(model, source if cfg.sinks_of == "source" else base, sinks) if need_sinks else tm.patches
    sets: list[tuple[str, int, np.ndarray]] = []
    for t in cfg.tokens:
        if t == "random":
            sel, _, _ = draw_controls(table, tm, cfg.n_draws, axis="llm", match=cfg.match, seed=cfg.seed)
            sets += [(t, k, sel[1 + k]) for k in range(cfg.n_draws)]
        else:
            is_sink = table["is_sink"].to_numpy() if t in ("sinks", "nonsinks") else None
            row = {"sinks": is_sink, "nonsinks": None if is_sink is None else ~is_sink,
                   "image": np.ones(len(tm.patches), dtype=bool)}[t]
            sets.append((t, 0, row))
    names, draws, rows = zip(*sets)
    return list(names), list(draws), np.stack(rows).astype(bool)


@dataclass
class PatchResult:
    """Tidy patching results: ``frame`` has one row per site x token set (or unit) x draw x sample
    with the metric in the base, source and patched runs and the per-sample ``recovery``."""
    frame: pd.DataFrame
    config: dict
    unit: str = "tokens"

    def table(self, values: str = "recovery") -> pd.DataFrame:
        """site x unit table of the aggregate recovery (mean(patched) - mean(base)) / (mean(source) -
        mean(base)), random draws averaged first; ``values="effect"`` gives mean(patched - base)."""
        f = self.frame
        g = f.groupby(["site", self.unit, "sample"], sort=False)[["base", "source", "patched"]].mean().reset_index()
        agg = g.groupby(["site", self.unit], sort=False)[["base", "source", "patched"]].mean()
        if values == "recovery":
            v = (agg["patched"] - agg["base"]) / (agg["source"] - agg["base"])
        elif values == "effect":
            v = agg["patched"] - agg["base"]
        else:
            raise PatchError(f"values must be 'recovery' or 'effect', got {values!r}")
        t = v.unstack(self.unit)
        order = list(dict.fromkeys(f["site"]))
        cols = list(dict.fromkeys(f[self.unit]))
        return t.reindex(index=order, columns=cols)

    def heatmap(self, values: str = "recovery", **kw):
        from .report.figures import layer_heatmap
        label = "normalised recovery" if values == "recovery" else f"change in {self.config.get('metric', {}).get('name', 'metric')}"
        return layer_heatmap(self.table(values), cbar_label=label, center=0.0 if values == "effect" else None,
                             xlabel=self.unit, ylabel="site", **kw)

    def save(self, path: str | os.PathLike) -> Path:
        """Write results.parquet and config.json (atomically) into a directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_parquet(path / "results.parquet", self.frame)
        write_text(path / "config.json", json.dumps({"config": self.config, "unit": self.unit}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatchResult":
        path = Path(path)
        meta = json.loads((path / "config.json").read_text())
        return cls(pd.read_parquet(path / "results.parquet"), meta["config"], meta["unit"])


def _recovery(patched: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    den = source - base
    ok = den.abs() > 1e-6 * (1 + base.abs())
    rec = (patched - base) / torch.where(ok, den, torch.ones_like(den)) + 0.0     # + 0.0: no negative zeros
    return torch.where(ok, rec, torch.full_like(den, float("nan")))


def _frame(sites: list[str], units: list, draws: list[int], unit_name: str, value: torch.Tensor,
           base_v: torch.Tensor, src_v: torch.Tensor, n_tokens: np.ndarray | None = None,
           layers: list[int] | None = None) -> pd.DataFrame:
    """Long frame over copies x samples (row c * B + i); one site label, unit and draw per copy."""
    c, b = value.shape
    rec = _recovery(value, base_v[None], src_v[None])
    if layers is None:
        layers = [-1 if Site.parse(s).layer is None else Site.parse(s).layer for s in sites]
    parts = [s.split(".", 1)[0] for s in sites]
    f = pd.DataFrame({
        "site": np.repeat(sites, b), "part": np.repeat(parts, b), "layer": np.repeat(layers, b),
        unit_name: np.repeat(np.asarray(units, dtype=object), b), "draw": np.repeat(draws, b),
        "sample": np.tile(np.arange(b), c)})
    if n_tokens is not None:
        f["n_tokens"] = np.asarray(n_tokens).reshape(-1)
    f["base"] = base_v.repeat(c).numpy()
    f["source"] = src_v.repeat(c).numpy()
    f["patched"] = value.reshape(-1).numpy()
    f["recovery"] = rec.reshape(-1).numpy()
    return f


def _counts(tm: TokenMap, select: np.ndarray, axis: str = "llm") -> np.ndarray:
    """Tokens per (selection, sample) that exist on ``axis``: [n_sel, B]."""
    pos = tm.patches[_AXIS_COLUMNS[axis][1]].to_numpy() >= 0
    samples = tm.patches["sample"].to_numpy()
    b = int(tm.roles.shape[0])
    return np.stack([np.bincount(samples[row & pos], minlength=b) for row in select])


def patch(model, base, source, sinks=None, config: PatchConfig | None = None, **overrides) -> PatchResult:
    """Patch token sets from ``source`` into ``base`` at each of ``config.sites``.

    base and source need the same token layout (e.g. ``source = with_images(model, base, other)``).
    The metric reads the *base* batch's targets in every run (its answers and positions), so
    metric(source) is how the source image scores the base's answer. Keyword overrides replace
    fields of ``config``.
    """
    cfg = replace(config or PatchConfig(), **overrides)
    check_pair(base, source)
    names, draws, select = _selections(model, base, source, cfg, sinks)
    b0 = clean(model, base, cfg.metric, read=cfg.sites)
    s0 = source_run(model, source, cfg.metric, b0, read=cfg.sites)
    tm = base.token_map
    n_sets = len(names)
    plan = Plan(n_sets * len(cfg.sites))
    counts = []
    for k, site in enumerate(cfg.sites):
        sel = np.zeros((plan.n_copies, len(tm.patches)), dtype=bool)
        sel[k * n_sets:(k + 1) * n_sets] = select
        axis = Site.parse(site).axis
        plan.writes.append(Write(site, tm.mask(axis, sel, tuple(b0[site].shape[:-1])), s0[site]))
        counts.append(_counts(tm, select, axis))
    out = execute(model, base, plan, cfg.metric, b0["targets"], inputs=b0["inputs"], clean_next=b0["next"],
                  rows_per_forward=cfg.rows_per_forward)
    sites = [s for s in cfg.sites for _ in range(n_sets)]
    frame = _frame(sites, names * len(cfg.sites), draws * len(cfg.sites), "tokens", out["value"], b0["value"],
                   s0["value"], np.concatenate(counts))
    return PatchResult(frame, cfg.to_dict(), "tokens")


# -- sweeps -----------------------------------------------------------------------------------------
def block_sites(model, part: str = "llm", hook: str = "hook_resid_pre", layers: Sequence[int] | None = None) -> list[str]:
    """Site names of one hook across layers, e.g. every ``llm.blocks.{l}.hook_resid_pre``."""
    n = model.n_llm_layers if part == "llm" else model.n_vit_layers
    return [str(Site.parse(f"{part}.blocks.{l}.{hook}")) for l in (range(n) if layers is None else layers)]


def _unit_masks(model, base, source, site: str, shape: tuple, positions, sinks, n_draws: int, seed: int,
                match: Sequence[str]) -> tuple[str, list, list[int], torch.Tensor]:
    """(unit name, unit labels, draws, mask [U, *shape]) for one site of a sweep."""
    tm = base.token_map
    axis = Site.parse(site).axis
    if isinstance(positions, str) and positions in ("all", "patches"):
        positions = list(range(shape[-1])) if positions == "all" else positions
    if isinstance(positions, str) and positions == "patches":
        from .ablation import _patch_index
        patch = _patch_index(tm)
        units = sorted(set(patch.tolist()))
        sel = np.stack([patch == p for p in units])
        return "patch", units, [0] * len(units), tm.mask(axis, sel, shape)
    if isinstance(positions, str) or (len(positions) and isinstance(positions[0], str)):
        cfg = PatchConfig(sites=(site,), tokens=(positions,) if isinstance(positions, str) else tuple(positions),
                          n_draws=n_draws, seed=seed, match=tuple(match))
        names, draws, sel = _selections(model, base, source, cfg, sinks)
        return "tokens", names, draws, tm.mask(axis, sel, shape)
    units = [int(p) for p in positions]
    if any(not 0 <= p < shape[-1] for p in units):
        raise PatchError(f"positions must lie in 0..{shape[-1] - 1} at {site}")
    mask = torch.zeros(len(units), *shape, dtype=torch.bool)
    for k, p in enumerate(units):
        mask[k, ..., p] = True
    return "position", units, [0] * len(units), mask


def sweep(model, base, source, sites: Sequence[str] | None = None, *, positions="patches", sinks=None,
          metric: Metric | str | None = None, n_draws: int = 4, seed: int = 0, match: Sequence[str] = (),
          rows_per_forward: int = 64) -> PatchResult:
    """Patch every site x unit from source into base, one unit at a time.

    sites: default every ``llm.blocks.{l}.hook_resid_pre`` (see ``block_sites``; ViT sites work
    too). positions: "patches" (each patch cell, in every sample), "all" (every position of the
    site's token axis in every sample/item, as TransformerLens sweeps do), a list of positions, or
    token-set names ("sinks", "random", "image", "nonsinks"). Returns a PatchResult whose
    ``table()`` is site x unit and ``heatmap()`` draws it.
    """
    metric = Metric.coerce(metric)
    check_pair(base, source)
    sites = block_sites(model) if sites is None else [str(Site.parse(s)) for s in sites]
    b0 = clean(model, base, metric, read=sites)
    s0 = source_run(model, source, metric, b0, read=sites)
    per_site = [_unit_masks(model, base, source, s, tuple(b0[s].shape[:-1]), positions, sinks, n_draws, seed, match)
                for s in sites]
    n_copies = sum(len(u[1]) for u in per_site)
    plan = Plan(n_copies)
    labels, units, draws = [], [], []
    c = 0
    for site, (unit_name, us, ds, m) in zip(sites, per_site):
        mask = torch.zeros(n_copies, *m.shape[1:], dtype=torch.bool)
        mask[c:c + len(us)] = m
        plan.writes.append(Write(site, mask, s0[site]))
        labels += [site] * len(us)
        units += list(us)
        draws += list(ds)
        c += len(us)
    out = execute(model, base, plan, metric, b0["targets"], inputs=b0["inputs"], clean_next=b0["next"],
                  rows_per_forward=rows_per_forward)
    frame = _frame(labels, units, draws, per_site[0][0], out["value"], b0["value"], s0["value"])
    return PatchResult(frame, {"sites": sites, "positions": positions if isinstance(positions, str) else list(positions),
                               "metric": metric.to_dict(), "n_draws": n_draws, "seed": seed}, per_site[0][0])


def path_patch(model, base, source, layers: Sequence[int | Sequence[int]] | None = None, *, sinks=None,
               tokens: Sequence[str] = ("sinks", "random", "image"), metric: Metric | str | None = None,
               n_draws: int = 4, seed: int = 0, match: Sequence[str] = (), rows_per_forward: int = 64) -> PatchResult:
    """Let the source's values at a token set reach only chosen LLM layers.

    For each entry of ``layers`` (a layer or a list of layers; default each layer alone) the token
    positions' residual stream is set to the source run's at the input of those layers and put
    back to the base run's at their outputs. The tokens' own stream stays base everywhere else, so
    the source information can enter only through what those layers' other positions read from
    them (attention). One row per layer set x token set x draw x sample.
    """
    metric = Metric.coerce(metric)
    check_pair(base, source)
    conds = [[l] if isinstance(l, (int, np.integer)) else list(l) for l in (range(model.n_llm_layers) if layers is None else layers)]
    used = sorted({int(l) for c in conds for l in c})
    if any(not 0 <= l < model.n_llm_layers for l in used):
        raise PatchError(f"layers must lie in 0..{model.n_llm_layers - 1}")
    pre = {l: f"llm.blocks.{l}.hook_resid_pre" for l in used}
    post = {l: f"llm.blocks.{l}.hook_resid_post" for l in used}
    b0 = clean(model, base, metric, read=list(post.values()))
    s0 = source_run(model, source, metric, b0, read=list(pre.values()))
    cfg = PatchConfig(sites=("proj.out",), tokens=tuple(tokens), metric=metric, n_draws=n_draws, seed=seed, match=tuple(match))
    names, draws, select = _selections(model, base, source, cfg, sinks)
    tm = base.token_map
    shape = tuple(b0["inputs"].embeds.shape[:2])
    sets = tm.mask("llm", select, shape)                            # [n_sets, B, S]
    n_sets = len(names)
    plan = Plan(len(conds) * n_sets)
    for l in used:
        mask = torch.zeros(plan.n_copies, *shape, dtype=torch.bool)
        for k, c in enumerate(conds):
            if l in c:
                mask[k * n_sets:(k + 1) * n_sets] = sets
        plan.writes.append(Write(pre[l], mask, s0[pre[l]]))
        plan.writes.append(Write(post[l], mask, b0[post[l]]))
    out = execute(model, base, plan, metric, b0["targets"], inputs=b0["inputs"], clean_next=b0["next"],
                  rows_per_forward=rows_per_forward)
    labels = [f"llm.layers.{'+'.join(map(str, c))}" for c in conds for _ in range(n_sets)]
    first = [c[0] if len(c) == 1 else -1 for c in conds for _ in range(n_sets)]
    frame = _frame(labels, names * len(conds), draws * len(conds), "tokens", out["value"], b0["value"], s0["value"],
                   np.tile(_counts(tm, select), (len(conds), 1)), layers=first)
    return PatchResult(frame, {"layers": conds, "tokens": list(tokens), "metric": metric.to_dict(),
                               "n_draws": n_draws, "seed": seed}, "tokens")


# -- the CLI's entry point ------------------------------------------------------------------------------
CORRUPTIONS = ("shuffle", "noise", "blank")


def corrupt(images: Sequence, how: str = "shuffle", seed: int = 0) -> list:
    """Source images for patching: ``shuffle`` (another image of the list, never the same one),
    ``noise`` (uniform noise of the same size) or ``blank`` (flat mid-grey)."""
    from PIL import Image
    if how not in CORRUPTIONS:
        raise PatchError(f"unknown corruption {how!r}; use {', '.join(CORRUPTIONS)}")
    rng = np.random.default_rng(seed)
    if how == "shuffle":
        if len(images) < 2:
            raise PatchError("shuffle needs at least two images")
        perm = rng.permutation(len(images))
        while (perm == np.arange(len(images))).any():
            perm = rng.permutation(len(images))
        return [images[i] for i in perm]
    out = []
    for im in images:
        w, h = im.size
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if how == "noise" else np.full((h, w, 3), 128, np.uint8)
        out.append(Image.fromarray(a, "RGB"))
    return out


def with_images(model, batch, images: Sequence):
    """A batch like ``batch`` (same prompts, answers and token roles) with other images: the
    natural source for patching."""
    if len(images) != batch.size:
        raise PatchError(f"{len(images)} images for a batch of {batch.size}")
    out = model.prepare(images, batch.prompts)          # prompts already hold the placeholder and answers
    if out.inputs["input_ids"].shape != batch.inputs["input_ids"].shape:
        raise PatchError("the new images change the prompt layout; use images of the same size")
    out.token_map.roles = batch.token_map.roles.copy()
    out.answers = list(batch.answers) if batch.answers is not None else None
    return out


def patch_command(model_name, data, *, source: str | None = None, corruption: str = "shuffle",
                  sites: Sequence[str] = ("proj.out",), tokens: Sequence[str] = ("sinks", "random", "image"),
                  metric: str = "logprob", answers: Sequence[str] | None = None, draws: int = 8,
                  sweep_positions: str | None = None, sinks=None, rule: str | None = None, limit: int | None = None,
                  batch_size: int = 8, seed: int = 0, out: str | None = None, device: str | None = None,
                  dtype: str | None = None, errors=None) -> dict:
    """Patch from source into base on a dataset; returns a JSON-ready summary.

    Base = the dataset's samples (with their prompts and answers); source = the same prompts with
    the images of ``source`` (a dataset of the same length, in order) or corrupted images
    (``corruption``: shuffle | noise | blank). With ``sweep_positions`` ("patches", "all" or
    comma-separated token sets) every site x position is patched instead of whole token sets.
    Output: {"recovery": {site: {unit: value}}, "effect": {...}, "n", "metric", "unit", ...}.
    """
    from . import load
    from .ablation import iter_batches
    from .data import ErrorLog, iter_images, open_dataset
    model = model_name if hasattr(model_name, "prepare") else load(model_name, device=device, dtype=dtype)
    ds = data if hasattr(data, "__getitem__") and not isinstance(data, (str, os.PathLike)) else open_dataset(data, limit=limit)
    errors = errors if errors is not None else ErrorLog()
    if sinks is None and rule is not None:
        from .sinks.detect import SinkSpec
        sinks = SinkSpec.from_options(rule)
    m = Metric(metric, **({"answers": tuple(answers)} if answers else {}))
    src_images = None
    if source is not None:
        sds = open_dataset(source, limit=limit)
        src_images = {s.id: im for s, im in iter_images(sds, errors=errors)}
        order = list(src_images.values())
    frames, k, unit = [], 0, "tokens"
    for batch, ids in iter_batches(model, ds, batch_size, errors)():
        if source is not None:
            imgs = order[k:k + batch.size]
            if len(imgs) != batch.size:
                raise PatchError(f"the source dataset has fewer readable images than the base ({len(order)})")
        else:
            imgs = corrupt([g[0] for g in batch.images], corruption, seed + k)
        src = with_images(model, batch, imgs)
        if sweep_positions is None:
            res = patch(model, batch, src, sinks, PatchConfig(sites=tuple(sites), tokens=tuple(tokens), metric=m,
                                                                n_draws=draws, seed=seed))
        else:
            pos = sweep_positions if sweep_positions in ("patches", "all") else sweep_positions.split(",")
            res = sweep(model, batch, src, list(sites), positions=pos, sinks=sinks, metric=m, n_draws=draws, seed=seed)
        unit = res.unit
        frames.append(res.frame.assign(sample=res.frame["sample"] + k, id=[str(ids[i]) for i in res.frame["sample"]]))
        k += batch.size
        if out is not None:
            PatchResult(pd.concat(frames, ignore_index=True), {"metric": m.to_dict()}, unit).save(out)
    if not frames:
        raise PatchError("no data to patch")
    res = PatchResult(pd.concat(frames, ignore_index=True), {"metric": m.to_dict()}, unit)
    if out is not None:
        res.save(out)

    def nested(t: pd.DataFrame) -> dict:
        return {str(s): {str(u): (None if not np.isfinite(v) else float(v)) for u, v in row.items()} for s, row in t.iterrows()}
    return {"recovery": nested(res.table("recovery")), "effect": nested(res.table("effect")), "n": k, "unit": unit,
            "metric": m.name, "source": source or corruption, "sites": list(sites), "n_unreadable": len(errors),
            "model": model.name, "data": getattr(ds, "name", None)}
