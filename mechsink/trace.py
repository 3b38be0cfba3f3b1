"""Reading and writing sites inside one forward pass, with nnsight underneath.

``run(model, batch, read=[...], write={site: edit})`` returns the read tensors by site name. An
edit is a function ``value -> new value`` (it may also modify ``value`` in place and return it);
reads at an edited site see the edited value. Helpers below build the common edits from TokenMap
indices. Sites are visited in execution order, as nnsight requires.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from .errors import SiteError
from .sites import Site

Edit = Callable[[torch.Tensor], torch.Tensor]


def _expand(sites: set[Site]) -> set[Site]:
    """Add the sites a derived site is computed from (resid_mid = resid_pre + attn_out)."""
    out = set(sites)
    for s in sites:
        if s.kind == "resid_mid":
            out |= {Site(s.part, "resid_pre", s.layer), Site(s.part, "attn_out", s.layer)}
    return out


def run(model, batch, read: Sequence[str | Site] = (), write: dict | None = None, *,
        grad: bool = False, remote: bool = False, extra_inputs: dict | None = None) -> dict[str, torch.Tensor]:
    """Forward ``batch`` once; return {site name: tensor} for ``read`` (plus ``"llm.logits"`` when
    the model has an LM head and it was not asked for, because nearly every analysis wants it)."""
    reads = [Site.parse(s) for s in read]
    writes = {Site.parse(k): v for k, v in (write or {}).items()}
    if not model.adapter.vision_only and model.adapter.lm_head:
        reads.append(Site.parse("llm.logits"))
    for s in writes:
        if s.kind == "pattern" and model.locate(s)[1] == "derived":
            raise SiteError(f"site {s} is recomputed from the attention inputs and cannot be written")
    sites = _expand(set(reads) | set(writes))
    eager = any(s.kind == "pattern" for s in sites)
    saved: dict[str, torch.Tensor] = {}
    nn = model.nn
    inputs = {**batch.inputs, **(extra_inputs or {})}
    if not model.adapter.vision_only:
        inputs.setdefault("use_cache", False)   # a KV cache is never reused here and costs memory
    grad_ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with grad_ctx, model.attention("eager" if eager else None, sites=[s for s in sites if s.kind == "pattern"]):
        with nn.trace(**inputs, remote=remote):
            values: dict[Site, object] = {}
            envoys: dict[tuple[str, str], object] = {}
            for site in sorted(sites, key=lambda s: s.order):
                path, io, idx = model.locate(site)
                if io == "derived" and site.kind == "pattern":
                    value = model.derive_pattern(site, _envoy(nn, path).inputs)
                    values[site] = value
                elif io == "derived":   # resid_mid: a write goes through attn_out
                    pre, attn = Site(site.part, "resid_pre", site.layer), Site(site.part, "attn_out", site.layer)
                    value = values[pre] + values[attn]
                    values[site] = value
                else:
                    key = (path, io)
                    env = _envoy(nn, path)
                    if key not in envoys:
                        envoys[key] = getattr(env, io)
                    raw = envoys[key]
                    if isinstance(raw, tuple):
                        value = raw[idx or 0]
                    elif idx:   # e.g. a pattern from an attention module that returns only its output
                        raise SiteError(f"{model.name}: {path} returns a single tensor, not the tuple site {site} needs")
                    else:
                        value = raw
                    values[site] = value
                if site in writes:
                    new = writes[site](value)
                    if site.kind == "resid_mid":
                        attn = Site(site.part, "attn_out", site.layer)
                        new_attn = values[attn] + (new - value)
                        _assign(nn, model, attn, new_attn, envoys)
                        values[attn] = new_attn
                    else:
                        _assign(nn, model, site, new, envoys)
                    values[site] = new
                if site in reads:
                    saved[str(site)] = values[site].save()
    return saved


def _envoy(nn, path: str):
    env = nn
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _assign(nn, model, site: Site, new, envoys) -> None:
    path, io, idx = model.locate(site)
    env = _envoy(nn, path)
    raw = envoys[(path, io)]
    if isinstance(raw, tuple):
        i = 0 if idx is None else idx
        new_raw = tuple(new if j == i else r for j, r in enumerate(raw))
    else:
        new_raw = new
    setattr(env, io, new_raw)
    envoys[(path, io)] = new_raw


# -- common edits ---------------------------------------------------------------------------------
def set_tokens(index: tuple[torch.Tensor, ...], values: torch.Tensor) -> Edit:
    """Replace the selected tokens with `values` ([n, d] or broadcastable)."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[index] = values.to(x.dtype).to(x.device)
        return x
    return edit


def scale_tokens(index: tuple[torch.Tensor, ...], factor: float) -> Edit:
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[index] = x[index] * factor
        return x
    return edit


def zero_tokens(index: tuple[torch.Tensor, ...]) -> Edit:
    return scale_tokens(index, 0.0)
