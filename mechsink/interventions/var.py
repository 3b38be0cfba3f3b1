"""Visual attention redistribution (VAR; Kang et al., "See What You Are Told", arXiv 2503.03321).

    cfg = VarConfig(p=0.6, image_threshold=0.2, rho=0.5)
    res = var(model, dataset, cfg, sinks=SinkSpec())
    res.summary()    # clean and VAR metric with CIs, their paired difference, share of rows changed

In every LLM layer of ``layers`` (default all) and for every text query (not an image token), a
head's attention row is *image-centric* when it gives at least ``image_threshold`` to the image
tokens and at most ``rho`` of that to the sink tokens (``sinks=``: a SinkSpec, patch indices, ...).
In those rows a fraction ``p`` of the attention on the sinks is taken away and spread over the
non-sink image tokens in proportion to the attention they already get (rows still sum to one).
The values are then read with the changed probabilities (``trace.edit_attention``).

``p = 0`` is no intervention: the run is the clean run, bit for bit. The statistics pair each
sample's VAR value with its clean value over images (``stats.compare_paired``, two-sided).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import numpy as np
import pandas as pd
import torch

from ..batching import batches
from ..config import Config, coerce
from ..engine import clean
from ..errors import MechsinkError
from ..metrics import Metric
from ..results import Result
from ..selection import SinkSource, sink_table
from ..stats import compare_paired, image_keys
from ..tokens import ROLE
from ..trace import edit_attention


class VarError(MechsinkError, ValueError):
    """Bad VAR settings."""


@dataclass(frozen=True)
class VarConfig(Config):
    """p: fraction of sink attention moved; image_threshold, rho: which head rows count as
    image-centric; layers: LLM layers (None: all)."""
    p: float = 0.6
    image_threshold: float = 0.2
    rho: float = 0.5
    layers: tuple[int, ...] | None = None
    metric: Metric = field(default_factory=Metric)
    batch_size: int = 8
    n_boot: int = 2000
    n_perm: int = 10000
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0 or not 0.0 <= self.rho <= 1.0 or not 0.0 <= self.image_threshold <= 1.0:
            raise VarError(f"p, rho and image_threshold are fractions in [0, 1], got {self.p}, {self.rho}, "
                           f"{self.image_threshold}")
        object.__setattr__(self, "metric", Metric.coerce(self.metric))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))


def redistribute(probs: torch.Tensor, image: torch.Tensor, sink: torch.Tensor, query: torch.Tensor,
                 p: float, image_threshold: float, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on one layer's probabilities [B, H, q, k]. image, sink: bool [B, k] key masks; query:
    bool [B, q] rows that may change. Returns (new probabilities, bool [B, H, q] rows changed)."""
    w = probs.float()
    img = (w * image[:, None, None, :]).sum(-1)
    snk = (w * sink[:, None, None, :]).sum(-1)
    rows = (img >= image_threshold) & (snk <= rho * img) & (snk > 0) & query[:, None, :]
    other = image & ~sink
    rest = (w * other[:, None, None, :]).sum(-1)
    rows &= rest > 0
    moved = p * snk
    share = torch.where(rest[..., None] > 0, w / rest.clamp_min(1e-30)[..., None], 0) * other[:, None, None, :]
    new = w * torch.where(sink[:, None, None, :], 1.0 - p, 1.0) + moved[..., None] * share
    new = torch.where(rows[..., None], new, w).to(probs.dtype)
    return new, rows


@dataclass
class VarResult(Result):
    """``frame``: one row per sample: sample, id, image_key, clean, value, effect, rows_changed
    (fraction of text-query head rows changed over the layers)."""
    config_class: ClassVar[type | None] = VarConfig

    def comparison(self, **kw):
        f = self.frame
        c = self.config
        args = dict(n_boot=c.n_boot, n_perm=c.n_perm, alpha=c.alpha, alternative="two-sided", seed=c.seed,
                    units=f["image_key"].astype(str).to_numpy())
        return compare_paired(f["value"].to_numpy(), f["clean"].to_numpy(), **{**args, **kw})

    def summary(self) -> dict:
        d = self.comparison().to_dict()
        return {"metric": self.config.metric.name, "p": self.config.p, "var": d["sink"], "clean": d["random"],
                "diff": d["diff"], "p_value": d["p_value"], "n": d["n"],
                "rows_changed": float(self.frame["rows_changed"].mean())}


def _masks(model, batch, sinks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tm = batch.token_map
    b, s = tm.roles.shape
    table = sink_table(model, batch, sinks)
    image = torch.zeros(b, s, dtype=torch.bool)
    sink = torch.zeros(b, s, dtype=torch.bool)
    on = table[table["llm_pos"] >= 0]
    image[torch.tensor(on["sample"].to_numpy()), torch.tensor(on["llm_pos"].to_numpy())] = True
    sk = on[on["is_sink"]]
    sink[torch.tensor(sk["sample"].to_numpy()), torch.tensor(sk["llm_pos"].to_numpy())] = True
    roles = torch.as_tensor(np.asarray(tm.roles))
    query = (roles == ROLE["text"]) | (roles == ROLE["answer"])
    return image, sink, query


def var(model, data, config: VarConfig | dict | None = None, *, sinks: SinkSource = None, errors=None,
        **overrides) -> VarResult:
    """Run ``data`` clean and with VAR (see the module docstring)."""
    cfg = coerce(VarConfig, config)
    cfg = cfg.replace(**overrides) if overrides else cfg
    if sinks is None:
        from ..sinks.detect import SinkSpec
        sinks = SinkSpec()
    layers = list(range(model.n_llm_layers)) if cfg.layers is None else list(cfg.layers)
    frames = []
    for chunk in batches(model, data, cfg.batch_size, errors=errors):
        batch = chunk.batch
        base = clean(model, batch, cfg.metric)
        changed: list[torch.Tensor] = []
        if cfg.p == 0:
            value = base["value"]
        else:
            image, sink, query = _masks(model, batch, sinks)

            def edit(probs, image=image, sink=sink, query=query):
                d = probs.device
                q = query[:, -probs.shape[2]:].to(d)
                new, rows = redistribute(probs, image[:, -probs.shape[3]:].to(d), sink[:, -probs.shape[3]:].to(d), q,
                                         cfg.p, cfg.image_threshold, cfg.rho)
                changed.append(rows.float().sum((1, 2)).cpu() / (q.sum(1).cpu() * probs.shape[1]).clamp_min(1))
                return new
            with edit_attention(model, {l: edit for l in layers}):
                value = clean(model, batch, cfg.metric)["value"]
        frac = torch.stack(changed).mean(0).numpy() if changed else np.zeros(batch.size)
        clean_v = np.asarray(base["value"], dtype=float)
        value = np.asarray(value, dtype=float)
        frames.append(pd.DataFrame({"sample": chunk.indices, "id": [str(i) for i in chunk.ids],
                                    "image_key": image_keys(batch.images), "clean": clean_v, "value": value,
                                    "effect": np.asarray(cfg.metric.effect(torch.as_tensor(value), torch.as_tensor(clean_v)),
                                                         dtype=float),
                                    "rows_changed": frac}))
    if not frames:
        raise VarError("no data")
    return VarResult(pd.concat(frames, ignore_index=True), cfg, {"model": getattr(model, "name", ""),
                                                                  "layers": layers})


__all__ = ["VarConfig", "VarError", "VarResult", "redistribute", "var"]
