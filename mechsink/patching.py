"""Activation patching: write values from a source run into a base run, and measure what changes.

    cfg = PatchConfig(sites=("proj.out",), selections=("sinks", "random(match=border)", "image"))
    res = patch(model, base, source, cfg, sinks=SinkSpec())          # one batch pair
    res = patch_dataset(model, dataset, cfg, corruption="shuffle")     # a dataset, sources made per batch
    res.table()            # site x selection: normalised recovery

Words: the **base** run is the one we change; the **source** run is where values come from
(``mechsink.sources``). ``patch`` copies token selections (``mechsink.selection``: sinks, matched
random non-sinks, every image token, ...) from source into base at every site and reports the
normalised recovery

    recovery = (metric(patched) - metric(base)) / (metric(source) - metric(base)).

With ``positions`` set (``"patches"``, ``"all"`` or a list of positions) the config describes a
sweep: every site x unit is patched one unit at a time (``mechsink.sweep.sweep``). All conditions
of a batch run as stacked copies through ``mechsink.engine.execute``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd
import torch

from .batching import batches
from .config import Config, coerce
from .distributed import fail_together, gather_frames, rank, world
from .engine import Plan, Write, clean, execute, source_run
from .metrics import Metric
from .results import Result
from .selection import SelectionError, parse_all, random, resolve, sink_table
from .sites import Site, blocks
from .sources import PatchError, check_pair, corrupt, with_images
from .stats import image_keys
from .tokens import TokenMap, axis_columns

POSITIONS = ("patches", "all")


def block_sites(model, part: str = "llm", hook: str = "hook_resid_pre", layers: Sequence[int] | None = None) -> list[str]:
    """Site names of one hook across layers, e.g. every ``llm.blocks.{l}.hook_resid_pre``."""
    return blocks(part, hook, layers, model.n_llm_layers if part == "llm" else model.n_vit_layers)


def _selections(values, match: Sequence[str] = ()) -> tuple[str, ...]:
    """Selection names (normalised); ``match`` applies to a plain ``random``."""
    try:
        sels = parse_all(values)
    except SelectionError as e:
        raise PatchError(str(e)) from None
    off = [str(s) for s in sels if not s.on_patches]
    if off:
        raise PatchError(f"patching acts on image patches; {', '.join(off)} are not")
    if match:
        sels = tuple(random(s.k, match, s.norm_band) if s.kind == "random" and not s.match else s for s in sels)
    return tuple(dict.fromkeys(str(s) for s in sels))


@dataclass(frozen=True)
class PatchConfig(Config):
    """Which sites and token selections to patch from source into base.

    sites: site names (None: every ``llm.blocks.{l}.hook_resid_pre``). selections: patch
    selections (``mechsink.selection``; "random" = ``n_draws`` random non-sink sets matched on
    count, "random(match=border)" also on the border). positions: None patches each selection as a
    whole; "patches" (each patch cell), "all" (each position of the site's token axis) or a list of
    positions make a sweep, one unit at a time. sinks_of: whose sinks are used, the source's or the
    base's. batch_size: samples per forward in ``patch_dataset``. from_layer: patched runs of
    residual-stream sites start at the patched block from the clean stream (False: the whole LLM
    reruns for every copy -- the reference path; same numbers).
    """
    sites: tuple[str, ...] | None = ("proj.out",)
    selections: tuple[str, ...] = ("sinks", "random", "image")
    positions: str | tuple[int, ...] | None = None
    metric: Metric = field(default_factory=Metric)
    n_draws: int = 8
    sinks_of: str = "source"
    seed: int = 0
    batch_size: int = 8
    rows_per_forward: int = 64
    from_layer: bool = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if self.sites is not None:
            set_("sites", tuple(str(Site.parse(s)) for s in ([self.sites] if isinstance(self.sites, str) else self.sites)))
            for s in self.sites:
                if Site.parse(s).kind in ("pattern", "logits"):
                    raise PatchError(f"cannot patch tokens at {s}: it holds attention patterns or logits")
        pos = self.positions
        if isinstance(pos, str) and pos not in POSITIONS or \
                (isinstance(pos, (list, tuple)) and any(isinstance(p, str) for p in pos)):
            set_("selections", _selections(pos))          # selection names as sweep units
            pos = None
        elif isinstance(pos, (list, tuple)):
            pos = tuple(int(p) for p in pos)
        set_("positions", pos)
        set_("selections", _selections(self.selections))
        set_("metric", Metric.coerce(self.metric))
        if self.sinks_of not in ("source", "base"):
            raise PatchError(f"sinks_of must be 'source' or 'base', got {self.sinks_of!r}")
        if self.n_draws < 1:
            raise PatchError(f"n_draws must be at least 1, got {self.n_draws}")
        if self.batch_size < 1 or self.rows_per_forward < 1:
            raise PatchError("batch_size and rows_per_forward must be positive")

    @property
    def unit(self) -> str:
        """What one column of the result is: a selection ("tokens"), a patch cell or a position."""
        return "tokens" if self.positions is None else "patch" if self.positions == "patches" else "position"


@dataclass(frozen=True)
class SweepConfig(PatchConfig):
    """A patching sweep (``mechsink.sweep.sweep``): by default every patch cell at every LLM layer's input."""
    sites: tuple[str, ...] | None = None
    positions: str | tuple[int, ...] | None = "patches"
    n_draws: int = 4


@dataclass(frozen=True)
class PathPatchConfig(Config):
    """Path patching (``mechsink.sweep.path_patch``): the source's values at a selection reach only
    chosen LLM layers. layers: layer sets (an int is a set of one; None: each layer alone)."""
    layers: tuple[tuple[int, ...], ...] | None = None
    selections: tuple[str, ...] = ("sinks", "random", "image")
    metric: Metric = field(default_factory=Metric)
    n_draws: int = 4
    sinks_of: str = "source"
    seed: int = 0
    rows_per_forward: int = 64
    from_layer: bool = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if self.layers is not None:
            set_("layers", tuple((int(l),) if isinstance(l, (int, np.integer)) else tuple(int(x) for x in l)
                                 for l in self.layers))
        set_("selections", _selections(self.selections))
        set_("metric", Metric.coerce(self.metric))
        if self.sinks_of not in ("source", "base"):
            raise PatchError(f"sinks_of must be 'source' or 'base', got {self.sinks_of!r}")
        if self.n_draws < 1:
            raise PatchError(f"n_draws must be at least 1, got {self.n_draws}")

    unit = "tokens"


CONFIGS = {c.__name__: c for c in (PatchConfig, SweepConfig, PathPatchConfig)}


@dataclass
class PatchResult(Result):
    """Tidy patching results: ``frame`` has one row per site x unit (selection, patch or position)
    x draw x sample with the metric in the base, source and patched runs and the per-sample
    ``recovery``. ``meta`` holds the model name and, for a dataset, the source."""
    config_class: ClassVar[type | None] = None

    def __post_init__(self):
        if self.config is not None:
            self.meta.setdefault("config_kind", type(self.config).__name__)

    @property
    def unit(self) -> str:
        return getattr(self.config, "unit", None) or self.meta.get("unit", "tokens")

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
        return t.reindex(index=list(dict.fromkeys(f["site"])), columns=list(dict.fromkeys(f[self.unit])))

    def counts(self) -> dict:
        """{"n_images", "n_questions"}: the independent images (``image_key``) and the samples."""
        f = self.frame
        n_q = int(f["sample"].nunique())
        return {"n_images": int(f["image_key"].nunique()) if "image_key" in f else n_q, "n_questions": n_q}

    def comparison(self, site: str, selection: str = "sinks", against: str | None = None, *, n_boot: int = 2000,
                   n_perm: int = 10000, alpha: float = 0.05, alternative: str = "greater", seed: int = 0):
        """mechsink.stats.Comparison at one site of how far patching moves the base run away from its
        own answer -- the drop ``base - patched`` of the metric (positive = the answer moved toward the
        source) -- when ``selection`` is patched vs when ``against`` is (default: the first random
        selection): paired per sample, averaged within each image, CIs and sign flips over images."""
        from .stats import compare_paired
        f = self.frame[self.frame["site"] == site]
        if f.empty:
            raise PatchError(f"no rows for site {site!r}; sites: {', '.join(dict.fromkeys(self.frame['site']))}")
        names = list(dict.fromkeys(f[self.unit].astype(str)))
        if against is None:
            against = next((n for n in names if n.startswith("random")), None)
        for name in (selection, against):
            if name not in names:
                raise PatchError(f"no selection {name!r} at {site}; selections: {', '.join(names)}")
        eff = f.assign(effect=f["base"] - f["patched"], sel=f[self.unit].astype(str))
        per = eff.groupby(["sample", "sel"])["effect"].mean().unstack("sel")[[selection, against]].dropna()
        keys = eff.drop_duplicates("sample").set_index("sample")
        units = keys.loc[per.index, "image_key"].astype(str).to_numpy() if "image_key" in keys else None
        return compare_paired(per[selection].to_numpy(), per[against].to_numpy(), units=units, n_boot=n_boot,
                              n_perm=n_perm, alpha=alpha, alternative=alternative, seed=seed)

    def summary(self) -> dict:
        """{"recovery": {site: {unit: value}}, "effect": {...}, "n", "n_images", "n_questions", "unit",
        "metric", "sites"}; ``n`` counts questions (samples), ``n_images`` the images they share."""
        def nested(t: pd.DataFrame) -> dict:
            return {str(s): {str(u): (None if not np.isfinite(v) else float(v)) for u, v in row.items()}
                    for s, row in t.iterrows()}
        metric = getattr(self.config, "metric", None)
        return {"recovery": nested(self.table("recovery")), "effect": nested(self.table("effect")),
                "n": int(self.frame["sample"].nunique()), **self.counts(), "unit": self.unit,
                "metric": metric.name if metric is not None else None, "sites": list(dict.fromkeys(self.frame["site"]))}

    @classmethod
    def _from_saved(cls, frame, config, meta):
        kind = CONFIGS.get(meta.get("config_kind", "PatchConfig"), PatchConfig)
        return cls(frame, kind.from_dict(config) if isinstance(config, dict) else config, meta)


# -- units: what one copy patches -------------------------------------------------------------------
def _recovery(patched: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    den = source - base
    ok = den.abs() > 1e-6 * (1 + base.abs())
    rec = (patched - base) / torch.where(ok, den, torch.ones_like(den)) + 0.0     # + 0.0: no negative zeros
    return torch.where(ok, rec, torch.full_like(den, float("nan")))


def long_frame(sites: list[str], units: list, draws: list[int], unit_name: str, value: torch.Tensor,
          base_v: torch.Tensor, src_v: torch.Tensor, n_tokens: np.ndarray | None = None,
          layers: list[int] | None = None, sample_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Long frame over copies x samples (row c * B + i); one site label, unit and draw per copy."""
    c, b = value.shape
    rec = _recovery(value, base_v[None], src_v[None])
    if layers is None:
        layers = [-1 if Site.parse(s).layer is None else Site.parse(s).layer for s in sites]
    ids = np.arange(b) if sample_ids is None else np.asarray(sample_ids)
    f = pd.DataFrame({
        "site": np.repeat(sites, b), "part": np.repeat([s.split(".", 1)[0] for s in sites], b),
        "layer": np.repeat(layers, b), unit_name: np.repeat(np.asarray(units), b),
        "draw": np.repeat(draws, b), "sample": np.tile(ids, c)})
    if n_tokens is not None:
        f["n_tokens"] = np.asarray(n_tokens).reshape(-1)
    f["base"] = base_v.repeat(c).numpy()
    f["source"] = src_v.repeat(c).numpy()
    f["patched"] = value.reshape(-1).numpy()
    f["recovery"] = rec.reshape(-1).numpy()
    return f


def counts(tm: TokenMap, select: np.ndarray, axis: str = "llm") -> np.ndarray:
    """Tokens per (selection, sample) that exist on ``axis``: [n_sel, B]."""
    pos = tm.patches[axis_columns(axis)[1]].to_numpy() >= 0
    samples = tm.patches["sample"].to_numpy()
    b = int(tm.roles.shape[0])
    return np.stack([np.bincount(samples[row & pos], minlength=b) for row in select])


def default_sinks(sinks):
    """The sink rule to use: ``sinks`` as given, or the default SinkSpec."""
    if sinks is not None:
        return sinks
    from .sinks.detect import SinkSpec
    return SinkSpec()


def selected(model, base, source, cfg, sinks, sample_ids: Sequence[int] | None = None):
    """``cfg.selections`` resolved over the base's patch rows (``selection.Resolved``); the sinks
    are detected on the source or the base run (``cfg.sinks_of``)."""
    sels = parse_all(cfg.selections)
    tm = base.token_map
    table = tm.patches.assign(is_sink=False)
    if any(s.needs_sinks for s in sels):
        table = sink_table(model, source if cfg.sinks_of == "source" else base, default_sinks(sinks))
    return resolve(sels, table, tm, axis="llm", n_draws=cfg.n_draws, seed=cfg.seed, sample_ids=sample_ids)


def unit_masks(model, base, source, cfg: PatchConfig, site: str, shape: tuple, sinks, chosen=None,
               sample_ids: Sequence[int] | None = None) -> tuple[list, list[int], torch.Tensor, np.ndarray | None]:
    """(unit labels, draws, mask [U, *shape], tokens per unit and sample or None) for one site.
    ``chosen``: the resolved selections when already at hand."""
    tm = base.token_map
    axis = Site.parse(site).axis
    if cfg.positions == "patches":
        patch = tm.patches["patch"].to_numpy()
        units = sorted(set(patch.tolist()))
        sel = np.stack([patch == p for p in units])
        return units, [0] * len(units), tm.mask(axis, sel, shape), counts(tm, sel, axis)
    if cfg.positions is None:
        chosen = chosen if chosen is not None else selected(model, base, source, cfg, sinks, sample_ids)
        return list(chosen.names), list(chosen.draws), tm.mask(axis, chosen.select, shape), counts(tm, chosen.select, axis)
    units = list(range(shape[-1])) if cfg.positions == "all" else list(cfg.positions)
    if any(not 0 <= p < shape[-1] for p in units):
        raise PatchError(f"positions must lie in 0..{shape[-1] - 1} at {site}")
    mask = torch.zeros(len(units), *shape, dtype=torch.bool)
    for k, p in enumerate(units):
        mask[k, ..., p] = True
    return units, [0] * len(units), mask, None


def _config(cls, config, overrides: dict):
    cfg = config if isinstance(config, PatchConfig) and issubclass(cls, PatchConfig) else coerce(cls, config)
    return cfg.replace(**overrides) if overrides else cfg


# -- one batch pair -----------------------------------------------------------------------------------
def patch(model, base, source, config: PatchConfig | dict | None = None, *, sinks=None,
          sample_ids: Sequence[int] | None = None, **overrides) -> PatchResult:
    """Patch ``config.selections`` (or, with ``positions``, every unit) from ``source`` into
    ``base`` at each of ``config.sites``.

    base and source need the same token layout (e.g. ``source = with_images(model, base, other)``).
    The metric reads the *base* batch's targets in every run (its answers and positions), so
    metric(source) is how the source image scores the base's answer. sinks: the sink rule (a
    SinkSpec, SinkSet, patch list or callable; default SinkSpec()). sample_ids: global sample
    indices (they seed the random draws and label the frame). Keyword overrides replace config fields.
    """
    cfg = _config(PatchConfig, config, overrides)
    check_pair(base, source)
    sites = list(cfg.sites) if cfg.sites is not None else block_sites(model)
    cfg = cfg.replace(sites=tuple(sites))
    b0 = clean(model, base, cfg.metric, read=sites)
    s0 = source_run(model, source, cfg.metric, b0, read=sites)
    chosen = selected(model, base, source, cfg, sinks, sample_ids) if cfg.positions is None else None
    per_site = [unit_masks(model, base, source, cfg, s, tuple(b0[s].shape[:-1]), sinks, chosen, sample_ids)
                for s in sites]
    plan = Plan(sum(len(u[0]) for u in per_site))
    labels, units, draws, n_tok = [], [], [], []
    c = 0
    for site, (us, ds, m, n) in zip(sites, per_site):
        mask = torch.zeros(plan.n_copies, *m.shape[1:], dtype=torch.bool)
        mask[c:c + len(us)] = m
        plan.writes.append(Write(site, mask, s0[site]))
        labels += [site] * len(us)
        units += list(us)
        draws += list(ds)
        n_tok.append(n)
        c += len(us)
    out = execute(model, base, plan, cfg.metric, b0["targets"], inputs=b0["inputs"], clean_next=b0["next"],
                  rows_per_forward=cfg.rows_per_forward, from_layer=cfg.from_layer)
    n_tokens = None if any(n is None for n in n_tok) else np.concatenate(n_tok)
    f = long_frame(labels, units, draws, cfg.unit, out["value"], b0["value"], s0["value"], n_tokens, sample_ids=sample_ids)
    ids = np.arange(base.size) if sample_ids is None else np.asarray(sample_ids)
    f["image_key"] = f["sample"].map(dict(zip(ids.tolist(), image_keys(base.images))))
    return PatchResult(f, cfg, {"model": getattr(model, "name", "")})


# -- a dataset ----------------------------------------------------------------------------------------
def patch_dataset(model, data, config: PatchConfig | dict | None = None, *, source=None, corruption: str = "shuffle",
                  sinks=None, errors=None, out: str | os.PathLike | None = None, progress: bool = False) -> PatchResult:
    """``patch`` over every batch of ``data`` (a Dataset, list of Samples, Batch or list of Batches).

    Base = the samples with their prompts and answers; source = the same prompts with the images
    of ``source`` (a dataset paired with ``data`` by position) or, without it, the batch's own
    images corrupted (``corruption``: shuffle | noise | blank). A sweep when ``config.positions``
    is set. errors: a mechsink.data.ErrorLog of skipped images (base or source). out: a directory,
    saved after every batch. The frame's ``sample`` is the global index, ``id`` the sample id.
    """
    from .data import ErrorLog, iter_images
    cfg = coerce(PatchConfig, config) if not isinstance(config, PatchConfig) else config
    errors = errors if errors is not None else ErrorLog()
    name = getattr(data, "name", None)
    src_images = None
    if source is not None:
        base_samples, src_samples = list(data), list(source)
        if not all(hasattr(s, "load_image") for s in base_samples + src_samples):
            raise PatchError("a source dataset pairs samples (a Dataset or list of Samples), not prepared Batches")
        if len(src_samples) < len(base_samples):
            raise PatchError(f"the source dataset has {len(src_samples)} samples for {len(base_samples)} base samples")
        pos = {id(s): i for i, s in enumerate(src_samples)}
        src_images = {id(base_samples[pos[id(s)]]): im for s, im in iter_images(src_samples[:len(base_samples)], errors=errors)}
        data = [s for s in base_samples if id(s) in src_images]
    frames = []                                    # (chunk number, rows): merged over torchrun ranks
    meta = {"model": getattr(model, "name", ""), "source": "dataset" if source is not None else corruption, "data": name}
    with fail_together():                          # an error on one rank is raised on every rank
        for chunk in batches(model, data, cfg.batch_size, errors=errors, progress=progress and "patch", shard=True,
                             min_batch=2 if source is None and corruption == "shuffle" else 1):   # shuffling needs two
            b = chunk.batch
            if src_images is not None:
                imgs = [src_images[id(s)] for s in chunk.samples]
            else:
                imgs = corrupt([g[0] for g in b.images], corruption, cfg.seed + chunk.start)
            res = patch(model, b, with_images(model, b, imgs), cfg, sinks=sinks, sample_ids=chunk.indices)
            ids = dict(zip(chunk.indices, chunk.ids))
            frames.append((chunk.number, res.frame.assign(id=res.frame["sample"].map(ids).astype(str))))
            cfg = res.config
            if out is not None and world() == 1:
                PatchResult(pd.concat([f for _, f in frames], ignore_index=True), cfg, meta).save(out, summary=False)
    frame = gather_frames(frames)
    if frame.empty:
        raise PatchError("no data to patch")
    if cfg.sites is None:                          # a rank without chunks: the sites patch() fills in
        cfg = cfg.replace(sites=tuple(dict.fromkeys(frame["site"])))
    result = PatchResult(frame, cfg, meta)
    if out is not None and rank() == 0:
        result.save(out)
    return result


__all__ = ["CONFIGS", "POSITIONS", "PatchConfig", "PatchError", "PatchResult", "PathPatchConfig", "SweepConfig",
           "block_sites", "check_pair", "corrupt", "patch", "patch_dataset", "with_images"]
