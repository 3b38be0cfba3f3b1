"""Attribution patching: a whole site x position patching sweep, estimated in three passes.

To first order, patching the tokens of a unit at a site from source into base changes the metric
by ``sum over those tokens of (x_source - x_base) . d metric / d x`` (gradient on the base run).
One forward + backward of the base batch and one forward of the source batch give that estimate
for every site and unit at once, however large the sweep. ``agreement`` runs the exact sweep
(mechsink.patching.sweep) on the same cells and reports the Spearman rank correlation, so every
estimate comes with its measured trustworthiness.

Gradients are taken with plain torch hooks on the modules that hold each site
(``model.locate``); the model input (pixel values, or the LLM's inputs_embeds when every site is
in the LLM) is made to require grad, so frozen weights do not matter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .metrics import Metric, gather_logits
from .engine import _needs_full
from .patching import PatchError, _unit_masks, block_sites, check_pair
from .trace import llm_inputs
from .sites import Site


@dataclass
class AttributionResult:
    """``frame``: one row per site x unit x draw with ``attribution`` (estimated mean change of the
    metric over samples) and, after ``agreement``, ``exact`` (the exact patching change)."""
    frame: pd.DataFrame
    unit: str
    config: dict = field(default_factory=dict)

    def table(self, values: str = "attribution") -> pd.DataFrame:
        """site x unit table (random draws averaged)."""
        t = self.frame.groupby(["site", self.unit], sort=False)[values].mean().unstack(self.unit)
        return t.reindex(index=list(dict.fromkeys(self.frame["site"])), columns=list(dict.fromkeys(self.frame[self.unit])))

    def heatmap(self, values: str = "attribution", **kw):
        from .report.figures import layer_heatmap
        return layer_heatmap(self.table(values), center=0.0, cbar_label=f"{values} (change in {self.config.get('metric', {}).get('name', 'metric')})",
                             xlabel=self.unit, ylabel="site", **kw)

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


def _capture_hooks(model, sites: list[str], store: dict):
    """Forward (pre-)hooks that keep the tensor of every site in ``store``; returns the handles."""
    handles = []
    for s in sites:
        path, io, idx = model.locate(s)
        if io == "derived":
            raise PatchError(f"attribution at {s} is not supported (a derived site); use hook_resid_pre or hook_attn_out")
        mod = model.module(path)
        if io == "input":
            # The module gets its own alias of its input, so the gradient counts only the paths
            # through this module -- what patching the module's input changes. (The same tensor
            # may also feed other readers, e.g. the projector reads the input of a later ViT block.)
            def pre(m, args, kwargs, s=s):
                if args:
                    store[s] = args[0].view_as(args[0])
                    return (store[s], *args[1:]), kwargs
                store[s] = kwargs["hidden_states"].view_as(kwargs["hidden_states"])
                return args, {**kwargs, "hidden_states": store[s]}
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(m, args, out, s=s, idx=idx):
                store[s] = out[idx if idx is not None else 0] if isinstance(out, tuple) else out
            handles.append(mod.register_forward_hook(post))
    return handles


def gradients(model, batch, sites: Sequence[str], metric: Metric, targets) -> tuple[torch.Tensor, dict, dict]:
    """One forward + backward of ``batch``: (metric [B], activations {site: x}, gradients {site:
    d sum(metric) / d x}). Each sample's metric depends only on its own row, so the gradient of
    the sum is every sample's own gradient."""
    if metric.name in ("accuracy", "kl"):
        raise PatchError(f"attribution needs a metric with a useful gradient at the base run (logprob or logit_diff), not {metric.name}")
    sites = [str(Site.parse(s)) for s in sites]
    if _needs_full(sites):
        inputs = {k: v for k, v in batch.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].detach().clone().requires_grad_(True)
        seq = inputs["input_ids"].shape[1]
    else:
        li = llm_inputs(model, batch)
        inputs = li.repeat(1)
        inputs["inputs_embeds"] = inputs["inputs_embeds"].detach().clone().requires_grad_(True)
        seq = inputs["inputs_embeds"].shape[1]
    keep = targets.keep(seq)
    store: dict = {}
    handles = _capture_hooks(model, sites, store)
    try:
        with torch.enable_grad():
            logits = model.hf(**inputs, logits_to_keep=keep.to(model.device)).logits
            if logits.shape[1] != keep.shape[1]:
                logits = gather_logits(logits, keep)
            value = metric.score(logits, targets)
            missing = [s for s in sites if s not in store]
            if missing:
                raise PatchError(f"sites {missing} did not run in this forward")
            grads = torch.autograd.grad(value.sum(), [store[s] for s in sites], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    acts = {s: store[s].detach() for s in sites}
    return value.detach().cpu(), acts, {s: (torch.zeros_like(acts[s]) if g is None else g.detach()) for s, g in zip(sites, grads)}


def attribute(model, base, source, sites: Sequence[str] | None = None, *, positions="patches", sinks=None,
              metric: Metric | str | None = None, n_draws: int = 4, seed: int = 0, match: Sequence[str] = ()) -> AttributionResult:
    """Attribution-patching estimate of ``mechsink.patching.sweep`` (same arguments): for every
    site x unit, the estimated mean over samples of metric(patched) - metric(base)."""
    metric = Metric.coerce(metric)
    check_pair(base, source)
    sites = block_sites(model) if sites is None else [str(Site.parse(s)) for s in sites]
    targets = metric.targets(model, base)
    _, x_base, grad = gradients(model, base, sites, metric, targets)
    x_src = model.run(source, read=sites)
    rows = []
    for s in sites:
        contrib = ((x_src[s].to(grad[s]) - x_base[s]) * grad[s]).sum(-1).float().cpu()     # [*tok]
        unit, units, draws, masks = _unit_masks(model, base, source, s, tuple(contrib.shape), positions, sinks,
                                                n_draws, seed, match)
        est = (masks.float() * contrib[None]).flatten(1).sum(1) / base.size
        layer = Site.parse(s).layer
        for u, d, a in zip(units, draws, est.tolist()):
            rows.append({"site": s, "part": Site.parse(s).part, "layer": -1 if layer is None else layer,
                         unit: u, "draw": d, "attribution": a})
    return AttributionResult(pd.DataFrame(rows), unit, {"sites": sites, "metric": metric.to_dict(),
                                                         "positions": positions if isinstance(positions, str) else list(positions)})


def agreement(model, base, source, sites: Sequence[str] | None = None, *, positions="patches", sinks=None,
              metric: Metric | str | None = None, n_draws: int = 4, seed: int = 0, match: Sequence[str] = (),
              rows_per_forward: int = 64) -> AttributionResult:
    """``attribute`` plus the exact sweep on the same cells (column ``exact``); see ``.agreement``."""
    from .patching import sweep
    est = attribute(model, base, source, sites, positions=positions, sinks=sinks, metric=metric, n_draws=n_draws,
                    seed=seed, match=match)
    exact = sweep(model, base, source, est.config["sites"], positions=positions, sinks=sinks, metric=metric,
                  n_draws=n_draws, seed=seed, match=match, rows_per_forward=rows_per_forward)
    f = exact.frame.assign(delta=exact.frame["patched"] - exact.frame["base"])
    means = f.groupby(["site", exact.unit, "draw"], sort=False)["delta"].mean().rename("exact").reset_index()
    est.frame = est.frame.merge(means, on=["site", est.unit, "draw"], how="left")
    return est
