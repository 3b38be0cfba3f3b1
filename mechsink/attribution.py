"""Attribution patching: a whole site x position patching sweep, estimated in three passes.

To first order, patching the tokens of a unit at a site from source into base changes the metric
by ``sum over those tokens of (x_source - x_base) . d metric / d x`` (gradient on the base run).
One forward + backward of the base batch and one forward of the source batch give that estimate
for every site and unit at once, however large the sweep. ``agreement`` runs the exact sweep
(mechsink.sweep.sweep) on the same cells and reports the Spearman rank correlation, so every
estimate comes with its measured trustworthiness.

Gradients are taken in one traced run that writes every site with an alias of itself
(``trace.run(grad=True)``); the model input (pixel values, or the LLM's inputs_embeds when every site is
in the LLM) is made to require grad, so frozen weights do not matter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd
import torch

from .engine import _needs_full
from .metrics import Metric, gather_logits
from .models.base import Batch
from .patching import SweepConfig, block_sites, selected, unit_masks
from .results import Result
from .sites import Site
from .sources import PatchError, check_pair
from .trace import llm_inputs


@dataclass(frozen=True)
class AttributionConfig(SweepConfig):
    """The sweep that ``attribute`` estimates (SweepConfig's fields); the metric needs a useful
    gradient at the base run (logprob or logit_diff)."""

    def __post_init__(self):
        super().__post_init__()
        if self.metric.name in ("accuracy", "kl"):
            raise PatchError(f"attribution needs a metric with a useful gradient at the base run (logprob or "
                             f"logit_diff), not {self.metric.name}")


@dataclass
class AttributionResult(Result):
    """``frame``: one row per site x unit x draw with ``attribution`` (estimated mean change of the
    metric over samples) and, after ``agreement``, ``exact`` (the exact patching change)."""
    config_class: ClassVar[type | None] = AttributionConfig

    @property
    def unit(self) -> str:
        return self.config.unit if self.config is not None else self.meta.get("unit", "tokens")

    def table(self, values: str = "attribution") -> pd.DataFrame:
        """site x unit table (random draws averaged)."""
        t = self.frame.groupby(["site", self.unit], sort=False)[values].mean().unstack(self.unit)
        return t.reindex(index=list(dict.fromkeys(self.frame["site"])), columns=list(dict.fromkeys(self.frame[self.unit])))

    @property
    def agreement(self) -> dict:
        """Spearman and Pearson correlation of attribution with exact patching over the cells."""
        if "exact" not in self.frame.columns:
            raise PatchError("no exact patching results: use mechsink.attribution.agreement")
        from scipy.stats import pearsonr, spearmanr
        a, e = self.table("attribution").to_numpy().ravel(), self.table("exact").to_numpy().ravel()
        ok = np.isfinite(a) & np.isfinite(e)
        a, e = a[ok], e[ok]
        constant = np.ptp(a) == 0 or np.ptp(e) == 0
        return {"spearman": float("nan") if constant else float(spearmanr(a, e).statistic),
                "pearson": float("nan") if constant else float(pearsonr(a, e).statistic),
                "n_cells": int(ok.sum()), "max_abs_error": float(np.abs(a - e).max()) if len(a) else float("nan")}

    def summary(self) -> dict:
        out = {"n_cells": int(len(self.frame)), "unit": self.unit, "sites": list(dict.fromkeys(self.frame["site"])),
               "metric": self.config.metric.name if self.config is not None else None}
        if "exact" in self.frame.columns:
            out["agreement"] = self.agreement
        return out


def gradients(model, batch, sites: Sequence[str], metric: Metric, targets) -> tuple[torch.Tensor, dict, dict]:
    """One forward + backward of ``batch``: (metric [B], activations {site: x}, gradients {site:
    d sum(metric) / d x}). Each sample's metric depends only on its own row, so the gradient of
    the sum is every sample's own gradient.

    Every site is written with an alias of itself inside one traced run (``trace.run``), so the
    gradient counts only the paths through that site's reader -- what patching it changes. (The
    same tensor may also feed other readers, e.g. the projector reads the input of a later ViT block.)
    """
    if metric.name in ("accuracy", "kl"):
        raise PatchError(f"attribution needs a metric with a useful gradient at the base run (logprob or logit_diff), not {metric.name}")
    sites = [str(Site.parse(s)) for s in sites]
    derived = [s for s in sites if model.locate(Site.parse(s))[1] not in ("input", "output")]
    if derived:
        raise PatchError(f"attribution at {derived[0]} is not supported (a derived site); use hook_resid_pre or hook_attn_out")
    if _needs_full(sites):
        inputs = dict(batch.inputs)
        inputs["pixel_values"] = inputs["pixel_values"].detach().clone().requires_grad_(True)
        seq = inputs["input_ids"].shape[1]
    else:
        inputs = llm_inputs(model, batch).repeat(1)
        inputs["inputs_embeds"] = inputs["inputs_embeds"].detach().clone().requires_grad_(True)
        seq = inputs["inputs_embeds"].shape[1]
    keep = targets.keep(seq)
    store: dict = {}

    def alias(site: str):
        def edit(x: torch.Tensor) -> torch.Tensor:
            store[site] = x.view_as(x)
            return store[site]
        return edit
    out = model.run(Batch(inputs, None, [], []), write={s: alias(s) for s in sites}, grad=True,
                    extra_inputs={"logits_to_keep": keep.to(model.device)})
    logits = out["llm.logits"]
    if logits.shape[1] != keep.shape[1]:
        logits = gather_logits(logits, keep)
    with torch.enable_grad():
        value = metric.score(logits, targets)
        grads = torch.autograd.grad(value.sum(), [store[s] for s in sites], allow_unused=True)
    acts = {s: store[s].detach() for s in sites}
    return value.detach().cpu(), acts, {s: (torch.zeros_like(acts[s]) if g is None else g.detach()) for s, g in zip(sites, grads)}


def _config(config, sites, match, settings) -> AttributionConfig:
    from .sweep import sweep_config
    return sweep_config(AttributionConfig, config, sites, match, settings)


def attribute(model, base, source, sites: Sequence[str] | None = None, *, config: AttributionConfig | dict | None = None,
              sinks=None, match: Sequence[str] = (), **settings) -> AttributionResult:
    """Attribution-patching estimate of ``mechsink.sweep.sweep`` (same arguments; settings are
    AttributionConfig fields): for every site x unit, the estimated mean over samples of
    metric(patched) - metric(base)."""
    cfg = _config(config, sites, match, settings)
    check_pair(base, source)
    sites = list(cfg.sites) if cfg.sites is not None else block_sites(model)
    cfg = cfg.replace(sites=tuple(sites))
    targets = cfg.metric.targets(model, base)
    _, x_base, grad = gradients(model, base, sites, cfg.metric, targets)
    x_src = model.run(source, read=sites)
    rows = []
    chosen = selected(model, base, source, cfg, sinks) if cfg.positions is None else None
    for s in sites:
        contrib = ((x_src[s].to(grad[s]) - x_base[s]) * grad[s]).sum(-1).float().cpu()     # [*tok]
        units, draws, masks, _ = unit_masks(model, base, source, cfg, s, tuple(contrib.shape), sinks, chosen)
        est = (masks.float() * contrib[None]).flatten(1).sum(1) / base.size
        layer = Site.parse(s).layer
        for u, d, a in zip(units, draws, est.tolist()):
            rows.append({"site": s, "part": Site.parse(s).part, "layer": -1 if layer is None else layer,
                         cfg.unit: u, "draw": d, "attribution": a})
    return AttributionResult(pd.DataFrame(rows), cfg, {"model": getattr(model, "name", "")})


def agreement(model, base, source, sites: Sequence[str] | None = None, *, config: AttributionConfig | dict | None = None,
              sinks=None, match: Sequence[str] = (), **settings) -> AttributionResult:
    """``attribute`` plus the exact sweep on the same cells (column ``exact``); see ``.agreement``."""
    from .sweep import sweep
    est = attribute(model, base, source, sites, config=config, sinks=sinks, match=match, **settings)
    exact = sweep(model, base, source, config=SweepConfig.from_dict(est.config.to_dict()), sinks=sinks)
    f = exact.frame.assign(delta=exact.frame["patched"] - exact.frame["base"])
    means = f.groupby(["site", exact.unit, "draw"], sort=False)["delta"].mean().rename("exact").reset_index()
    est.frame = est.frame.merge(means, on=["site", est.unit, "draw"], how="left")
    return est
