"""Relevance maps: where a visual token looks inside the ViT, drawn over the patch grid.

    rm = relevance_maps(model, batch, sinks, layer=10)           # every image token's attention row
    rm.frame                                                     # one row per token, with its spread
    rm.table()                                                   # mean spread of sinks and non-sinks
    report.figures.relevance_figure(rm, batch.images)            # sinks next to non-sinks, over the image

Settings: :class:`RelevanceConfig` (``layer``, ``direction``, ``tokens``: a token set ``image``,
``sinks`` or ``nonsinks``, ``head``); the result is a :class:`RelevanceMaps` (a
:class:`mechsink.results.Result` whose maps are saved beside the frame as safetensors).

A token's map at ViT layer ``l`` is, by default, its own attention **row** (``direction="row"``): the
attention probabilities it gives to every patch of its tile, averaged over heads (or one ``head``).
This is what the paper draws for a sink: the region the token gathers information from.
``direction="column"`` gives the attention the token *receives* from every patch query instead.
Maps cover patches only: the mass on CLS/register tokens is reported as ``special_mass`` and the
patch part renormalised to sum to 1.

Spread numbers per map (n patches): ``entropy`` (nats), ``spread`` = entropy / log(n) (1 =
uniform, 0 = one patch), ``frac_above_uniform`` = share of patches above 1/n, and the peak.
Sinks are expected broad, ordinary patches local.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import Config, coerce
from ..results import Result, ResultError
from .errors import AnalysisError
from .tokens import pick, token_set

DIRECTIONS = ("row", "column")
MAPS = "maps.safetensors"


@dataclass(frozen=True)
class RelevanceConfig(Config):
    """layer: ViT layer (negative counts from the end). direction: "row" (what the token attends
    to) or "column" (what it receives). tokens: token set ``image``, ``sinks`` or ``nonsinks``
    (None: explicit rows were given). head: one head, or None for the mean over heads."""
    layer: int = 0
    direction: str = "row"
    tokens: str | None = "image"
    head: int | None = None

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise AnalysisError(f"direction must be 'row' (what the token attends to) or 'column' (what it "
                                f"receives), got {self.direction!r}")
        if self.tokens is not None:
            object.__setattr__(self, "tokens", token_set(self.tokens))
        object.__setattr__(self, "layer", int(self.layer))


@dataclass
class RelevanceMaps(Result):
    """``frame``: one row per token (sample, image, tile, row, col, patch, norm, is_sink, layer,
    direction, head, entropy, spread, frac_above_uniform, peak_patch, peak_weight, special_mass);
    ``maps``: [n, grid_rows, grid_cols] float, row i of ``frame`` is ``maps[i]`` (sums to 1)."""
    maps: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.float32))
    config_class = RelevanceConfig

    def table(self, alpha: float = 0.05) -> pd.DataFrame:
        """Mean spread numbers of sinks and non-sinks with bootstrap CIs."""
        from ..stats import bootstrap_ci
        rows = []
        for is_sink, g in self.frame.groupby("is_sink", sort=False):
            for col in ("spread", "frac_above_uniform", "peak_weight"):
                x = g[col].to_numpy(dtype=float)
                est, lo, hi = (bootstrap_ci(x, method="percentile", alpha=alpha) if len(x) >= 2
                               else (float(x.mean()), np.nan, np.nan))
                rows.append({"token_set": "sinks" if is_sink else "nonsinks", "measure": col, "n": len(x),
                             "mean": est, "ci_low": lo, "ci_high": hi})
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        """Number of maps and the mean spread numbers of sinks and non-sinks (no CIs: ``table``)."""
        f = self.frame
        means = {("sinks" if k else "nonsinks"): {c: float(g[c].mean()) for c in ("spread", "frac_above_uniform",
                                                                                  "peak_weight")}
                 for k, g in f.groupby("is_sink", sort=False)}
        return {"n_rows": int(len(f)), **means}

    def save(self, path: str | os.PathLike, *, summary: bool = True) -> Path:
        from safetensors.numpy import save_file
        out = super().save(path, summary=summary)
        tmp = out / f".{MAPS}.tmp"
        save_file({"maps": np.ascontiguousarray(self.maps)}, str(tmp))
        os.replace(tmp, out / MAPS)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RelevanceMaps":
        from safetensors.numpy import load_file
        res = super().load(path)
        try:
            res.maps = load_file(str(Path(path) / MAPS))["maps"]
        except FileNotFoundError:
            raise ResultError(f"{path} holds no relevance maps ({MAPS} is missing)") from None
        return res


def spread_stats(maps: np.ndarray) -> pd.DataFrame:
    """Spread numbers of maps [n, ...] (each summing to 1 over its patches)."""
    p = maps.reshape(len(maps), -1).astype(np.float64)
    n = p.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return pd.DataFrame({"entropy": ent, "spread": ent / np.log(n) if n > 1 else np.zeros(len(p)),
                         "frac_above_uniform": (p > 1.0 / n).mean(1), "peak_patch": p.argmax(1),
                         "peak_weight": p.max(1)})


def _select(sinks, tokens) -> tuple[pd.DataFrame, str | None]:
    """(rows of sinks.patches, token set name or None for explicit rows)."""
    if isinstance(tokens, pd.DataFrame):
        return tokens, None
    name = token_set(tokens)
    return pick(sinks.patches, name), name


def _config(config, settings: dict, tokens) -> RelevanceConfig:
    if isinstance(tokens, pd.DataFrame):
        settings = {**settings, "tokens": None}
    elif tokens is not None:
        settings = {**settings, "tokens": tokens}
    config = coerce(RelevanceConfig, config)
    return config.replace(**settings) if settings else config


def relevance_acts(pattern: torch.Tensor, sinks, layer: int | None = None, *, config: RelevanceConfig | None = None,
                   tokens=None, **settings) -> RelevanceMaps:
    """Maps from one ViT attention pattern already read: [items, heads, seq, seq] (or
    [heads, seq, seq] for a flat ViT), indexed by the patch table's ``vit_item``/``vit_pos``.
    Settings: ``config`` and/or keywords (direction, head) of :class:`RelevanceConfig`; ``tokens``
    a token set name or rows of ``sinks.patches``."""
    if layer is not None:
        settings["layer"] = layer
    config = _config(config, settings, tokens)
    rows, _ = _select(sinks, tokens if isinstance(tokens, pd.DataFrame) else config.tokens)
    direction, head = config.direction, config.head
    p = pattern.detach().float()
    if p.dim() == 3:
        p = p[None]
    if head is not None and not 0 <= head < p.shape[1]:
        raise AnalysisError(f"head {head} out of range: the pattern has {p.shape[1]} heads")
    p = p.mean(1) if head is None else p[:, head]                                 # [items, seq, seq]
    allp = sinks.patches
    special = sinks.special
    grids = sinks.token_map.grids if sinks.token_map is not None else {}
    maps, meta, special_mass = [], [], []
    group = ["sample", "image", "tile"]
    tiles = dict(list(allp.groupby(group, sort=False)))
    specials = dict(list(special.groupby(group, sort=False))) if len(special) else {}
    for key, g in rows.groupby(group, sort=True):
        tile = tiles[key]
        n_r, n_c = grids.get(tuple(int(k) for k in key), (int(tile["row"].max()) + 1, int(tile["col"].max()) + 1))
        item = int(tile["vit_item"].iloc[0])
        m = p[max(item, 0)]                      # flat ViTs (item -1) hold one sequence
        ppos = torch.tensor(tile["vit_pos"].to_numpy())
        spos = specials[key]["vit_pos"].to_numpy() if key in specials else np.array([], dtype=np.int64)
        for _, t in g.iterrows():
            v = m[int(t["vit_pos"])] if direction == "row" else m[:, int(t["vit_pos"])]
            patch_w = v[ppos]
            total = float(v[torch.tensor(spos)].sum()) if len(spos) else 0.0
            grid = torch.zeros(n_r * n_c)
            grid[torch.tensor(tile["row"].to_numpy() * n_c + tile["col"].to_numpy())] = patch_w.cpu()
            s = float(grid.sum())
            maps.append((grid / s if s > 0 else grid).reshape(n_r, n_c).numpy())
            meta.append(t)
            special_mass.append(total)
    if not maps:
        raise AnalysisError("no tokens selected for relevance maps")
    frame = pd.DataFrame(meta).reset_index(drop=True)
    keep = [c for c in ("sample", "image", "tile", "row", "col", "patch", "vit_pos", "llm_pos", "norm", "is_sink")
            if c in frame.columns]
    frame = frame[keep].copy()
    frame["layer"], frame["direction"], frame["head"] = config.layer, direction, -1 if head is None else head
    arr = np.stack(maps)
    frame = pd.concat([frame, spread_stats(arr)], axis=1)
    frame["special_mass"] = special_mass
    return RelevanceMaps(frame, config, {"n_tokens": int(len(frame))}, maps=arr)


def relevance_maps(model, batch, sinks, layer: int | None = None, *, config: RelevanceConfig | None = None,
                   tokens=None, **settings) -> RelevanceMaps:
    """Relevance maps of the selected tokens (token set ``"image"``, ``"sinks"``, ``"nonsinks"`` or
    rows of ``sinks.patches``) at ViT ``layer`` (one forward reading the attention pattern).
    Settings: ``config`` (a RelevanceConfig) and/or its fields as keywords."""
    if layer is not None:
        settings["layer"] = layer
    config = _config(config, settings, tokens)
    n = model.n_vit_layers
    if not -n <= config.layer < n:
        raise AnalysisError(f"ViT layer {config.layer} out of range: {model.name} has {n} (0..{n - 1})")
    config = config.replace(layer=config.layer % n)
    site = f"vit.blocks.{config.layer}.attn.hook_pattern"
    pattern = model.run(batch, read=[site])[site]
    return relevance_acts(pattern, sinks, config=config, tokens=tokens if isinstance(tokens, pd.DataFrame) else None)
