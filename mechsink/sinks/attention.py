"""How much attention visual tokens receive, split by sink status and ViT norm.

    att = llm_attention(model, batch, sinks, queries=("last",))   # tidy: one row per layer, head, token
    sink_ratio(att)                                                # sink / non-sink mean, bootstrap CI over images
    norm_bins(att, bins=4)                                         # mean received attention per ViT-norm bin
    vit_attention(model, batch, sinks)                             # the same inside the ViT

Received attention of a key token is the attention probability it gets, averaged over the chosen
query tokens. In the LLM the queries are tokens by role (``text``, ``answer``, or ``last``: the
last prompt token), taken only after the image so that causal zeros do not dilute the mean; in
the ViT they are the patch and/or CLS/register tokens of the same tile. ``llm_attention`` and
``vit_attention`` stream: in one forward each read block runs eagerly (the others keep the
model's attention implementation), its pattern ([batch, heads, seq, seq]) is reduced to the
attention each token receives as soon as the block has run and is then dropped, so no more than one
layer's pattern exists at a time, and the forward stops after the last block read.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..results import Result
from ..tokens import ROLE
from ..trace import stream_patterns
from .detect import SinkSet, SinkSpec, detect
from .rules import SinkError

LLM_QUERY_ROLES = ("text", "answer", "last")
VIT_QUERY_KINDS = ("patch", "special")
KEY_COLUMNS = ["sample", "image", "tile", "row", "col", "llm_pos", "norm", "is_sink"]


def _layers(model, part: str, layers) -> list[int]:
    n = model.n_llm_layers if part == "llm" else model.n_vit_layers
    out = list(range(n)) if layers is None else [int(l) for l in layers]
    bad = [l for l in out if not 0 <= l < n]
    if bad:
        raise SinkError(f"{part} layers {bad} out of range: {model.name} has {n} (0..{n - 1})")
    return out


def _sinkset(model, batch, sinks: SinkSet | SinkSpec | None) -> SinkSet:
    """The batch's SinkSet: as given, or detected under a SinkSpec (default SinkSpec())."""
    if sinks is None or isinstance(sinks, SinkSpec):
        return detect(model, batch, sinks or SinkSpec())
    return sinks


def _tidy(per_layer: list[tuple[int, np.ndarray]], keys: pd.DataFrame, part: str, per_head: bool) -> pd.DataFrame:
    """Rows (layer, head, key) from {layer: attn [heads, n_keys]}; head -1 = mean over heads."""
    frames = []
    for layer, a in per_layer:
        if not per_head:
            a = a.mean(0, keepdims=True)
        heads = np.arange(a.shape[0]) if per_head else np.array([-1])
        f = keys.loc[np.tile(np.arange(len(keys)), len(heads))].reset_index(drop=True)
        f.insert(0, "head", np.repeat(heads, len(keys)))
        f.insert(0, "layer", layer)
        f.insert(0, "part", part)
        f["attn"] = a.reshape(-1)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


# -- LLM --------------------------------------------------------------------------------------
def llm_query_mask(roles: np.ndarray, last_pos: Sequence[int], key_pos: Mapping[int, np.ndarray],
                   queries: Sequence[str]) -> np.ndarray:
    """Bool [batch, seq]: query positions with the chosen roles that come after the sample's last
    image token. ``last`` selects the last prompt token."""
    bad = [q for q in queries if q not in LLM_QUERY_ROLES]
    if bad or not queries:
        raise SinkError(f"unknown query roles {bad or list(queries)}; choose from {', '.join(LLM_QUERY_ROLES)}")
    codes = [ROLE[q] for q in queries if q != "last"]
    mask = np.isin(roles, codes)
    for s in range(roles.shape[0]):
        if "last" in queries:
            mask[s, int(last_pos[s])] = True
        first = key_pos[s].max() + 1 if s in key_pos and len(key_pos[s]) else 0
        mask[s, :first] = False
    return mask


def llm_attention_acts(patterns: Mapping[int, torch.Tensor], sinks: SinkSet, roles: np.ndarray,
                       last_pos: Sequence[int], queries: Sequence[str] = ("text", "answer"),
                       per_head: bool = True) -> pd.DataFrame:
    """Received attention of every LLM image token from patterns already read.

    patterns: {layer: [batch, heads, seq, seq]}. Returns part, layer, head, sample, image, tile,
    row, col, llm_pos, norm (ViT score, max over merged patches), is_sink, n_patches, attn."""
    keys, by_sample, key_pos, qmask = _llm_keys(sinks, roles, last_pos, queries)
    out = [(int(layer), _llm_received(patterns[layer], by_sample, key_pos, qmask, len(keys))) for layer in sorted(patterns)]
    cols = KEY_COLUMNS + ["n_patches"]
    return _tidy(out, keys[cols], "llm", per_head)


def _llm_keys(sinks: SinkSet, roles: np.ndarray, last_pos: Sequence[int], queries: Sequence[str]):
    keys = sinks.llm_tokens()
    keys = keys[keys["role"] == "image"].reset_index(drop=True)
    by_sample = {int(s): g.index.to_numpy() for s, g in keys.groupby("sample")}
    key_pos = {s: keys.loc[i, "llm_pos"].to_numpy() for s, i in by_sample.items()}
    qmask = llm_query_mask(roles, last_pos, key_pos, queries)
    missing = [s for s in by_sample if not qmask[s].any()]
    if missing:
        raise SinkError(f"samples {missing} have no {'/'.join(queries)} query token after the image")
    return keys, by_sample, key_pos, qmask


def _llm_received(pattern: torch.Tensor, by_sample, key_pos, qmask: np.ndarray, n_keys: int) -> np.ndarray:
    """[heads, n_keys]: one layer's attention received by each image token, mean over its queries."""
    p = pattern.detach()
    a = np.zeros((p.shape[1], n_keys))
    for s, rows in by_sample.items():
        q = torch.as_tensor(np.nonzero(qmask[s])[0], device=p.device)
        k = torch.as_tensor(np.array(key_pos[s]), device=p.device)
        a[:, rows] = p[s][:, q][:, :, k].float().mean(1).cpu().numpy()
    return a


def llm_attention(model, batch, sinks: SinkSet | SinkSpec | None = None, *, queries: Sequence[str] = ("text", "answer"),
                  layers: Sequence[int] | None = None, per_head: bool = True) -> pd.DataFrame:
    """Attention each LLM image token receives from ``queries`` at every layer (or ``layers``) and
    head, with one forward pass (sinks detected in the same pass under a SinkSpec, default
    SinkSpec(), unless a SinkSet of this batch is given)."""
    if isinstance(queries, str):
        queries = (queries,)
    layers = _layers(model, "llm", layers)
    sinks = _sinkset(model, batch, sinks)
    keys, by_sample, key_pos, qmask = _llm_keys(sinks, batch.token_map.roles, batch.last_pos.tolist(), queries)
    per_layer = stream_patterns(model, batch, "llm", layers,
                                lambda p: _llm_received(p, by_sample, key_pos, qmask, len(keys)))
    return _tidy(sorted(per_layer.items()), keys[KEY_COLUMNS + ["n_patches"]], "llm", per_head)


# -- ViT ----------------------------------------------------------------------------------------
def vit_attention_acts(patterns: Mapping[int, torch.Tensor], sinks: SinkSet, queries: Sequence[str] = ("patch", "special"),
                       per_head: bool = True) -> pd.DataFrame:
    """Received attention of every ViT patch from the queries of its own tile.

    patterns: {layer: [items, heads, seq, seq]}, or [heads, tokens, tokens] for flat ViTs
    (Qwen2-VL). Returns part, layer, head, sample, image, tile, row, col, patch, llm_pos, norm,
    is_sink, attn."""
    bad = [q for q in queries if q not in VIT_QUERY_KINDS]
    if bad or not queries:
        raise SinkError(f"unknown ViT query kinds {bad or list(queries)}; choose from {', '.join(VIT_QUERY_KINDS)}")
    keys, groups = _vit_keys(sinks, queries)
    out = [(int(layer), _vit_received(patterns[layer], groups, len(keys))) for layer in sorted(patterns)]
    return _tidy(out, keys[KEY_COLUMNS[:5] + ["patch"] + KEY_COLUMNS[5:]], "vit", per_head)


def _vit_keys(sinks: SinkSet, queries: Sequence[str]):
    """The key table and, per tile, (key rows, ViT item, query positions, key positions)."""
    bad = [q for q in queries if q not in VIT_QUERY_KINDS]
    if bad or not queries:
        raise SinkError(f"unknown ViT query kinds {bad or list(queries)}; choose from {', '.join(VIT_QUERY_KINDS)}")
    keys = sinks.patches.reset_index(drop=True)
    group = ["sample", "image", "tile"]
    special = {k: g for k, g in sinks.special.groupby(group)} if len(sinks.special) else {}
    groups = []
    for k, g in keys.groupby(group):
        kpos = g["vit_pos"].to_numpy()
        qpos = []
        if "patch" in queries:
            qpos.append(kpos)
        if "special" in queries and k in special:
            qpos.append(special[k]["vit_pos"].to_numpy())
        if qpos:
            groups.append((g.index.to_numpy(), int(g["vit_item"].iloc[0]), np.concatenate(qpos), kpos))
    return keys, groups


def _vit_received(pattern: torch.Tensor, groups, n_keys: int) -> np.ndarray:
    """[heads, n_keys]: one ViT layer's attention received by each patch from its tile's queries.
    pattern: [items, heads, seq, seq], or [heads, tokens, tokens] for flat ViTs (Qwen2-VL)."""
    p = pattern.detach()
    flat = p.dim() == 3
    a = np.zeros((p.shape[-3], n_keys))
    for rows, item, qpos, kpos in groups:
        m = p if flat else p[item]
        q, k = torch.tensor(qpos, device=p.device), torch.tensor(kpos, device=p.device)   # copies: pandas' arrays are read-only
        a[:, rows] = m[:, q][:, :, k].float().mean(1).cpu().numpy()
    return a


def vit_attention(model, batch, sinks: SinkSet | SinkSpec | None = None, *, queries: Sequence[str] = ("patch", "special"),
                  layers: Sequence[int] | None = None, per_head: bool = True) -> pd.DataFrame:
    """Attention each ViT patch receives from the patch and/or CLS/register queries of its tile, at
    every ViT layer (or ``layers``) and head."""
    if isinstance(queries, str):
        queries = (queries,)
    layers = _layers(model, "vit", layers)
    sinks = _sinkset(model, batch, sinks)
    keys, groups = _vit_keys(sinks, queries)
    per_layer = stream_patterns(model, batch, "vit", layers, lambda p: _vit_received(p, groups, len(keys)))
    return _tidy(sorted(per_layer.items()), keys[KEY_COLUMNS[:5] + ["patch"] + KEY_COLUMNS[5:]], "vit", per_head)


# -- summaries ---------------------------------------------------------------------------------
def _per_token(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Average over heads (unless 'head' is in ``by``): one row per token and group."""
    token = ["sample", "image", "tile", "row", "col"] + [c for c in ("llm_pos", "batch", "image_key") if c in df.columns]
    keys = list(dict.fromkeys([*by, *token]))
    return df.groupby(keys, sort=True, dropna=False).agg(norm=("norm", "first"), is_sink=("is_sink", "first"),
                                                         attn=("attn", "mean")).reset_index()


def norm_bins(df: pd.DataFrame, bins: int | Sequence[float] = 4, by: Sequence[str] = ("part", "layer")) -> pd.DataFrame:
    """Mean received attention per ViT-norm bin. ``bins``: a number of quantile bins (edges from
    all tokens' norms) or explicit edges. Columns: by..., bin, bin_low, bin_high, n_tokens,
    attn_mean, attn_sem, sink_frac."""
    t = _per_token(df, by)
    t = t[t["norm"].notna()]
    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise SinkError(f"bins must be >= 1, got {bins}")
        edges = np.unique(np.quantile(t["norm"], np.linspace(0, 1, int(bins) + 1)))
    else:
        edges = np.asarray(sorted(bins), dtype=float)
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0]]) if len(edges) else np.array([0.0, 0.0])
        edges[-1] = np.nextafter(edges[-1], np.inf)
    t = t.assign(bin=pd.cut(t["norm"], edges, include_lowest=True))
    t = t[t["bin"].notna()]
    g = t.groupby([*by, "bin"], sort=True, observed=True)
    out = g.agg(n_tokens=("attn", "size"), attn_mean=("attn", "mean"), attn_sem=("attn", "sem"),
                sink_frac=("is_sink", "mean")).reset_index()
    out.insert(len(by) + 1, "bin_low", [iv.left for iv in out["bin"]])
    out.insert(len(by) + 2, "bin_high", [iv.right for iv in out["bin"]])
    out["bin"] = out["bin"].astype(str)
    return out


def _bootstrap_ratio(s: np.ndarray, n: np.ndarray, n_boot: int, alpha: float, seed: int) -> tuple[float, float, float]:
    """(mean(s) / mean(n), CI) with a bootstrap over images (pairs resampled together)."""
    est = float(s.mean() / n.mean())
    if len(s) < 2:
        return est, np.nan, np.nan

    def stat(idx, axis=-1):
        i = np.asarray(idx).astype(np.int64)
        return s[i].mean(axis) / n[i].mean(axis)
    try:
        from ..stats import bootstrap_ci
        _, lo, hi = bootstrap_ci(np.arange(len(s), dtype=float), stat=stat, n_boot=n_boot, alpha=alpha, seed=seed)
    except ImportError:   # percentile bootstrap when mechsink.stats is absent
        rng = np.random.default_rng(seed)
        boot = stat(rng.integers(0, len(s), size=(n_boot, len(s))))
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)


def sink_ratio(df: pd.DataFrame, by: Sequence[str] = ("part", "layer"), *, n_boot: int = 2000, alpha: float = 0.05,
               seed: int = 0) -> pd.DataFrame:
    """Sink / non-sink ratio of mean received attention, with a bootstrap CI over images.

    Per image: the mean attention of its sink tokens and of its non-sink tokens (heads averaged
    unless 'head' is in ``by``); images without a sink or a non-sink are left out. The ratio is
    mean over images of the sink means / the same of the non-sink means. Columns: by...,
    n_images, sink_mean, nonsink_mean, ratio, ci_low, ci_high."""
    t = _per_token(df, by)
    # the image is the unit: questions that share an image (same image_key) are one observation
    image = ["image_key"] if "image_key" in t.columns else [c for c in ("batch", "sample", "image") if c in t.columns]
    per_image = (t.groupby([*by, *image, "is_sink"], sort=True)["attn"].mean()
                  .unstack("is_sink").reindex(columns=[True, False]).dropna())
    rows = []
    for key, g in per_image.groupby(level=list(range(len(by))), sort=True):
        s, n = g[True].to_numpy(), g[False].to_numpy()
        est, lo, hi = _bootstrap_ratio(s, n, n_boot, alpha, seed)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), "n_images": len(s), "sink_mean": float(s.mean()),
                     "nonsink_mean": float(n.mean()), "ratio": est, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=[*by, "n_images", "sink_mean", "nonsink_mean", "ratio", "ci_low", "ci_high"])


# -- over a dataset ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionConfig(Config):
    """part: "llm" or "vit"; layers: None = all; queries: LLM roles or ViT kinds; bins: ViT-norm
    quantile bins; n_boot/alpha/seed: the bootstrap of the sink / non-sink ratio over images."""
    part: str = "llm"
    layers: tuple[int, ...] | None = None
    queries: tuple[str, ...] | None = None          # default: ("text", "answer") / ("patch", "special")
    per_head: bool = False
    bins: int = 4
    batch_size: int = 8
    n_boot: int = 2000
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.part not in ("llm", "vit"):
            raise SinkError(f"part must be 'llm' or 'vit', got {self.part!r}")
        q = self.queries if self.queries is not None else (("text", "answer") if self.part == "llm" else VIT_QUERY_KINDS)
        q = (q,) if isinstance(q, str) else tuple(q)
        allowed = LLM_QUERY_ROLES if self.part == "llm" else VIT_QUERY_KINDS
        if set(q) - set(allowed):
            raise SinkError(f"queries for the {self.part} are {', '.join(allowed)}, got {list(q)}")
        object.__setattr__(self, "queries", q)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))


@dataclass
class AttentionStats(Result):
    """frame: one row per layer (x head) x visual token, with ``sample`` the global sample index and
    ``image_key`` the image (questions sharing an image are one unit in ``ratio()``)."""
    config_class = AttentionConfig

    def bins(self) -> pd.DataFrame:
        return norm_bins(self.frame, bins=self.config.bins)

    def ratio(self) -> pd.DataFrame:
        c = self.config
        return sink_ratio(self.frame, n_boot=c.n_boot, alpha=c.alpha, seed=c.seed)

    def summary(self) -> dict:
        return {"n_images": int(self.frame["image_key"].nunique()) if len(self.frame) else 0,
                "n_questions": int(self.frame["sample"].nunique()) if len(self.frame) else 0,
                "ratio": self.ratio().to_dict("records")}


def attention_stats(model, data, sinks: SinkSpec | None = None, config: AttentionConfig | None = None, *,
                    errors=None, progress: bool | str = False) -> AttentionStats:
    """Attention received by visual tokens over a dataset, by sink status and ViT norm: one forward
    per batch reads the patterns (and detects sinks with ``sinks``, default SinkSpec()). ``sample``
    is the sample's place in ``data``; under ``torchrun`` the chunks are shared out by rank and every
    rank returns the frame of a single process."""
    from ..batching import batches
    from ..distributed import fail_together, gather_frames
    from ..stats import image_keys
    cfg = config or AttentionConfig()
    spec = sinks if sinks is not None else SinkSpec()
    frames = []                              # (chunk number, rows): merged over torchrun ranks
    with fail_together():
        for chunk in batches(model, data, cfg.batch_size, answers="auto", errors=errors, progress=progress, shard=True):
            if cfg.part == "llm":
                f = llm_attention(model, chunk.batch, spec, queries=cfg.queries, layers=cfg.layers, per_head=cfg.per_head)
            else:
                f = vit_attention(model, chunk.batch, spec, queries=cfg.queries, layers=cfg.layers, per_head=cfg.per_head)
            keys = np.asarray(image_keys(chunk.batch.images))
            local = f["sample"].to_numpy()
            frames.append((chunk.number, f.assign(sample=np.asarray(chunk.indices)[local], image_key=keys[local])))
    frame = gather_frames(frames)
    if frame.empty:
        raise SinkError("no readable images to measure attention on")
    return AttentionStats(frame, cfg, {"model": model.name, "sinks": spec.to_dict()})
