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
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .batching import batches
from .config import Config, coerce
from .distributed import fail_together, gather, rank, world
from .engine import Plan, Write, clean, execute
from .errors import MechsinkError
from .memory import trim
from .metrics import Metric
from .results import FRAME, Result, RowStream
from .selection import Selection, SinkSource, contrast_foreground, draw_random, sink_table
from .sites import Site
from .stats import image_keys, summarize_draws
from .tokens import axis_columns
from .trace import capture, llm_inputs

MODES = ("zero", "mean", "resample", "drop", "knockout")
CHECKPOINT_S = 30.0     # how often ``ablate(out=...)`` closes a part of the rows it streams to disk
ROWS = "rows"           # ``out/rows``: the Parquet parts of a streamed run
ROW_GROUP = 8192        # rows per row group of a part: few groups, so a part's metadata stays small
STATS = ["sample", "image_key", "condition", "draw", "n_tokens", "clean", "effect", "valid"]


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
    valid, reason (id, image_key, condition and reason categorical). ``image_key`` names the
    sample's image (questions on one image share it; the statistics run over images).
    ``meta["model"]``: the model's name.

    The frame of a run streamed to disk (``ablate(out=...)``, or ``load`` of one) stays there until
    ``frame`` is first read: the statistics read only their columns, a row group at a time, and
    keep a few numbers per sample."""
    config_class: ClassVar[type | None] = AblationConfig

    @property
    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            self._frame = _frame([pq.ParquetFile(p).read() for p in sorted(self._rows.glob("part-*.parquet"))])
        return self._frame

    @frame.setter
    def frame(self, frame: pd.DataFrame | os.PathLike) -> None:
        """A DataFrame, or the directory of a streamed run's Parquet parts (read when needed)."""
        lazy = isinstance(frame, (str, os.PathLike))
        self._frame, self._rows = (None, Path(frame)) if lazy else (frame, None)
        self._samples = None

    def __repr__(self) -> str:                      # without reading a streamed run's rows
        rows = f"rows in {self._rows}" if self._frame is None else f"{len(self._frame)} rows"
        return f"AblationResult({self.label}, {rows})"

    def _pieces(self, columns: list[str]) -> Iterable[pd.DataFrame]:
        """The rows in pieces holding every row of their samples: the frame, or a streamed run's
        batches (the row groups of its parts), with only ``columns`` (those that exist) read."""
        if self._frame is not None:
            yield self._frame[[c for c in columns if c in self._frame]]
            return
        for part in sorted(self._rows.glob("part-*.parquet")):        # in the order of their batches
            f = pq.ParquetFile(part)
            have = [c for c in columns if c in f.schema_arrow.names]
            for g in range(f.num_row_groups):
                yield f.read_row_group(g, columns=have).to_pandas()

    def samples(self) -> pd.DataFrame:
        """One row per sample, in the frame's order: sample, image_key, clean, valid, n_tokens and
        effect of its sink set, and ``random``, the mean effect of its random draws (``n_draws``
        of them; NaN for an invalid sample). What the statistics need: a few numbers per sample."""
        if self._samples is None:
            per = [_per_sample(f) for f in self._pieces(STATS)]
            self._samples = pd.concat(per, ignore_index=True) if per else pd.DataFrame({"valid": np.zeros(0, bool)})
        return self._samples

    def effects(self) -> tuple[np.ndarray, np.ndarray, pd.Index]:
        """(sink effect [n], random effects [n, n_draws], sample index) over the valid samples."""
        f = pd.concat(list(self._pieces(["sample", "condition", "draw", "effect", "valid"])), ignore_index=True)
        f = f[f["valid"]]
        if f.empty:
            raise AblationError("no valid samples: every sample lacked sinks or matched controls")
        sink = f[f["condition"] == "sink"].set_index("sample")["effect"].sort_index()
        rand = f[f["condition"] == "random"].pivot(index="sample", columns="draw", values="effect").sort_index()
        return sink.to_numpy(), rand.loc[sink.index].to_numpy(), sink.index

    def _valid(self, columns: list[str]) -> dict[str, pd.Series]:
        """``columns`` of the valid samples of ``samples()``, ordered by sample (the order of
        ``effects()``): those columns only, not copies of the whole frame."""
        s = self.samples()
        valid = s["valid"].to_numpy(dtype=bool)
        if not valid.any():
            raise AblationError("no valid samples: every sample lacked sinks or matched controls")
        at = np.flatnonzero(valid)
        at = at[np.argsort(s["sample"].to_numpy()[at], kind="stable")]
        return {c: s[c].iloc[at] for c in columns}

    def units(self) -> np.ndarray:
        """The image of every valid sample, in the order of ``effects()``, as a code: images
        numbered in the order they first appear (a frame without ``image_key``, saved by an older
        version, counts every sample as its own image). Codes, not the keys: no string per sample."""
        s = self._valid(["image_key", "sample"])
        keys = s["image_key"] if s["image_key"].notna().all() else s["sample"]
        return pd.factorize(keys)[0]

    def comparison(self, *, by: str = "image", **kw):
        """mechsink.stats.Comparison of sink vs random effects (bootstrap CIs, permutation p), over
        images (``by="image"``: questions on one image averaged first) or, for comparison only,
        over questions (``by="question"``, which treats correlated questions as independent)."""
        from .stats import compare_paired
        s = self._valid(["effect", "random", "n_draws"])
        trim()      # what the run and the reading of its rows freed, before the statistics resample
        c = self.config
        args = dict(n_boot=c.n_boot, n_perm=c.n_perm, alpha=c.alpha, alternative=c.alternative, seed=c.seed)
        if by == "image":
            args["units"] = self.units()
        elif by != "question":
            raise AblationError(f"by must be 'image' or 'question', got {by!r}")
        # each sample's random effect is already the mean of its draws (as compare_paired takes it)
        cmp = compare_paired(s["effect"].to_numpy(), s["random"].to_numpy(), **{**args, **kw})
        return replace(cmp, n_draws=int(s["n_draws"].max()))

    @property
    def label(self) -> str:
        c = self.config
        where = f"L{','.join(map(str, c.layers))}" if c.mode == "knockout" and c.layers is not None else \
            ("llm" if c.mode == "knockout" else c.site)
        return f"{c.mode} @ {where}"

    def summary(self) -> dict:
        """JSON-ready: sink_effect, random_effect, diff ({mean, ci_low, ci_high}), p_value, n, ..."""
        d = self.comparison().to_dict()
        s = self.samples()
        return {"sink_effect": d["sink"], "random_effect": d["random"], "diff": d["diff"], "p_value": d["p_value"],
                "n": d["n"], "n_images": d["n"], "n_questions": d["n_obs"], "unit": d["unit"], "n_draws": d["n_draws"], "test": d["test"], "alternative": d["alternative"],
                "alpha": d["alpha"], "metric": self.config.metric.name,
                "clean_metric": float(s["clean"].mean()),
                "n_skipped": int((~s["valid"]).sum()),
                "mean_sinks": float(s.loc[s["valid"], "n_tokens"].mean())}

    def _save_frame(self, path: Path) -> None:
        if self._rows is None:
            shutil.rmtree(path / ROWS, ignore_errors=True)       # an earlier streamed run's rows
            return super()._save_frame(path)
        (path / FRAME).unlink(missing_ok=True)                  # an earlier in-memory run's frame
        if (path / ROWS).resolve() != self._rows.resolve():
            shutil.rmtree(path / ROWS, ignore_errors=True)
            shutil.copytree(self._rows, path / ROWS)

    @classmethod
    def _read_frame(cls, path: Path):
        return path / ROWS if (path / ROWS).is_dir() else super()._read_frame(path)


def _per_sample(f: pd.DataFrame) -> pd.DataFrame:
    """``AblationResult.samples()`` of rows holding every row of their samples."""
    sink = f[f["condition"] == "sink"].reset_index(drop=True)
    ok = f[f["valid"]]
    rand = ok[ok["condition"] == "random"].pivot(index="sample", columns="draw", values="effect")
    valid = sink["valid"].to_numpy(dtype=bool)
    mean = np.full(len(sink), np.nan)
    if valid.any():      # the mean compare_paired takes of the draws (row by row: the same numbers)
        mean[valid] = summarize_draws(np.ascontiguousarray(rand.loc[sink.loc[valid, "sample"]].to_numpy())).mean
    key = sink["image_key"].astype(str) if "image_key" in sink else pd.Series([None] * len(sink), dtype=object)
    return pd.DataFrame({"sample": sink["sample"].to_numpy(), "image_key": key.to_numpy(), "clean": sink["clean"].to_numpy(),
                         "valid": valid, "n_tokens": sink["n_tokens"].to_numpy(), "effect": sink["effect"].to_numpy(),
                         "random": mean, "n_draws": rand.shape[1]})


def _frame(tables: list[pa.Table]) -> pd.DataFrame:
    """One frame of per-batch rows (``tables``, emptied so that Arrow can let go of each column as
    pandas takes it), built once; repeated strings (Arrow dictionaries) categorical."""
    table = pa.concat_tables(tables) if tables else pa.table({})
    tables.clear()
    return table.to_pandas(self_destruct=True, split_blocks=True, use_threads=False)


def ablate(model, data, config: AblationConfig | dict | None = None, *, sinks: SinkSource = None,
           foreground: Callable | None = None, errors=None, out: str | os.PathLike | None = None,
           progress: bool = False, **overrides) -> AblationResult:
    """Ablate sinks and matched random controls on every sample of ``data``.

    data: a Dataset / list of Samples, a Batch or a list of Batches (``mechsink.batching``).
    config: AblationConfig (keyword overrides such as ``mode="mean"`` are applied on top).
    sinks: the sink rule -- a SinkSpec (default SinkSpec()), a SinkSet, fixed patch indices or a
    callable (see ``selection.sink_table``). foreground: (model, batch) -> bool per patch, for
    ``match=("foreground",)`` (e.g. ``contrast_foreground()``). errors: a mechsink.data.ErrorLog
    that records skipped images. out: a directory; the rows are written there as they are made
    (``out/rows``: Parquet parts appended batch by batch, a part moved into place every
    ``CHECKPOINT_S`` seconds and when the run ends, stops on an error or is interrupted, so it keeps
    what it finished), and the result returned reads them from there when asked: its memory does not
    grow with the rows (the statistics keep a few numbers per sample). ``result.json`` holds the
    summary once the run ends.
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
    meta = {"model": getattr(model, "name", "")}
    # with ``out`` (one process), every batch's rows go to disk as they are made and the result
    # reads them back when asked; under torchrun the ranks' rows are gathered and saved by rank 0
    stream = RowStream(Path(out), AblationResult(Path(out) / ROWS, cfg, meta), ROWS, ROW_GROUP, CHECKPOINT_S) \
        if out is not None and world() == 1 else None
    parts: list[tuple[int, pa.Table]] = []           # (chunk number, rows): merged over torchrun ranks
    try:
        with fail_together():                          # an error on one rank is raised on every rank
            for chunk in batches(model, data, cfg.batch_size, errors=errors, shard=True,
                                 min_batch=2 if cfg.mode == "resample" else 1,  # resample pairs images in a batch
                                 progress=f"ablate {cfg.mode}" if progress else False):
                rows = _ablate_batch(model, chunk, chunk.number, cfg, sinks, foreground, means)
                if stream is not None:
                    stream.write(chunk.number, rows)
                else:
                    parts.append((chunk.number, rows))
    finally:
        if stream is not None:
            stream.close()                             # an interrupt or an error keeps what was finished
    if stream is not None:
        result, n = stream.result, stream.rows
    else:                                              # every rank's rows in chunk order, then one frame
        tables = gather(parts)
        parts.clear()
        n = sum(t.num_rows for t in tables)
        result = AblationResult(_frame(tables), cfg, meta)
    if not n:
        raise AblationError("no data to ablate")
    if out is not None and rank() == 0:
        result.save(out)
    return result


def _ablate_batch(model, chunk, k: int, cfg: AblationConfig, sinks, foreground, means) -> pa.Table:
    """The batch's rows: condition-major (the sink set, then every draw), one per sample each."""
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
    c, s = np.divmod(np.arange(select.shape[0] * batch.size), batch.size)      # condition, sample of every row
    chosen = [np.sort(patch[select[ci] & (samples == si)]) for ci, si in zip(c, s)]
    floats = lambda t: t.detach().double().cpu().numpy()                # noqa: E731 - exact: float32 -> float64
    per_sample = lambda v: pa.array(np.asarray(v, dtype=object)[s]).dictionary_encode()  # noqa: E731
    return pa.table({
        "batch": np.full(len(c), k, np.int64), "sample": np.asarray(gidx, np.int64)[s],
        "id": per_sample([str(i) for i in ids]), "image_key": per_sample(keys),
        "condition": pa.array(np.where(c == 0, "sink", "random")).dictionary_encode(), "draw": np.maximum(c - 1, 0),
        "n_tokens": np.array([len(p) for p in chosen], np.int64), "patches": [" ".join(map(str, p)) for p in chosen],
        "value": floats(value).reshape(-1), "clean": floats(base["value"])[s], "effect": floats(effect).reshape(-1),
        "valid": np.asarray(valid, bool)[s], "reason": per_sample(reason)})


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
