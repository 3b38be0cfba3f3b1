"""Detecting ViT sinks: a serialisable SinkSpec, the SinkSet result, and calibration.

    spec = SinkSpec()                              # relative rule at the projector input
    spec = SinkSpec.preset("llava-1.5")            # norm >= 100 at vit.out
    sinks = detect(model, batch, spec)             # one forward pass reading spec.site
    sinks.sinks                                    # rows of the patch table that are sinks
    sinks.to_records()                             # [{"image": ..., "sinks": [{"patch", "row", ...}]}]

A spec says *where* (``site``), *what* is scored (``score``: the L2 norm, or max |x| over
``dims``), and *which rule* turns scores into sinks (see :mod:`mechsink.sinks.rules`). Relative
rules judge each tile (or image) against its own tokens; CLS/register tokens are left out unless
``include_special``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..atomic import write_parquet, write_text
from ..config import Config
from ..errors import SiteError
from ..sites import Site
from ..tokens import _AXIS_COLUMNS, TokenMap
from . import rules
from .rules import RULES, QuantileSketch, SinkError

log = logging.getLogger("mechsink")

SCORES = ("norm", "dims")
GROUPS = {"tile": ["sample", "image", "tile"], "image": ["sample", "image"]}
PRESETS: dict[str, dict] = {
    "default": {},
    # To Sink or Not to Sink (2510.08510): LLaVA-1.5-7B's CLIP ViT-L/14-336, tau = 100.
    "llava-1.5": {"site": "vit.out", "rule": "fixed", "params": {"tau": 100.0}},
    # Neo et al. (2410.07149): norm above mean + 2 sigma of the image's tokens.
    "neo": {"site": "vit.out", "rule": "sigma", "params": {"k": 2.0}},
}
_INT_PARAMS = {"k": ("topk",), "n_calib": ("quantile",)}


@dataclass(frozen=True, eq=True)
class SinkSpec(Config):
    """How sinks are detected. Parameters missing from ``params`` take the rule's defaults, so
    ``to_dict`` (and the fingerprint) always spell out every number that was used."""
    site: str = "vit.out"
    score: str = "norm"                    # "norm" (L2 norm) | "dims" (max |x| over dims)
    dims: tuple[int, ...] | None = None
    rule: str = "relative"
    params: dict = field(default_factory=dict)
    include_special: bool = False          # score CLS/register tokens as candidates too
    per: str = "tile"                      # the group a relative rule is judged in: "tile" | "image"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        try:
            site = Site.parse(self.site)
        except SiteError as e:
            raise SinkError(str(e)) from None
        if site.kind in ("pattern", "logits"):
            raise SinkError(f"site {site} holds attention patterns or logits, not token states; use e.g. vit.out")
        set_("site", str(site))
        if self.score not in SCORES:
            raise SinkError(f"unknown score {self.score!r}; use 'norm' or 'dims'")
        if self.score == "dims":
            if not self.dims:
                raise SinkError("score 'dims' needs dims=[...] (find them with mechsink.sinks.massive_dims)")
            set_("dims", tuple(sorted({int(d) for d in self.dims})))
        elif self.dims:
            raise SinkError("dims are only used with score='dims'")
        else:
            set_("dims", None)
        if self.rule not in RULES:
            raise SinkError(f"unknown sink rule {self.rule!r}; rules: {', '.join(RULES)}; presets: {', '.join(PRESETS)}")
        r = RULES[self.rule]
        unknown = set(self.params) - set(r.defaults) - set(r.required)
        if unknown:
            allowed = sorted(set(r.defaults) | set(r.required))
            raise SinkError(f"rule {self.rule!r} has no parameter {', '.join(sorted(unknown))}; it takes {', '.join(allowed)}")
        missing = [k for k in r.required if self.params.get(k) is None]
        if missing:
            raise SinkError(f"rule {self.rule!r} needs {', '.join(missing)} (e.g. params={{'{missing[0]}': 100}})")
        params = {}
        for k, v in {**r.defaults, **self.params}.items():
            if v is None:
                params[k] = None
                continue
            try:
                params[k] = int(v) if self.rule in _INT_PARAMS.get(k, ()) else float(v)
            except (TypeError, ValueError):
                raise SinkError(f"parameter {k} of rule {self.rule!r} must be a number, got {v!r}") from None
        set_("params", dict(sorted(params.items())))
        if self.per not in GROUPS:
            raise SinkError(f"per must be 'tile' or 'image', got {self.per!r}")
        set_("include_special", bool(self.include_special))

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "SinkSpec":
        """A published setting by name: 'default', 'llava-1.5' (norm >= 100 at vit.out), 'neo' (mean + 2 sigma)."""
        if name not in PRESETS:
            raise SinkError(f"unknown sink preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_options(cls, rule: str | None = None, *, site: str | None = None, score: str | None = None,
                     dims: Sequence[int] | None = None, include_special: bool | None = None, per: str | None = None,
                     **params) -> "SinkSpec":
        """A spec from loose options (the CLI's): ``rule`` may be a rule or a preset name; options
        left as None keep the rule's or preset's value."""
        base = dict(PRESETS[rule]) if rule in PRESETS else ({"rule": rule} if rule else {})
        base["params"] = {**base.get("params", {}), **{k: v for k, v in params.items() if v is not None}}
        for k, v in dict(site=site, score=score, dims=dims, include_special=include_special, per=per).items():
            if v is not None:
                base[k] = v
        if dims is not None and score is None:
            base["score"] = "dims"
        return cls(**base)

    def replace(self, **changes) -> "SinkSpec":
        if "rule" in changes and "params" not in changes:
            changes["params"] = {}
        return dataclasses.replace(self, **changes)

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    @property
    def axis(self) -> str:
        return Site.parse(self.site).axis

    def detect(self, model, batch, *, ids: Sequence | None = None) -> "SinkSet":
        """Sinks of one batch under this rule (one forward reading ``site``)."""
        return detect(model, batch, self, ids=ids)


# -- scoring ------------------------------------------------------------------------------------
def score_tokens(x: torch.Tensor, spec: SinkSpec) -> torch.Tensor:
    """Score of every token: x [..., d] -> [...] (float32)."""
    x = x.detach().float()
    if spec.score == "norm":
        return x.norm(dim=-1)
    if max(spec.dims) >= x.shape[-1] or min(spec.dims) < -x.shape[-1]:
        raise SinkError(f"sink dims {list(spec.dims)} out of range for hidden size {x.shape[-1]}")
    return x[..., list(spec.dims)].abs().amax(dim=-1)


def frame_scores(acts: torch.Tensor, frame: pd.DataFrame | Mapping[str, np.ndarray], axis: str, spec: SinkSpec,
                 scores: torch.Tensor | None = None) -> np.ndarray:
    """The score of each row of a TokenMap frame (patches or special) on a site tensor of the given
    axis; NaN where the row has no token on that axis. acts: [items, seq, d] or [seq, d] (flat).
    ``scores``: ``score_tokens(acts, spec)`` when the caller has it already."""
    item_col, pos_col = _AXIS_COLUMNS[axis]
    pos = np.asarray(frame[pos_col])
    out = np.full(len(pos), np.nan)
    ok = pos >= 0
    if not ok.any():
        return out
    scores = (score_tokens(acts, spec) if scores is None else scores).cpu()
    items = np.asarray(frame[item_col])[ok]
    try:
        if (items < 0).all():   # flat axis (Qwen2-VL's ViT): one sequence for the whole batch
            flat = scores.reshape(-1) if scores.dim() == 2 and scores.shape[0] == 1 else scores
            vals = flat[torch.from_numpy(pos[ok])]
        else:
            vals = scores[torch.from_numpy(items), torch.from_numpy(pos[ok])]
    except (IndexError, RuntimeError):
        raise SinkError(f"activations of shape {tuple(acts.shape)} do not match the token map on axis {axis!r} "
                        f"(largest {pos_col} = {int(pos.max())}); were they read at {spec.site} for this batch?") from None
    out[ok] = vals.numpy().astype(np.float64)
    return out


def _flag(cands: Mapping[str, Any], spec: SinkSpec) -> np.ndarray:
    """Apply the rule to candidate scores (column 'norm'), per group for relative rules."""
    s = np.asarray(cands["norm"], dtype=np.float64)
    if len(s) == 0:
        return np.zeros(0, dtype=bool)
    if not RULES[spec.rule].per_group:
        return rules.apply(spec.rule, s, spec.params)
    flags = np.zeros(len(s), dtype=bool)
    keys = np.stack([np.asarray(cands[c], dtype=np.int64) for c in GROUPS[spec.per]], axis=1)
    group = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)
    order = np.argsort(group, kind="stable")
    sizes = np.bincount(group)
    if RULES[spec.rule].rows and (sizes == sizes[0]).all():     # equal tiles: every group in one call
        flags[order] = rules.apply(spec.rule, s[order].reshape(len(sizes), -1), spec.params).reshape(-1)
        return flags
    for idx in np.split(order, np.cumsum(sizes)[:-1]):
        flags[idx] = rules.apply(spec.rule, s[idx], spec.params)
    return flags


# -- the result -------------------------------------------------------------------------------
@dataclass
class SinkSet:
    """Detected sinks of one batch (or several, after ``concat``).

    ``patches``: the TokenMap's patch table plus ``patch`` (row-major index in the tile grid),
    ``norm`` (the score at ``spec.site``; NaN where the patch has no token there) and ``is_sink``.
    ``special``: CLS/register tokens with ``norm`` and ``is_sink`` (False unless ``include_special``).
    ``ids``: one label per sample (an image path or dataset id) used by ``to_records``.
    """
    spec: SinkSpec
    patches: pd.DataFrame
    special: pd.DataFrame
    ids: list | None = None
    token_map: TokenMap | None = field(default=None, repr=False)
    norms: Any = field(default=None, repr=False)      # a NormProfile when detect_dataset profiled the layers

    # -- the Result protocol (frame, config, summary, save, load) ------------------------------
    @property
    def frame(self) -> pd.DataFrame:
        return self.patches

    @property
    def config(self) -> SinkSpec:
        return self.spec

    def summary(self) -> dict:
        """Images, images with sinks, sinks per image and the fraction of patches that are sinks."""
        per = self.patches.groupby(["sample", "image", "tile"])["is_sink"].sum()
        return {"images": int(len(per)), "images_with_sinks": int((per > 0).sum()),
                "mean_per_image": float(per.mean()) if len(per) else float("nan"),
                "fraction_of_tokens": float(self.patches["is_sink"].mean()) if len(self.patches) else float("nan"),
                "rule": self.spec.to_dict()}

    @property
    def sinks(self) -> pd.DataFrame:
        return self.patches[self.patches["is_sink"]]

    @property
    def nonsinks(self) -> pd.DataFrame:
        return self.patches[~self.patches["is_sink"]]

    @property
    def n_samples(self) -> int:
        if self.ids is not None:
            return len(self.ids)
        if self.token_map is not None:
            return int(self.token_map.roles.shape[0])
        return int(self.patches["sample"].max()) + 1 if len(self.patches) else 0

    def counts(self) -> pd.DataFrame:
        """Sinks per image: sample, image, n_patches, n_sinks."""
        g = self.patches.groupby(["sample", "image"], sort=True)
        return pd.DataFrame({"n_patches": g.size(), "n_sinks": g["is_sink"].sum()}).reset_index()

    def llm_tokens(self) -> pd.DataFrame:
        """One row per LLM position holding image content: sample, llm_pos, role, image, tile, row,
        col, ``norm`` (max over the patches merged into the token; NaN for newline tokens),
        ``is_sink`` (any merged patch is a sink) and ``n_patches``."""
        p = self.patches[self.patches["llm_pos"] >= 0]
        agg = (p.groupby(["sample", "llm_pos"], sort=True)
                .agg(norm=("norm", "max"), is_sink=("is_sink", "any"), n_patches=("patch", "size"),
                     image=("image", "first"), tile=("tile", "first"), row=("row", "min"), col=("col", "min"))
                .reset_index())
        if self.token_map is not None:
            base = self.token_map.llm_tokens
            out = base.merge(agg[["sample", "llm_pos", "norm", "is_sink", "n_patches"]], on=["sample", "llm_pos"], how="left")
            out["is_sink"] = out["is_sink"].fillna(False).astype(bool)
            out["n_patches"] = out["n_patches"].fillna(0).astype("int64")
            return out
        agg.insert(2, "role", "image")
        return agg

    def _label(self, sample: int, image: int, n_images: int):
        base = self.ids[sample] if self.ids is not None else sample
        return base if n_images == 1 else f"{base}#{image}"

    def to_records(self) -> list[dict]:
        """JSON-ready: per image {"image": id, "sinks": [{"patch", "row", "col", "norm", "llm_pos", "tile"}]},
        sinks in tile then patch order; with ``include_special``, also "special": [{"role", "norm"}]."""
        recs = []
        per_sample = self.patches.groupby("sample")["image"].nunique().to_dict()
        sinks = self.sinks.sort_values(["sample", "image", "tile", "patch"])
        by_image = {k: g for k, g in sinks.groupby(["sample", "image"], sort=False)}
        special = self.special[self.special["is_sink"]] if self.spec.include_special else None
        for (s, i), _ in self.patches.groupby(["sample", "image"], sort=True):
            g = by_image.get((s, i))
            rec = {"image": self._label(int(s), int(i), per_sample[s]),
                   "sinks": [] if g is None else [
                       {"patch": int(r.patch), "row": int(r.row), "col": int(r.col), "norm": float(r.norm),
                        "llm_pos": int(r.llm_pos), "tile": int(r.tile)} for r in g.itertuples(index=False)]}
            if special is not None:
                sp = special[(special["sample"] == s) & (special["image"] == i)]
                rec["special"] = [{"role": r.role, "tile": int(r.tile), "norm": float(r.norm)} for r in sp.itertuples(index=False)]
            recs.append(rec)
        return recs

    @classmethod
    def concat(cls, sets: Sequence["SinkSet"]) -> "SinkSet":
        """One SinkSet over several batches: samples are renumbered in order and a ``batch`` column
        says where each row came from (its item/position columns index that batch's tensors)."""
        if not sets:
            raise SinkError("nothing to concatenate")
        if len({s.spec.fingerprint() for s in sets}) > 1:
            raise SinkError("cannot concatenate SinkSets detected with different specs")
        patches, special, ids, offset = [], [], [], 0
        for k, s in enumerate(sets):
            for src, dst in ((s.patches, patches), (s.special, special)):
                f = src.copy()
                if "batch" not in f.columns:
                    f.insert(0, "batch", k)
                f["sample"] += offset
                dst.append(f)
            ids.extend(s.ids if s.ids is not None else range(offset, offset + s.n_samples))
            offset += s.n_samples
        return cls(sets[0].spec, pd.concat(patches, ignore_index=True), pd.concat(special, ignore_index=True), ids)

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write patches.parquet, special.parquet and sinkset.json into a directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_parquet(path / "patches.parquet", self.patches)
        write_parquet(path / "special.parquet", self.special)
        meta = {"spec": self.spec.to_dict(), "ids": [_plain(i) for i in self.ids] if self.ids is not None else None}
        write_text(path / "sinkset.json", json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SinkSet":
        path = Path(path)
        if not (path / "sinkset.json").is_file():
            raise SinkError(f"{path} is not a saved SinkSet (no sinkset.json)")
        meta = json.loads((path / "sinkset.json").read_text())
        return cls(SinkSpec.from_dict(meta["spec"]), pd.read_parquet(path / "patches.parquet"),
                   pd.read_parquet(path / "special.parquet"), meta["ids"])


def _plain(v):
    return v.item() if hasattr(v, "item") else v


# -- detection --------------------------------------------------------------------------------
def _site_tensor(acts, spec: SinkSpec) -> torch.Tensor:
    if isinstance(acts, Mapping):
        if spec.site not in acts:
            raise SinkError(f"no activations at {spec.site} (have: {', '.join(acts)})")
        return acts[spec.site]
    return acts


def _scores(acts, token_map: TokenMap, spec: SinkSpec) -> dict[str, np.ndarray]:
    x = _site_tensor(acts, spec)
    scores = score_tokens(x, spec)
    item, pos = _AXIS_COLUMNS[spec.axis]
    norm = {kind: frame_scores(x, {c: token_map.column(table, c) for c in (item, pos)}, spec.axis, spec, scores)
            for kind, table in (("patch", "patches"), ("special", "special"))}
    if len(norm["patch"]) and np.isnan(norm["patch"]).all():
        raise SinkError(f"no image patch has a token at {spec.site}")
    return norm


def scores_and_flags(acts, token_map: TokenMap, spec: SinkSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"patch": (score, is_sink), "special": (score, is_sink)}, row-aligned with the TokenMap's
    ``patches`` and ``special`` (score NaN where a row has no token at the site). Numpy only: the
    activation cache calls this on every batch; ``detect_acts`` wraps it in a SinkSet."""
    norm = _scores(acts, token_map, spec)
    tables = {"patch": "patches", "special": "special"}
    judged = ["patch", *(["special"] if spec.include_special else [])]
    parts = []
    for src, kind in enumerate(judged):
        idx = np.flatnonzero(~np.isnan(norm[kind]))
        parts.append({"norm": norm[kind][idx], "src": np.full(len(idx), src), "idx": idx,
                      **{c: token_map.column(tables[kind], c)[idx] for c in GROUPS["tile"]}})
    cands = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    flags = _flag(cands, spec)
    out = {}
    for src, kind in enumerate(("patch", "special")):
        hit = np.zeros(len(norm[kind]), dtype=bool)
        if kind in judged:
            hit[cands["idx"][(cands["src"] == judged.index(kind)) & flags]] = True
        out[kind] = (norm[kind], hit)
    return out


def detect_acts(acts: torch.Tensor | Mapping[str, torch.Tensor], token_map: TokenMap, sinks: SinkSpec | None = None,
                *, ids: Sequence | None = None) -> SinkSet:
    """Sinks from activations already read at ``sinks.site`` (a tensor, or a dict holding that site)."""
    spec = sinks or SinkSpec()
    got = scores_and_flags(acts, token_map, spec)
    patches, special = token_map.patches.copy(), token_map.special.copy()
    patches["norm"], patches["is_sink"] = got["patch"]
    special["norm"], special["is_sink"] = got["special"]
    if ids is not None and len(ids) != token_map.roles.shape[0]:
        raise SinkError(f"{len(ids)} ids for a batch of {token_map.roles.shape[0]} samples")
    return SinkSet(spec, patches, special, list(ids) if ids is not None else None, token_map)


def detect(model, batch, sinks: SinkSpec | None = None, *, ids: Sequence | None = None) -> SinkSet:
    """Detect sinks in a batch with one forward pass that reads ``sinks.site`` (default SinkSpec())."""
    spec = sinks or SinkSpec()
    acts = model.run(batch, read=[spec.site])
    return detect_acts(acts, batch.token_map, spec, ids=ids)


def candidate_scores(acts, token_map: TokenMap, spec: SinkSpec) -> np.ndarray:
    """Scores of every candidate token (patches, plus special tokens with include_special) -> [n]."""
    norm = _scores(acts, token_map, spec)
    kinds = ["patch", *(["special"] if spec.include_special else [])]
    return np.concatenate([norm[k][~np.isnan(norm[k])] for k in kinds])


def calibrate_acts(pairs: Iterable[tuple[Any, TokenMap]], sinks: SinkSpec | None = None, q: float = 0.99,
                   sketch: QuantileSketch | None = None) -> SinkSpec:
    """Calibrate the quantile rule from (activations, token_map) pairs; streams, holding only a
    fixed-size sketch. Returns ``sinks`` with rule 'quantile' and its threshold ``tau`` set."""
    spec = sinks or SinkSpec()
    sketch = sketch if sketch is not None else QuantileSketch()
    for acts, tm in pairs:
        sketch.update(candidate_scores(acts, tm, spec))
    return spec.replace(rule="quantile", params={"q": q, "tau": sketch.quantile(q), "n_calib": sketch.n})


def calibrate(model, batches: Iterable, sinks: SinkSpec | None = None, q: float = 0.99,
              sketch: QuantileSketch | None = None) -> SinkSpec:
    """Calibrate the quantile rule on a dataset: ``tau`` = the ``q`` quantile of candidate scores
    over all batches (one forward each). Pass a ``sketch`` to keep (and later merge) the histogram."""
    spec = sinks or SinkSpec()
    return calibrate_acts(((model.run(b, read=[spec.site]), b.token_map) for b in batches), spec, q, sketch)


# -- over a dataset ----------------------------------------------------------------------------
def detect_dataset(model, data, sinks: SinkSpec | None = None, *, batch_size: int = 8, prompt: str | None = None,
                   errors=None, progress: bool | str = False, norms=None) -> SinkSet:
    """Detect sinks on every readable sample of ``data`` (a Dataset, Samples, a Batch or Batches).

    Images go in with ``prompt``, else the dataset's own prompt, else the model's neutral
    question. The quantile rule without ``tau`` is calibrated on the same images first (one more
    pass). Unreadable images are skipped and listed in ``errors``. ``norms``: a
    ``mechsink.sinks.norms.NormConfig``; the same forwards then also profile every ViT layer's
    token norms into ``result.norms`` (a NormProfile). Under ``torchrun`` the chunks are shared
    out by rank (calibration too: the ranks' sketches are merged) and every rank returns the
    SinkSet of a single process.
    """
    from ..batching import batches
    from ..distributed import fail_together, gather
    spec = sinks if sinks is not None else SinkSpec()
    if not isinstance(spec, SinkSpec):
        raise SinkError(f"sinks must be a SinkSpec to detect on a dataset, got {type(spec).__name__}")
    data = list(data) if not hasattr(data, "__getitem__") else data

    def chunks(label):
        return batches(model, data, batch_size, answers=False, prompt=prompt, errors=errors, progress=label, shard=True)

    if spec.rule == "quantile" and spec.params.get("tau") is None:
        spec = _calibrated(model, chunks("calibrate" if progress else False), spec)
        log.info("calibrated the quantile rule: tau = %.4g over %d tokens", spec.params["tau"], spec.params["n_calib"])
        errors = None        # the calibration pass has listed the unreadable images already
    profile = None
    if norms is not None:
        from .norms import NormProfiler
        profile = NormProfiler(model, norms)
    sets, rows = [], []                          # (chunk number, ...): merged over torchrun ranks
    with fail_together():
        for chunk in chunks("detect" if progress is True else progress):
            reads = [spec.site, *(profile.sites if profile is not None else [])]
            acts = model.run(chunk.batch, read=list(dict.fromkeys(reads)))
            ids = [s.image_path or s.id for s in chunk.samples] if chunk.samples is not None else chunk.ids
            sets.append((chunk.number, detect_acts(acts, chunk.batch.token_map, spec, ids=ids)))
            if profile is not None:
                n = len(profile.rows)
                profile.add(acts, chunk.batch.token_map, chunk.start)
                rows.append((chunk.number, profile.rows[n:]))
    sets = gather(sets)
    if not sets:
        raise SinkError("no readable images to detect sinks in")
    out = SinkSet.concat(sets) if len(sets) > 1 else sets[0]
    if profile is not None:
        profile.rows = [f for part in gather(rows) for f in part]
        out.norms = profile.result()
    return out


def _calibrated(model, chunks, spec: SinkSpec) -> SinkSpec:
    """The quantile rule with ``tau`` set, as ``calibrate`` sets it, from every rank's chunks: each
    rank's sketch holds its chunks' scores, and the sketches merge exactly (counts add up)."""
    from ..distributed import fail_together, gather
    relative = spec.replace(rule="relative")
    mine = QuantileSketch()
    with fail_together():
        for c in chunks:
            mine.update(candidate_scores(model.run(c.batch, read=[relative.site]), c.batch.token_map, relative))
    sketch = QuantileSketch()
    for part in gather([(0, mine)]):
        sketch.merge(part)
    q = spec.params["q"]
    return relative.replace(rule="quantile", params={"q": q, "tau": sketch.quantile(q), "n_calib": sketch.n})
