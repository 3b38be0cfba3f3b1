"""Relevance maps: where a visual token looks inside the ViT, drawn over the patch grid.

    rm = relevance_maps(model, batch, sinks, layer=10)           # every patch's attention row
    rm.frame                                                     # one row per token, with its spread
    rm.figure(batch.images)                                      # sinks next to non-sinks, over the image

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

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import MechsinkError

DIRECTIONS = ("row", "column")


class AnalysisError(MechsinkError, ValueError):
    """An analysis asked for something the model or batch does not have."""


@dataclass
class RelevanceMaps:
    """``frame``: one row per token (sample, image, tile, row, col, patch, norm, is_sink, layer,
    direction, head, entropy, spread, frac_above_uniform, peak_patch, peak_weight, special_mass);
    ``maps``: [n, grid_rows, grid_cols] float, row i of ``frame`` is ``maps[i]`` (sums to 1)."""
    frame: pd.DataFrame
    maps: np.ndarray

    def summary(self) -> pd.DataFrame:
        """Mean spread numbers of sinks and non-sinks with bootstrap CIs."""
        from ..stats import bootstrap_ci
        rows = []
        for is_sink, g in self.frame.groupby("is_sink", sort=False):
            for col in ("spread", "frac_above_uniform", "peak_weight"):
                x = g[col].to_numpy(dtype=float)
                est, lo, hi = (bootstrap_ci(x, method="percentile") if len(x) >= 2
                               else (float(x.mean()), np.nan, np.nan))
                rows.append({"token_set": "sinks" if is_sink else "nonsinks", "measure": col, "n": len(x),
                             "mean": est, "ci_low": lo, "ci_high": hi})
        return pd.DataFrame(rows)

    def figure(self, images: Sequence, per_set: int = 3, alpha: float = 0.6):
        """Up to ``per_set`` sink maps (top row) and non-sink maps (bottom row), each over its image.
        images: per sample, an image or a list of images (``batch.images``)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        f = self.frame
        picks = [f.index[f["is_sink"]][:per_set], f.index[~f["is_sink"]][:per_set]]
        ncols = max(1, max(len(p) for p in picks))
        fig = Figure(figsize=(2.6 * ncols, 5.4), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, ncols, squeeze=False)
        for r, (label, idx) in enumerate(zip(("sink", "non-sink"), picks)):
            for c in range(ncols):
                ax = axes[r][c]
                if c >= len(idx):
                    ax.axis("off")
                    continue
                i = int(idx[c])
                row = f.loc[i]
                im = images[int(row["sample"])]
                im = im[int(row["image"])] if isinstance(im, (list, tuple)) else im
                draw_map(ax, self.maps[f.index.get_loc(i)], im, marker=(int(row["row"]), int(row["col"])), alpha=alpha)
                ax.set_title(f"{label} ({int(row['row'])},{int(row['col'])}) spread {row['spread']:.2f}", fontsize=8)
        return fig


def draw_map(ax, rmap: np.ndarray, image=None, *, marker: tuple[int, int] | None = None, alpha: float = 0.6,
             cmap: str = "magma") -> None:
    """Draw a [rows, cols] map over ``image`` (stretched to the image; exact for square images
    the processor does not crop) on a matplotlib axes; ``marker`` = (row, col) of the token."""
    rows, cols = rmap.shape
    if image is not None:
        w, h = image.size
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, w, h, 0))
    else:
        w, h = cols, rows
    ax.imshow(rmap, extent=(0, w, h, 0), alpha=alpha if image is not None else 1.0, cmap=cmap,
              interpolation="nearest")
    if marker is not None:
        r, c = marker
        ax.scatter([(c + 0.5) * w / cols], [(r + 0.5) * h / rows], s=30, marker="x", color="cyan")
    ax.set_xticks([])
    ax.set_yticks([])


def spread_stats(maps: np.ndarray) -> pd.DataFrame:
    """Spread numbers of maps [n, ...] (each summing to 1 over its patches)."""
    p = maps.reshape(len(maps), -1).astype(np.float64)
    n = p.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return pd.DataFrame({"entropy": ent, "spread": ent / np.log(n) if n > 1 else np.zeros(len(p)),
                         "frac_above_uniform": (p > 1.0 / n).mean(1), "peak_patch": p.argmax(1),
                         "peak_weight": p.max(1)})


def _select(sinks, tokens) -> pd.DataFrame:
    p = sinks.patches
    if isinstance(tokens, pd.DataFrame):
        return tokens
    if tokens == "all":
        return p
    if tokens == "sinks":
        return p[p["is_sink"]]
    if tokens == "nonsinks":
        return p[~p["is_sink"]]
    raise AnalysisError(f"tokens must be 'all', 'sinks', 'nonsinks' or rows of sinks.patches, got {tokens!r}")


def relevance_acts(pattern: torch.Tensor, sinks, layer: int, *, direction: str = "row", tokens="all",
                   head: int | None = None) -> RelevanceMaps:
    """Maps from one ViT attention pattern already read: [items, heads, seq, seq] (or
    [heads, seq, seq] for a flat ViT), indexed by the patch table's ``vit_item``/``vit_pos``."""
    if direction not in DIRECTIONS:
        raise AnalysisError(f"direction must be 'row' (what the token attends to) or 'column' (what it "
                            f"receives), got {direction!r}")
    p = pattern.detach().float()
    if p.dim() == 3:
        p = p[None]
    if head is not None and not 0 <= head < p.shape[1]:
        raise AnalysisError(f"head {head} out of range: the pattern has {p.shape[1]} heads")
    p = p.mean(1) if head is None else p[:, head]                                 # [items, seq, seq]
    rows = _select(sinks, tokens)
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
    frame["layer"], frame["direction"], frame["head"] = layer, direction, -1 if head is None else head
    arr = np.stack(maps)
    frame = pd.concat([frame, spread_stats(arr)], axis=1)
    frame["special_mass"] = special_mass
    return RelevanceMaps(frame, arr)


def relevance_maps(model, batch, sinks, layer: int, *, direction: str = "row", tokens="all",
                   head: int | None = None) -> RelevanceMaps:
    """Relevance maps of the selected tokens (``"all"``, ``"sinks"``, ``"nonsinks"`` or rows of
    ``sinks.patches``) at ViT ``layer`` (one forward reading the attention pattern)."""
    n = model.n_vit_layers
    if not -n <= layer < n:
        raise AnalysisError(f"ViT layer {layer} out of range: {model.name} has {n} (0..{n - 1})")
    layer = layer % n
    site = f"vit.blocks.{layer}.attn.hook_pattern"
    pattern = model.run(batch, read=[site])[site]
    return relevance_acts(pattern, sinks, layer, direction=direction, tokens=tokens, head=head)
