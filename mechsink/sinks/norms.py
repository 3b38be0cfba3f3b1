"""How far the largest token norm stands out, layer by layer: the natural high-norm tokens.

For every image (tile) and ViT layer: the largest patch norm over the image's median patch norm,
and whether any patch exceeds ``ratio`` x the median. One row per image x layer in the frame; the
summary is the per-layer median over images (images are the unit). Profiled in the same forwards
as detection (``detect_dataset(..., norms=NormConfig())``) or on its own (``norm_profile``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import Config
from ..results import Result
from .rules import SinkError


@dataclass(frozen=True)
class NormConfig(Config):
    """part: "vit" (the encoder's blocks); layers: None = every block; ratio: the outlier line."""
    part: str = "vit"
    layers: tuple[int, ...] | None = None
    ratio: float = 3.0

    def __post_init__(self):
        if self.part != "vit":
            raise SinkError(f"norm profiles are taken in the vision encoder (part 'vit'), not {self.part!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        if not self.ratio > 1:
            raise SinkError(f"ratio must be above 1, got {self.ratio}")


@dataclass
class NormProfile(Result):
    """frame: image (global sample index), tile, layer, max_over_median, has_outlier."""
    config_class = NormConfig

    def table(self) -> pd.DataFrame:
        """Per layer: the median over images of max/median, and the fraction of images with an outlier."""
        g = self.frame.groupby("layer", sort=True)
        return pd.DataFrame({"layer": g.size().index.astype(int),
                             "median_max_over_median": g["max_over_median"].median().to_numpy(),
                             "frac_images_with_outlier": g["has_outlier"].mean().to_numpy()})

    def summary(self) -> dict:
        t = self.table()
        return {"n_images": int(self.frame[["sample", "image", "tile"]].drop_duplicates().shape[0]),
                "layers": t.to_dict("records")}


class NormProfiler:
    """Accumulates a NormProfile batch by batch (the caller runs the forwards and reads ``sites``)."""

    def __init__(self, model, config: NormConfig | None = None):
        self.config = config or NormConfig()
        layers = self.config.layers if self.config.layers is not None else range(model.n_vit_layers)
        self.layers = list(layers)
        self.sites = [f"vit.blocks.{l}.hook_resid_post" for l in self.layers]
        self.rows: list[pd.DataFrame] = []

    def add(self, acts: dict, token_map, start: int = 0) -> None:
        p = token_map.patches
        groups = list(p.groupby(["sample", "image", "tile"]).indices.items())
        for layer, site in zip(self.layers, self.sites):
            x = acts[site][token_map.index("vit", p)].float().norm(dim=-1).cpu().numpy()
            out = []
            for (s, i, t), idx in groups:
                med = float(np.median(x[idx]))
                top = float(x[idx].max())
                out.append((start + int(s), int(i), int(t), layer, top / med if med > 0 else np.nan,
                            bool(top > self.config.ratio * med)))
            self.rows.append(pd.DataFrame(out, columns=["sample", "image", "tile", "layer", "max_over_median",
                                                        "has_outlier"]))

    def result(self) -> NormProfile:
        cols = ["sample", "image", "tile", "layer", "max_over_median", "has_outlier"]
        if not self.rows:
            return NormProfile(pd.DataFrame(columns=cols), self.config)
        frame = pd.concat(self.rows, ignore_index=True).sort_values(cols[:4], ignore_index=True)
        return NormProfile(frame, self.config)


def norm_profile(model, data, config: NormConfig | None = None, *, batch_size: int = 8, errors=None,
                 progress: bool | str = False) -> NormProfile:
    """The per-layer norm profile of every readable sample of ``data``."""
    from ..batching import batches
    prof = NormProfiler(model, config)
    for chunk in batches(model, data, batch_size, answers=False, errors=errors, progress=progress):
        prof.add(model.run(chunk.batch, read=prof.sites), chunk.batch.token_map, chunk.start)
    return prof.result()
