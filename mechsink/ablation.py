"""Sinks vs matched random tokens: how much does removing them move the model's answer?

    cfg = AblationConfig(site="proj.out", mode="zero", n_draws=32, match=("border",))
    res = ablate(model, dataset, cfg, sinks=SinkSpec())
    res.comparison()       # stats.Comparison: sink / random / diff means with bootstrap CIs, p-value
    res.summary()          # the same as JSON (sink_effect, random_effect, diff, p_value, n, ...)
    res.frame              # one row per sample x condition x draw
    plot(res)              # mechsink.report.figures: sink vs random effect with CIs

Modes remove a token set at a site: ``zero``; ``mean`` (the dataset mean at that site and patch
cell); ``resample`` (the same cells of another image of the batch); ``drop`` (the tokens are deleted
from the LLM sequence and positions re-indexed); ``knockout`` (LLM attention from every other token
to them is masked at ``layers``). For every sample the sinks are compared with ``n_draws`` random
sets of non-sink patches *matched* on count and, optionally, on spatial distribution (``border``,
``row``), foreground/background (``foreground``) and a norm-quantile band among non-sinks -- the
``random(match=..., norm_band=...)`` selection of ``mechsink.selection``.

The effect of a set is ``metric.effect(ablated, clean)`` (positive = the answer got worse). The
statistics pair each sample's sink effect with the mean of its random effects: bootstrap CIs over
samples and a sign-flip permutation test of "sink effect > random effect" (mechsink.stats).

All draws of a batch run as stacked copies in a few forwards; when the site is ``proj.out`` or in
the LLM, the ViT and projector run once per batch and the copies run the LLM alone.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

import numpy as np
import pandas as pd
import torch

from .batching import batches
from .config import Config, coerce
from .distributed import fail_together, gather_frames, rank, world
from .engine import Plan, Write, clean, execute
from .errors import MechsinkError
from .metrics import Metric
from .results import Result
from .selection import Selection, SinkSource, contrast_foreground, draw_random, sink_table
from .sites import Site
from .stats import image_keys
from .tokens import axis_columns
from .trace import capture, llm_inputs

MODES = ("zero", "mean", "resample", "drop", "knockout")
CHECKPOINT_S = 30.0     # how often ``ablate(out=...)`` saves the rows finished so far


class AblationError(MechsinkError, ValueError):
    """Bad ablation input (unknown mode, no valid samples, missing dataset means)."""


@dataclass(frozen=True)
class AblationConfig(Config):
    """One ablation experiment (serialisable; ``fingerprint`` hashes it for manifests).

    site: where tokens are removed (``zero``/``mean``/``resample``): a ViT site, ``vit.out``,
    ``proj.out`` or an LLM site; ``drop`` works at ``proj.out``/``llm.embed``; ``knockout`` ignores it.
    layers: LLM layers for ``knockout`` (None = all). match, norm_band: how the random controls
    are matched (``controls``: the ``random(match, norm_band)`` selection).
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
        controls = Selection("random", match=self.match, norm_band=self.norm_band)     # validates both
        set_("match", controls.match)
        set_("norm_band", controls.norm_band)
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

    @property
    def controls(self) -> Selection:
        """The random selection the sinks are compared with."""
        return Selection("random", match=self.match, norm_band=self.norm_band)


# -- replacement values -----------------------------------------------------------------------------
_CELL = ["image", "tile", "row", "col"]


def _site_tensor(model, batch, site: str) -> torch.Tensor:
    """The clean tensor at ``site``: a forward stopped right after it (a full traced run for
    sites computed from others)."""
    if model.locate(Site.parse(site))[1] in ("input", "output"):
        return capture(model, batch.inputs, [site])[site].detach()
    return model.run(batch, read=[site])[site].detach()


def _rows(tm, axis: str) -> pd.DataFrame:
    """Patch rows with a token on ``axis``, one per token (merged patches: the first)."""
    item, pos = axis_columns(axis)
    p = tm.patches[tm.patches[pos] >= 0]
    return p.drop_duplicates([item, pos]).reset_index(drop=True)


def cell_means(model, batches: Iterable, site: str) -> dict[tuple, torch.Tensor]:
    """Dataset mean activation at ``site`` per patch cell (image, tile, row, col): one forward
    (stopped at the site) per batch."""
    axis = Site.parse(site).axis
    sums: dict[tuple, torch.Tensor] = {}
    counts: dict[tuple, int] = {}
    for batch in batches:
        tm = batch.token_map
        rows = tm.patches[tm.patches[axis_columns(axis)[1]] >= 0]
        vals = tm.gather(_site_tensor(model, batch, site), axis, rows).float().cpu()
        for key, v in zip(rows[_CELL].itertuples(index=False, name=None), vals):
            sums[key] = sums.get(key, 0) + v
            counts[key] = counts.get(key, 0) + 1
    if not sums:
        raise AblationError(f"no image tokens at {site} to average")
    return {k: sums[k] / counts[k] for k in sums}


def _values(model, batch, cfg: AblationConfig, means: dict | None, seed: int,
            x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(site tensor of the clean batch, replacement values of the same shape or None for zeros).
    ``x``: the clean site tensor when already at hand (else a forward reads it)."""
    if x is None:
        x = _site_tensor(model, batch, cfg.site)
    if cfg.mode == "zero":
        return x, None
    tm = batch.token_map
    axis = Site.parse(cfg.site).axis
    rows = _rows(tm, axis)
    cells = list(rows[_CELL].itertuples(index=False, name=None))
    v = x.clone()
    idx = tm.index(axis, rows)
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
    keyed = rows.set_index(["sample", *_CELL])
    donors = rows[["sample", *_CELL]].assign(sample=perm[rows["sample"].to_numpy()])
    missing = ~donors.set_index(["sample", *_CELL]).index.isin(keyed.index)
    if missing.any():
        s, *c = donors[missing].iloc[0]
        raise AblationError(f"resample: image {s} has no patch cell {tuple(c)}; images need the same grid")
    donor_rows = keyed.loc[pd.MultiIndex.from_frame(donors)].reset_index()
    v[idx] = tm.gather(x, axis, donor_rows).to(v)
    return x, v


# -- the experiment --------------------------------------------------------------------------------
@dataclass
class AblationResult(Result):
    """Tidy results: ``frame`` has one row per sample x condition ("sink", "random") x draw with
    columns batch, sample, id, image_key, condition, draw, n_tokens, patches, value, clean, effect,
    valid, reason. ``image_key`` names the sample's image (questions on one image share it; the
    statistics run over images). ``meta["model"]``: the model's name."""
    config_class: ClassVar[type | None] = AblationConfig

    def effects(self) -> tuple[np.ndarray, np.ndarray, pd.Index]:
        """(sink effect [n], random effects [n, n_draws], sample index) over the valid samples."""
        f = self.frame[self.frame["valid"]]
        if f.empty:
            raise AblationError("no valid samples: every sample lacked sinks or matched controls")
        sink = f[f["condition"] == "sink"].set_index("sample")["effect"].sort_index()
        rand = f[f["condition"] == "random"].pivot(index="sample", columns="draw", values="effect").sort_index()
        return sink.to_numpy(), rand.loc[sink.index].to_numpy(), sink.index

    def units(self) -> np.ndarray:
        """The image of every valid sample, in the order of ``effects()`` (a frame without
        ``image_key``, saved by an older version, counts every sample as its own image)."""
        _, _, idx = self.effects()
        f = self.frame
        if "image_key" not in f:
            return np.asarray(idx).astype(str)
        keys = f.drop_duplicates("sample").set_index("sample")["image_key"]
        return keys.loc[idx].astype(str).to_numpy()

    def comparison(self, *, by: str = "image", **kw):
        """mechsink.stats.Comparison of sink vs random effects (bootstrap CIs, permutation p), over
        images (``by="image"``: questions on one image averaged first) or, for comparison only,
        over questions (``by="question"``, which treats correlated questions as independent)."""
        from .stats import compare_paired
        sink, rand, _ = self.effects()
        c = self.config
        args = dict(n_boot=c.n_boot, n_perm=c.n_perm, alpha=c.alpha, alternative=c.alternative, seed=c.seed)
        if by == "image":
            args["units"] = self.units()
        elif by != "question":
            raise AblationError(f"by must be 'image' or 'question', got {by!r}")
        return compare_paired(sink, rand, **{**args, **kw})

    @property
    def label(self) -> str:
        c = self.config
        where = f"L{','.join(map(str, c.layers))}" if c.mode == "knockout" and c.layers is not None else \
            ("llm" if c.mode == "knockout" else c.site)
        return f"{c.mode} @ {where}"

    def summary(self) -> dict:
        """JSON-ready: sink_effect, random_effect, diff ({mean, ci_low, ci_high}), p_value, n, ..."""
        d = self.comparison().to_dict()
        f = self.frame
        return {"sink_effect": d["sink"], "random_effect": d["random"], "diff": d["diff"], "p_value": d["p_value"],
                "n": d["n"], "n_images": d["n"], "n_questions": d["n_obs"], "unit": d["unit"], "n_draws": d["n_draws"], "test": d["test"], "alternative": d["alternative"],
                "alpha": d["alpha"], "metric": self.config.metric.name,
                "clean_metric": float(f.drop_duplicates("sample")["clean"].mean()),
                "n_skipped": int(f.loc[~f["valid"], "sample"].nunique()),
                "mean_sinks": float(f.loc[f["valid"] & (f["condition"] == "sink"), "n_tokens"].mean())}


def ablate(model, data, config: AblationConfig | dict | None = None, *, sinks: SinkSource = None,
           foreground: Callable | None = None, errors=None, out: str | os.PathLike | None = None,
           progress: bool = False, **overrides) -> AblationResult:
    """Ablate sinks and matched random controls on every sample of ``data``.

    data: a Dataset / list of Samples, a Batch or a list of Batches (``mechsink.batching``).
    config: AblationConfig (keyword overrides such as ``mode="mean"`` are applied on top).
    sinks: the sink rule -- a SinkSpec (default SinkSpec()), a SinkSet, fixed patch indices or a
    callable (see ``selection.sink_table``). foreground: (model, batch) -> bool per patch, for
    ``match=("foreground",)`` (e.g. ``contrast_foreground()``). errors: a mechsink.data.ErrorLog
    that records skipped images. out: a directory; results are saved there every ``CHECKPOINT_S``
    seconds and when the run ends, stops on an error or is interrupted, so it keeps what it finished.
    """
    cfg = coerce(AblationConfig, config)
    cfg = cfg.replace(**overrides) if overrides else cfg
    if sinks is None:
        from .sinks.detect import SinkSpec
        sinks = SinkSpec()
    means = None
    if cfg.mode == "mean":
        from .data import ErrorLog
        means = cell_means(model, (c.batch for c in batches(model, data, cfg.batch_size, errors=ErrorLog())), cfg.site)
    frames: list[tuple[int, pd.DataFrame]] = []       # (chunk number, rows): merged over torchrun ranks
    meta = {"model": getattr(model, "name", "")}
    def checkpoint() -> None:
        if out is not None and world() == 1 and frames:
            AblationResult(pd.concat([f for _, f in frames], ignore_index=True), cfg, meta).save(out, summary=False)

    saved = time.monotonic()
    try:
        with fail_together():                          # an error on one rank is raised on every rank
            for chunk in batches(model, data, cfg.batch_size, errors=errors, shard=True,
                                 min_batch=2 if cfg.mode == "resample" else 1,  # resample pairs images in a batch
                                 progress=f"ablate {cfg.mode}" if progress else False):
                frames.append((chunk.number, _ablate_batch(model, chunk, chunk.number, cfg, sinks, foreground, means)))
                # every CHECKPOINT_S, not every batch: rewriting the whole frame per batch is quadratic
                if time.monotonic() - saved >= CHECKPOINT_S:
                    checkpoint()
                    saved = time.monotonic()
    except BaseException:
        checkpoint()                                   # an interrupt or an error keeps what was finished
        raise
    frame = gather_frames(frames)
    if frame.empty:
        raise AblationError("no data to ablate")
    result = AblationResult(frame, cfg, meta)
    if out is not None and rank() == 0:
        result.save(out)
    return result


def _ablate_batch(model, chunk, k: int, cfg: AblationConfig, sinks, foreground, means) -> pd.DataFrame:
    batch = chunk.batch
    tm = batch.token_map
    table = sink_table(model, batch, sinks, foreground)
    gidx, ids = chunk.indices, chunk.ids
    keys = image_keys(batch.images)
    select, valid, reason = draw_random(table, tm, cfg.n_draws, axis=cfg.axis, match=cfg.match,
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
            rows.append({"batch": k, "sample": gidx[s], "id": str(ids[s]), "image_key": keys[s], "condition": "sink" if c == 0 else "random",
                         "draw": max(c - 1, 0), "n_tokens": len(chosen), "patches": " ".join(map(str, chosen)),
                         "value": float(value[c, s]), "clean": float(base["value"][s]),
                         "effect": float(effect[c, s]), "valid": bool(valid[s]), "reason": reason[s]})
    return pd.DataFrame(rows)


def _clean_with_site(model, batch, cfg: AblationConfig) -> tuple[dict, torch.Tensor | None]:
    """The clean run and, when it comes cheaply, the clean tensor at ``cfg.site``: an LLM site is
    read in the clean LLM run, ``proj.out`` by a forward stopped at the projector. None otherwise
    (ViT sites, drop, knockout: ``_values`` reads what it needs)."""
    site = Site.parse(cfg.site)
    if cfg.mode in ("drop", "knockout") or site.part == "vit":
        return clean(model, batch, cfg.metric), None
    if site.part == "llm":
        base = clean(model, batch, cfg.metric, read=[cfg.site])
        return base, base[cfg.site].detach()
    return clean(model, batch, cfg.metric, inputs=llm_inputs(model, batch)), _site_tensor(model, batch, cfg.site)


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


__all__ = ["MODES", "AblationConfig", "AblationError", "AblationResult", "ablate", "cell_means", "contrast_foreground",
           "image_keys"]
