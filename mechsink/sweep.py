"""Patching sweeps and path patching.

``sweep`` patches every site x unit from source into base, one unit at a time: a unit is a patch
cell (``positions="patches"``), a position of the site's token axis (``"all"``, as
TransformerLens sweeps do, or a list of positions) or a token selection (``["sinks", "random"]``).
``path_patch`` lets the source's values at a token selection reach only chosen LLM layers: the
selection's residual stream is patched at those layers' inputs and restored to base at their
outputs, so every other layer sees base values there. Both return a PatchResult (``table()``:
site x unit); ``report.figures.patch_heatmap`` draws it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import coerce
from .engine import Plan, Write, clean, execute, source_run
from .patching import (PatchConfig, PatchResult, PathPatchConfig, SweepConfig, _selections, block_sites, counts,
                       long_frame, patch, selected)
from .sources import PatchError, check_pair


def sweep_config(cls, config, sites, match: Sequence[str], settings: dict):
    """``config`` as a ``cls`` (a SweepConfig or subclass; any PatchConfig is converted), with
    ``sites``, keyword ``settings`` and random-control ``match`` keys on top."""
    if isinstance(config, cls) or (cls is SweepConfig and isinstance(config, PatchConfig)):
        cfg = config                       # a sweep takes any PatchConfig as it is
    elif isinstance(config, PatchConfig):
        cfg = cls.from_dict(config.to_dict())
    else:
        cfg = coerce(cls, config)
    if sites is not None:
        settings = {**settings, "sites": tuple(sites)}
    if settings:
        cfg = cfg.replace(**settings)
    if match:
        cfg = cfg.replace(selections=_selections(cfg.selections, match))
    return cfg


def sweep(model, base, source, sites: Sequence[str] | None = None, *, config: PatchConfig | dict | None = None,
          sinks=None, match: Sequence[str] = (), **settings) -> PatchResult:
    """Patch every site x unit from source into base, one unit at a time.

    sites: default every ``llm.blocks.{l}.hook_resid_pre`` (see ``block_sites``; ViT sites work
    too). settings: SweepConfig fields on top of ``config`` -- ``positions`` ("patches": each patch
    cell in every sample; "all": every position of the site's token axis in every sample/item; a
    list of positions; or selection names such as ["sinks", "random"]), ``metric``, ``n_draws``,
    ``seed``, ``sinks_of``, ``rows_per_forward``. match: matching keys for a plain "random".
    """
    cfg = sweep_config(SweepConfig, config, sites, match, settings)
    return patch(model, base, source, cfg, sinks=sinks)


def path_patch(model, base, source, layers: Sequence[int | Sequence[int]] | None = None, *,
               config: PathPatchConfig | dict | None = None, sinks=None, match: Sequence[str] = (),
               sample_ids: Sequence[int] | None = None, **settings) -> PatchResult:
    """Let the source's values at a token selection reach only chosen LLM layers.

    For each entry of ``layers`` (a layer or a list of layers; default each layer alone) the
    selection's residual stream is set to the source run's at the input of those layers and put
    back to the base run's at their outputs. The tokens' own stream stays base everywhere else, so
    the source information can enter only through what those layers' other positions read from
    them (attention). settings: PathPatchConfig fields (``selections``, ``metric``, ``n_draws``,
    ``seed``, ``sinks_of``, ``rows_per_forward``). One row per layer set x selection x draw x sample.
    """
    cfg = coerce(PathPatchConfig, config)
    if layers is not None:
        settings["layers"] = tuple(layers)
    if settings:
        cfg = cfg.replace(**settings)
    if match:
        cfg = cfg.replace(selections=_selections(cfg.selections, match))
    check_pair(base, source)
    n = model.n_llm_layers
    conds = [list(c) for c in (cfg.layers if cfg.layers is not None else [(l,) for l in range(n)])]
    cfg = cfg.replace(layers=tuple(tuple(c) for c in conds))
    used = sorted({l for c in conds for l in c})
    if any(not 0 <= l < n for l in used):
        raise PatchError(f"layers must lie in 0..{n - 1}")
    pre = {l: f"llm.blocks.{l}.hook_resid_pre" for l in used}
    post = {l: f"llm.blocks.{l}.hook_resid_post" for l in used}
    b0 = clean(model, base, cfg.metric, read=list(post.values()))
    s0 = source_run(model, source, cfg.metric, b0, read=list(pre.values()))
    chosen = selected(model, base, source, cfg, sinks, sample_ids)
    tm = base.token_map
    shape = tuple(b0["inputs"].embeds.shape[:2])
    sets = tm.mask("llm", chosen.select, shape)                           # [n_sets, B, S]
    n_sets = len(chosen.names)
    plan = Plan(len(conds) * n_sets)
    for l in used:
        mask = torch.zeros(plan.n_copies, *shape, dtype=torch.bool)
        for k, c in enumerate(conds):
            if l in c:
                mask[k * n_sets:(k + 1) * n_sets] = sets
        plan.writes.append(Write(pre[l], mask, s0[pre[l]]))
        plan.writes.append(Write(post[l], mask, b0[post[l]]))
    out = execute(model, base, plan, cfg.metric, b0["targets"], inputs=b0["inputs"], clean_next=b0["next"],
                  rows_per_forward=cfg.rows_per_forward, from_layer=cfg.from_layer)
    labels = [f"llm.layers.{'+'.join(map(str, c))}" for c in conds for _ in range(n_sets)]
    first = [c[0] if len(c) == 1 else -1 for c in conds for _ in range(n_sets)]
    f = long_frame(labels, list(chosen.names) * len(conds), list(chosen.draws) * len(conds), "tokens", out["value"],
                   b0["value"], s0["value"], np.tile(counts(tm, chosen.select), (len(conds), 1)), layers=first,
                   sample_ids=sample_ids)
    return PatchResult(f, cfg, {"model": getattr(model, "name", "")})


__all__ = ["PathPatchConfig", "SweepConfig", "block_sites", "path_patch", "sweep"]
