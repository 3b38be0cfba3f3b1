"""Sinks vs matched random tokens: how much does removing them move the model's answer?

    cfg = AblationConfig(site="proj.out", mode="zero", n_draws=32, match=("border",))
    res = ablate(model, dataset, sinks=SinkSpec(), config=cfg)
    res.summary()          # Comparison: sink / random / diff means with bootstrap CIs, p-value
    res.frame              # one row per sample x condition x draw
    res.figure()           # sink vs random effect with CIs

Modes remove a token set at a site: ``zero``; ``mean`` (the dataset mean at that site and patch
cell); ``resample`` (the same cells of another image of the batch); ``drop`` (the tokens are deleted
from the LLM sequence and positions re-indexed); ``knockout`` (LLM attention from every other token
to them is masked at ``layers``). For every sample the sinks are compared with ``n_draws`` random
sets of non-sink patches *matched* on count and, optionally, on spatial distribution (``border``,
``row``), foreground/background (``foreground``) and a norm-quantile band among non-sinks.

The effect of a set is ``metric.effect(ablated, clean)`` (positive = the answer got worse). The
statistics pair each sample's sink effect with the mean of its random effects: bootstrap CIs over
samples and a sign-flip permutation test of "sink effect > random effect" (mechsink.stats).

All draws of a batch run as stacked copies in a few forwards; when the site is ``proj.out`` or in
the LLM, the ViT and projector run once per batch and the copies run the LLM alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
import pandas as pd
import torch

from .atomic import write_parquet, write_text
from .errors import MechsinkError
from .metrics import Metric
from .engine import Plan, Write, clean, execute
from .patching import PatchError
from .trace import llm_inputs
from .sites import Site
from .tokens import _AXIS_COLUMNS

log = logging.getLogger("mechsink")

MODES = ("zero", "mean", "resample", "drop", "knockout")
MATCH = ("border", "row", "foreground")


class AblationError(PatchError):
    """Bad ablation input (unknown mode or matching key, too few candidates, missing columns)."""


@dataclass(frozen=True)
class AblationConfig:
    """One ablation experiment (serialisable; ``fingerprint`` hashes it for manifests).

    site: where tokens are removed (``zero``/``mean``/``resample``): a ViT site, ``vit.out``,
    ``proj.out`` or an LLM site; ``drop`` works at ``proj.out``/``llm.embed``; ``knockout`` ignores it.
    layers: LLM layers for ``knockout`` (None = all). match: extra matching keys for the random
    controls (see MATCH). norm_band: (lo, hi) quantiles -- draw controls only among non-sinks whose
    norm lies in that band of the image's non-sink norms.
    """
    site: str = "proj.out"
    mode: str = "zero"
    metric: Metric = field(default_factory=Metric)
    n_draws: int = 32
    match: tuple[str, ...] = ()
    norm_band: tuple[float, float] | None = None
    layers: tuple[int, ...] | None = None
    seed: int = 0
    batch_size: int = 8
    rows_per_forward: int = 64
    n_boot: int = 2000
    n_perm: int = 10000
    alpha: float = 0.05
    alternative: str = "greater"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if self.mode not in MODES:
            raise AblationError(f"unknown ablation mode {self.mode!r}; modes: {', '.join(MODES)}")
        set_("metric", Metric.coerce(self.metric))
        site = Site.parse(self.site)
        if site.kind in ("pattern", "logits"):
            raise AblationError(f"cannot ablate tokens at {site}: it holds attention patterns or logits")
        if self.mode == "drop" and str(site) not in ("proj.out", "llm.embed"):
            raise AblationError(f"drop deletes tokens from the LLM sequence: use site proj.out or llm.embed, not {site}")
        set_("site", str(site))
        bad = set(self.match) - set(MATCH)
        if bad:
            raise AblationError(f"unknown matching key(s) {sorted(bad)}; use {', '.join(MATCH)}")
        set_("match", tuple(dict.fromkeys(self.match)))
        if self.norm_band is not None:
            lo, hi = (float(v) for v in self.norm_band)
            if not 0.0 <= lo < hi <= 1.0:
                raise AblationError(f"norm_band must be quantiles 0 <= lo < hi <= 1, got {self.norm_band}")
            set_("norm_band", (lo, hi))
        if self.layers is not None:
            set_("layers", tuple(int(l) for l in self.layers))
        if self.n_draws < 1:
            raise AblationError(f"n_draws must be at least 1, got {self.n_draws}")
        if self.batch_size < 1 or self.rows_per_forward < 1:
            raise AblationError("batch_size and rows_per_forward must be positive")
        if self.mode == "resample" and self.batch_size < 2:
            raise AblationError("resample takes values from another image of the batch: batch_size must be >= 2")

    @property
    def axis(self) -> str:
        """The token axis the token sets live on."""
        return "llm" if self.mode in ("drop", "knockout") else Site.parse(self.site).axis

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metric"] = self.metric.to_dict()
        d["match"] = list(self.match)
        d["norm_band"] = list(self.norm_band) if self.norm_band else None
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AblationConfig":
        d = dict(d)
        for k in ("match", "norm_band", "layers"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        d["metric"] = Metric.coerce(d.get("metric"))
        return cls(**d)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# -- token sets ------------------------------------------------------------------------------------
SinkSource = Any   # SinkSpec | SinkSet | Callable[[model, batch], SinkSet | DataFrame] | Sequence[int] | None


def token_table(model, batch, sinks: SinkSource = None, foreground: Callable | None = None) -> pd.DataFrame:
    """The batch's patch table with ``patch`` (row-major index in its grid), ``is_sink`` and, when
    known, ``norm`` and ``foreground``; rows in ``batch.token_map.patches`` order.

    sinks: a SinkSpec (detected here, one forward), a SinkSet of this batch, a function
    (model, batch) -> SinkSet or DataFrame, fixed patch indices (e.g. planted sinks), or None
    (detection with the default SinkSpec). foreground: (model, batch) -> bool per patch row.
    """
    tm = batch.token_map
    if sinks is None or type(sinks).__name__ == "SinkSpec":
        from .sinks.detect import detect
        table = detect(model, batch, sinks).patches
    elif hasattr(sinks, "patches"):
        table = sinks.patches
    elif callable(sinks):
        got = sinks(model, batch)
        table = got.patches if hasattr(got, "patches") else got
    else:
        fixed = {int(p) for p in sinks}
        table = tm.patches.copy()
        table["patch"] = _patch_index(tm)
        table["is_sink"] = table["patch"].isin(fixed)
    if not isinstance(table, pd.DataFrame) or "is_sink" not in table.columns:
        raise AblationError("the sink source must give a patch table with an is_sink column")
    if len(table) != len(tm.patches) or not np.array_equal(table["llm_pos"].to_numpy(), tm.patches["llm_pos"].to_numpy()):
        raise AblationError("the sink table does not match this batch's patches; detect sinks on the same batch")
    table = table.reset_index(drop=True).copy()
    if "patch" not in table.columns:
        table["patch"] = _patch_index(tm)
    table["is_sink"] = table["is_sink"].astype(bool)
    if foreground is not None:
        fg = np.asarray(foreground(model, batch), dtype=bool)
        if fg.shape != (len(table),):
            raise AblationError(f"foreground gave {fg.shape} flags for {len(table)} patches")
        table["foreground"] = fg
    return table


def contrast_foreground(threshold: float = 0.1) -> Callable:
    """A foreground flag per patch from pixels: the patch's mean luminance differs from the image's
    median patch luminance by more than ``threshold`` (fraction of the 0-255 range). Fits images of
    objects on a plain background; for any-res tiles the whole image is gridded (approximate).
    Returns (model, batch) -> bool per row of ``batch.token_map.patches``."""
    def flags(model, batch) -> np.ndarray:
        tm = batch.token_map
        out = np.zeros(len(tm.patches), dtype=bool)
        for (s, i, t), idx in tm.patches.groupby(["sample", "image", "tile"]).indices.items():
            rows, cols = tm.grids[(s, i, t)]
            lum = np.asarray(batch.images[s][i].convert("L").resize((cols, rows), Image.BOX), dtype=float)
            fg = np.abs(lum - np.median(lum)) > threshold * 255
            p = tm.patches.iloc[idx]
            out[idx] = fg[p["row"].to_numpy(), p["col"].to_numpy()]
        return out
    return flags


def _patch_index(tm) -> np.ndarray:
    """Row-major index of each patch in its tile's grid (as SinkSet's ``patch`` column)."""
    from .sinks.detect import _patch_index as index
    return index(tm.patches, tm.grids)


def _strata(table: pd.DataFrame, tm, match: Sequence[str]) -> np.ndarray:
    """One integer key per patch row: patches may only stand in for sinks with the same key."""
    keys = [np.zeros(len(table), dtype=np.int64)]
    for m in match:
        if m == "border":
            grid = np.array([tm.grids.get((s, i, t), (0, 0)) for s, i, t in
                             zip(table["sample"], table["image"], table["tile"])]).reshape(-1, 2)
            r, c = table["row"].to_numpy(), table["col"].to_numpy()
            keys.append(((r == 0) | (c == 0) | (r == grid[:, 0] - 1) | (c == grid[:, 1] - 1)).astype(np.int64))
        elif m == "row":
            keys.append(table["row"].to_numpy().astype(np.int64))
        elif m == "foreground":
            if "foreground" not in table.columns:
                raise AblationError("matching on foreground needs a foreground flag per patch (pass foreground=...)")
            keys.append(table["foreground"].to_numpy().astype(np.int64))
    return np.unique(np.stack(keys, 1), axis=0, return_inverse=True)[1].reshape(-1)


def draw_controls(table: pd.DataFrame, tm, n_draws: int, *, axis: str, match: Sequence[str] = (),
                  norm_band: tuple[float, float] | None = None, seed: int = 0,
                  sample_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sinks and matched random controls as patch-row selections.

    Returns (select [1 + n_draws, n_rows] bool: row 0 the sinks, row 1 + k draw k; valid [B] bool;
    reason [B]: why a sample is invalid, "" otherwise). Every draw picks, per stratum, as many
    non-sinks as there are sinks in that stratum, without replacement. Draws for a sample depend
    only on (seed, its global index in ``sample_ids``), not on batching.
    """
    pos = table[_AXIS_COLUMNS[axis][1]].to_numpy()
    on_axis = pos >= 0
    strata = _strata(table, tm, match)
    is_sink = table["is_sink"].to_numpy() & on_axis
    samples = table["sample"].to_numpy()
    n_samples = int(tm.roles.shape[0])
    ids = list(range(n_samples)) if sample_ids is None else list(sample_ids)
    select = np.zeros((1 + n_draws, len(table)), dtype=bool)
    select[0] = is_sink
    valid = np.ones(n_samples, dtype=bool)
    reason = [""] * n_samples
    for s in range(n_samples):
        rows = np.nonzero(samples == s)[0]
        sinks = rows[is_sink[rows]]
        cands = rows[on_axis[rows] & ~is_sink[rows]]
        if len(sinks) == 0:
            valid[s], reason[s] = False, "no sinks"
            continue
        if norm_band is not None:
            if "norm" not in table.columns:
                raise AblationError("norm_band needs a norm column: detect sinks with a SinkSpec")
            norms = table["norm"].to_numpy()[cands]
            q = pd.Series(norms).rank(pct=True, method="average").to_numpy()
            cands = cands[(q >= norm_band[0]) & (q <= norm_band[1])]
        rng = np.random.default_rng([seed, int(ids[s])])
        for key in np.unique(strata[sinks]):
            need = int((strata[sinks] == key).sum())
            pool = cands[strata[cands] == key]
            if len(pool) < need:
                valid[s], reason[s] = False, f"too few matched controls ({len(pool)} for {need} sinks)"
                break
            picks = np.argsort(rng.random((n_draws, len(pool))), axis=1)[:, :need]
            select[1 + np.repeat(np.arange(n_draws), need), pool[picks].reshape(-1)] = True
        if not valid[s]:
            select[1:, rows] = False
    return select, valid, reason


# -- replacement values -----------------------------------------------------------------------------
def _site_index(tm, axis: str) -> tuple[torch.Tensor, ...]:
    """Index of every patch row on a site tensor (rows without a token there are dropped)."""
    item_col, pos_col = _AXIS_COLUMNS[axis]
    p = tm.patches
    ok = p[pos_col].to_numpy() >= 0
    pos = torch.tensor(p[pos_col].to_numpy()[ok], dtype=torch.long)
    if axis != "llm" and bool((p[item_col].to_numpy()[ok] < 0).all()):
        return (pos,)
    return torch.tensor(p[item_col].to_numpy()[ok], dtype=torch.long), pos


_CELL = ["image", "tile", "row", "col"]


def cell_means(model, batches: Iterable, site: str) -> dict[tuple, torch.Tensor]:
    """Dataset mean activation at ``site`` per patch cell (image, tile, row, col): one forward per batch."""
    axis = Site.parse(site).axis
    sums: dict[tuple, torch.Tensor] = {}
    counts: dict[tuple, int] = {}
    for batch in batches:
        x = model.run(batch, read=[site])[site]
        tm = batch.token_map
        ok = tm.patches[_AXIS_COLUMNS[axis][1]].to_numpy() >= 0
        vals = x[_site_index(tm, axis)].detach().float().cpu()
        for key, v in zip(tm.patches.loc[ok, _CELL].itertuples(index=False, name=None), vals):
            sums[key] = sums.get(key, 0) + v
            counts[key] = counts.get(key, 0) + 1
    if not sums:
        raise AblationError(f"no image tokens at {site} to average")
    return {k: sums[k] / counts[k] for k in sums}


def _values(model, batch, cfg: AblationConfig, means: dict | None, seed: int,
            x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(site tensor of the clean batch, replacement values of the same shape or None for zeros).
    ``x``: the clean site tensor when already at hand (else one forward reads it)."""
    if x is None:
        x = model.run(batch, read=[cfg.site])[cfg.site].detach()
    tm = batch.token_map
    axis = Site.parse(cfg.site).axis
    if cfg.mode == "zero":
        return x, None
    idx = _site_index(tm, axis)
    ok = tm.patches[_AXIS_COLUMNS[axis][1]].to_numpy() >= 0
    cells = list(tm.patches.loc[ok, _CELL].itertuples(index=False, name=None))
    v = x.clone()
    if cfg.mode == "mean":
        missing = [c for c in cells if c not in means]
        if missing:
            raise AblationError(f"no dataset mean for patch cell {missing[0]} at {cfg.site}")
        v[idx] = torch.stack([means[c] for c in cells]).to(v)
        return x, v
    # resample: the same cells of another image of this batch (a seeded derangement of the samples)
    b = batch.size
    if b < 2:
        raise AblationError("resample needs at least two images per batch")
    rng = np.random.default_rng([seed, 7919])
    perm = rng.permutation(b)
    while (perm == np.arange(b)).any():
        perm = rng.permutation(b)
    p = tm.patches.loc[ok].reset_index(drop=True)
    where = {(int(s), *c): j for j, (s, *c) in enumerate(p[["sample", *_CELL]].itertuples(index=False, name=None))}
    donor = []
    for s, *c in p[["sample", *_CELL]].itertuples(index=False, name=None):
        key = (int(perm[s]), *c)
        if key not in where:
            raise AblationError(f"resample: image {perm[s]} has no patch cell {tuple(c)}; images need the same grid")
        donor.append(where[key])
    donor = torch.tensor(donor, dtype=torch.long)
    v[idx] = x[tuple(i[donor] for i in idx)]
    return x, v


# -- the experiment --------------------------------------------------------------------------------
@dataclass
class AblationResult:
    """Tidy results: ``frame`` has one row per sample x condition ("sink", "random") x draw with
    columns batch, sample, id, condition, draw, n_tokens, patches, value, clean, effect, valid, reason."""
    frame: pd.DataFrame
    config: AblationConfig
    model: str = ""

    def effects(self) -> tuple[np.ndarray, np.ndarray, pd.Index]:
        """(sink effect [n], random effects [n, n_draws], sample index) over the valid samples."""
        f = self.frame[self.frame["valid"]]
        if f.empty:
            raise AblationError("no valid samples: every sample lacked sinks or matched controls")
        sink = f[f["condition"] == "sink"].set_index("sample")["effect"].sort_index()
        rand = f[f["condition"] == "random"].pivot(index="sample", columns="draw", values="effect").sort_index()
        return sink.to_numpy(), rand.loc[sink.index].to_numpy(), sink.index

    def summary(self, **kw):
        """mechsink.stats.Comparison of sink vs random effects (bootstrap CIs, permutation p)."""
        from .stats import compare_paired
        sink, rand, _ = self.effects()
        c = self.config
        args = dict(n_boot=c.n_boot, n_perm=c.n_perm, alpha=c.alpha, alternative=c.alternative, seed=c.seed)
        return compare_paired(sink, rand, **{**args, **kw})

    @property
    def label(self) -> str:
        c = self.config
        where = f"L{','.join(map(str, c.layers))}" if c.mode == "knockout" and c.layers is not None else \
            ("llm" if c.mode == "knockout" else c.site)
        return f"{c.mode} @ {where}"

    def to_dict(self) -> dict:
        """JSON-ready: sink_effect, random_effect, diff ({mean, ci_low, ci_high}), p_value, n, ..."""
        s = self.summary()
        d = s.to_dict()
        f = self.frame
        out = {"sink_effect": d["sink"], "random_effect": d["random"], "diff": d["diff"], "p_value": d["p_value"],
               "n": d["n"], "n_draws": d["n_draws"], "test": d["test"], "alternative": d["alternative"],
               "alpha": d["alpha"], "metric": self.config.metric.name,
               "clean_metric": float(f.drop_duplicates("sample")["clean"].mean()),
               "n_skipped": int(f.loc[~f["valid"], "sample"].nunique()),
               "mean_sinks": float(f.loc[f["valid"] & (f["condition"] == "sink"), "n_tokens"].mean()),
               "model": self.model, "config": self.config.to_dict()}
        return out

    def figure(self):
        """Sink vs random effect (and their difference) with CIs (seaborn / matplotlib Figure)."""
        from .report.figures import effect_plot
        from .stats import comparison_frame
        return effect_plot(comparison_frame({self.label: self.summary()}), ylabel=f"effect on {self.config.metric.name}")

    def save(self, path: str | os.PathLike, *, summary: bool = True) -> Path:
        """Write results.parquet and summary.json (atomically) into a directory; with
        ``summary=False`` (a run in progress) the JSON holds only the config."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_parquet(path / "results.parquet", self.frame)
        meta = {"config": self.config.to_dict(), "model": self.model, "partial": not summary}
        if summary:
            try:
                meta = self.to_dict()
            except MechsinkError as e:      # the frame is kept even when statistics cannot be had
                meta["error"] = str(e)
        write_text(path / "summary.json", json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AblationResult":
        path = Path(path)
        meta = json.loads((path / "summary.json").read_text())
        return cls(pd.read_parquet(path / "results.parquet"), AblationConfig.from_dict(meta["config"]), meta.get("model", ""))


def iter_batches(model, data, batch_size: int = 8, errors=None) -> Callable[[], Iterator[tuple[Any, list]]]:
    """A re-iterable over (Batch, sample ids) from a Batch, a list of Batches or a mechsink
    Dataset / list of Samples (prepared with their prompts and, when all have one, answers)."""
    from .models.base import Batch
    if isinstance(data, Batch):
        data = [data]
    data = list(data) if not hasattr(data, "__getitem__") else data
    if len(data) and all(isinstance(b, Batch) for b in data):
        def from_batches():
            k = 0
            for b in data:
                yield b, list(range(k, k + b.size))
                k += b.size
        return from_batches

    def from_samples():
        from .data import iter_images
        chunk: list = []
        for sample, image in iter_images(data, errors=errors):
            chunk.append((sample, image))
            if len(chunk) == batch_size:
                yield _prepare(model, chunk)
                chunk = []
        if chunk:
            yield _prepare(model, chunk)
    return from_samples


def _prepare(model, chunk):
    answers = [s.answer for s, _ in chunk]
    batch = model.prepare([im for _, im in chunk], prompts=[s.prompt for s, _ in chunk],
                          answers=answers if all(a is not None for a in answers) else None)
    return batch, [s.id for s, _ in chunk]


def ablate(model, data, sinks: SinkSource = None, config: AblationConfig | None = None, *,
           foreground: Callable | None = None, out: str | os.PathLike | None = None, progress: bool = False,
           errors=None, **overrides) -> AblationResult:
    """Ablate sinks and matched random controls on every sample of ``data``.

    data: a Batch, a list of Batches, or a Dataset / list of Samples. sinks: see ``token_table``.
    config: AblationConfig (keyword overrides such as ``mode="mean"`` are applied on top).
    out: a directory; results are saved there after every batch, so an interrupted run keeps
    what it finished. errors: a mechsink.data.ErrorLog that records unreadable images.
    Returns an AblationResult.
    """
    cfg = replace(config or AblationConfig(), **overrides) if overrides else (config or AblationConfig())
    batches = iter_batches(model, data, cfg.batch_size, errors)
    means = cell_means(model, (b for b, _ in batches()), cfg.site) if cfg.mode == "mean" else None
    frames: list[pd.DataFrame] = []
    offset = 0
    it = batches()
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"ablate {cfg.mode}")
    for k, (batch, ids) in enumerate(it):
        frames.append(_ablate_batch(model, batch, ids, cfg, sinks, foreground, means, k, offset))
        offset += batch.size
        if out is not None:
            AblationResult(pd.concat(frames, ignore_index=True), cfg, model.name).save(out, summary=False)
    if not frames:
        raise AblationError("no data to ablate")
    result = AblationResult(pd.concat(frames, ignore_index=True), cfg, model.name)
    if out is not None:
        result.save(out)
    return result


def _ablate_batch(model, batch, ids, cfg: AblationConfig, sinks, foreground, means, k: int, offset: int) -> pd.DataFrame:
    tm = batch.token_map
    table = token_table(model, batch, sinks, foreground)
    gidx = list(range(offset, offset + batch.size))
    select, valid, reason = draw_controls(table, tm, cfg.n_draws, axis=cfg.axis, match=cfg.match,
                                          norm_band=cfg.norm_band, seed=cfg.seed, sample_ids=gidx)
    base, x = _clean_with_site(model, batch, cfg)
    plan = _plan(model, batch, cfg, select, means, base, seed=cfg.seed + k, x=x)
    res = execute(model, batch, plan, cfg.metric, base["targets"], inputs=base["inputs"], clean_next=base["next"],
                  rows_per_forward=cfg.rows_per_forward)
    value = res["value"]                                                 # [1 + K, B]
    effect = cfg.metric.effect(value, base["value"][None])
    samples = table["sample"].to_numpy()
    patch = table["patch"].to_numpy()
    rows = []
    for c in range(select.shape[0]):
        for s in range(batch.size):
            chosen = np.sort(patch[select[c] & (samples == s)])
            rows.append({"batch": k, "sample": gidx[s], "id": str(ids[s]), "condition": "sink" if c == 0 else "random",
                         "draw": max(c - 1, 0), "n_tokens": len(chosen), "patches": " ".join(map(str, chosen)),
                         "value": float(value[c, s]), "clean": float(base["value"][s]),
                         "effect": float(effect[c, s]), "valid": bool(valid[s]), "reason": reason[s]})
    return pd.DataFrame(rows)


def _clean_with_site(model, batch, cfg: AblationConfig) -> tuple[dict, torch.Tensor | None]:
    """The clean run and, when it comes without another forward, the clean tensor at ``cfg.site``:
    ``proj.out`` is caught while the ViT and projector run for the LLM inputs, an LLM site is read
    in the clean LLM run. None otherwise (ViT sites, drop, knockout)."""
    site = Site.parse(cfg.site)
    if cfg.mode in ("drop", "knockout") or site.part == "vit":
        return clean(model, batch, cfg.metric), None
    if site.part == "llm":
        base = clean(model, batch, cfg.metric, read=[cfg.site])
        return base, base[cfg.site].detach()
    path, io, idx = model.locate(site)
    got: dict = {}

    def keep(mod, args, out):
        value = out if io == "output" else args[0]
        got.setdefault("x", value[idx or 0] if isinstance(value, tuple) else value)
    hook = model.module(path).register_forward_hook(keep)
    try:
        inputs = llm_inputs(model, batch)
    finally:
        hook.remove()
    return clean(model, batch, cfg.metric, inputs=inputs), got["x"].detach() if "x" in got else None


def _plan(model, batch, cfg: AblationConfig, select: np.ndarray, means, base: dict, seed: int,
          x: torch.Tensor | None = None) -> Plan:
    tm = batch.token_map
    c = select.shape[0]
    if cfg.mode in ("drop", "knockout"):
        shape = tuple(base["inputs"].embeds.shape[:2])
        m = tm.mask("llm", select, shape)
        if cfg.mode == "drop":
            return Plan(c, drop=m)
        return Plan(c, knockout=m, knockout_layers=cfg.layers)
    x, values = _values(model, batch, cfg, means, seed, x)
    axis = Site.parse(cfg.site).axis
    return Plan(c, [Write(cfg.site, tm.mask(axis, select, tuple(x.shape[:-1])), values)])


# -- the CLI's entry point ----------------------------------------------------------------------------
def ablate_command(model_name, data, *, site: str = "proj.out", mode: str = "zero", draws: int = 32,
                   metric: str = "logprob", answers: Sequence[str] | None = None, teacher_forced: bool = False,
                   match: Sequence[str] = (), norm_band: tuple[float, float] | None = None,
                   layers: Sequence[int] | None = None, sinks: Any = None, rule: str | None = None,
                   limit: int | None = None, batch_size: int = 8, seed: int = 0, out: str | None = None,
                   device: str | None = None, dtype: str | None = None, errors=None) -> dict:
    """Run ``ablate`` from plain options; returns the JSON-ready summary (sink_effect,
    random_effect and diff with mean/ci_low/ci_high, p_value, n, ...).

    sinks: fixed patch indices, a SinkSpec, or None (detected with ``rule``, a sink rule or preset).
    """
    from . import load
    from .data import open_dataset
    model = model_name if hasattr(model_name, "prepare") else load(model_name, device=device, dtype=dtype)
    ds = data if hasattr(data, "__getitem__") and not isinstance(data, (str, os.PathLike)) else open_dataset(data, limit=limit)
    if sinks is None and rule is not None:
        from .sinks.detect import SinkSpec
        sinks = SinkSpec.from_options(rule)
    m = Metric(metric, **({"answers": tuple(answers)} if answers else {}), teacher_forced=teacher_forced)
    cfg = AblationConfig(site=site, mode=mode, metric=m, n_draws=draws, match=tuple(match),
                         norm_band=tuple(norm_band) if norm_band else None,
                         layers=tuple(layers) if layers is not None else None, seed=seed, batch_size=batch_size)
    from .data import ErrorLog
    errors = errors if errors is not None else ErrorLog()
    res = ablate(model, ds, sinks, cfg, out=out, errors=errors)
    d = res.to_dict()
    d["data"] = getattr(ds, "name", None)
    d["n_unreadable"] = len(errors)
    return d
