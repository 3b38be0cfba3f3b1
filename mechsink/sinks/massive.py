"""Massive activations (Sun et al., 2402.17762): a few fixed hidden dimensions in which some tokens
take values far above everything else (|x| > 100 and about 1000x the median magnitude).

``massive_dims(acts)`` finds them in one tensor (any site: ViT, projector or LLM);
``scan_massive(model, batch)`` runs every residual stream of a model once and tabulates them per
layer. The dims found feed the LLM-sink test of :mod:`mechsink.sinks.llm` and the ``dims`` score.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from ..sites import Site
from .rules import SinkError

COLUMNS = ["site", "layer", "dim", "max_abs", "median_abs", "ratio", "count", "n_tokens"]


def massive_dims(acts: torch.Tensor | Mapping[str, torch.Tensor], abs_threshold: float = 100.0, ratio: float = 1000.0,
                 *, mask: torch.Tensor | None = None, site: str | None = None) -> pd.DataFrame:
    """Dimensions holding massive activations.

    acts: [..., tokens, d] (or {site: tensor}, each scanned). A value is massive when
    |x| > abs_threshold and |x| > ratio * median |x| over the whole tensor (all tokens, all dims).
    mask: bool [..., tokens] selecting the tokens that count (e.g. no padding).
    Returns one row per (site, dim) with any massive value: site, layer (None off a block),
    dim, max_abs, median_abs (the tensor's median magnitude), ratio (max / median), count
    (tokens where the dim is massive), n_tokens; sorted by max_abs, largest first.
    """
    if isinstance(acts, Mapping):
        frames = [massive_dims(v, abs_threshold, ratio, mask=mask, site=k) for k, v in acts.items()]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    if acts.dim() < 2:
        raise SinkError(f"massive_dims needs [..., tokens, d] activations, got shape {tuple(acts.shape)}")
    x = acts.detach().float().abs().reshape(-1, acts.shape[-1])          # [tokens, d]
    if mask is not None:
        m = torch.as_tensor(mask, dtype=torch.bool, device=acts.device).reshape(-1)
        if m.numel() != x.shape[0]:
            raise SinkError(f"mask has {m.numel()} tokens, activations have {x.shape[0]}")
        x = x[m]
    layer = Site.parse(site).layer if site is not None else None
    if x.numel() == 0:
        return pd.DataFrame(columns=COLUMNS)
    med = float(x.median())
    hit = (x > abs_threshold) & (x > ratio * med)                      # [tokens, d]
    count = hit.sum(0)
    dims = torch.nonzero(count).flatten()
    mx = x.max(0).values
    rows = [{"site": site, "layer": layer, "dim": int(d), "max_abs": float(mx[d]), "median_abs": med,
             "ratio": float(mx[d]) / med if med > 0 else float("inf"), "count": int(count[d]), "n_tokens": x.shape[0]}
            for d in dims.tolist()]
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out.sort_values("max_abs", ascending=False, kind="stable").reset_index(drop=True)


def _token_mask(batch, site: str) -> torch.Tensor | None:
    """Non-padding positions for LLM sites (padding is not a token of the prompt)."""
    if Site.parse(site).axis != "llm":
        return None
    return torch.as_tensor(batch.token_map.roles != 0)


def scan_massive(model, batch, sites: Sequence[str] | None = None, *, part: str = "llm",
                 abs_threshold: float = 100.0, ratio: float = 1000.0) -> pd.DataFrame:
    """massive_dims at every residual stream of ``part`` ("vit" or "llm"; default: every
    ``{part}.blocks.{l}.hook_resid_post``), or at the given ``sites``, from one forward pass."""
    if sites is None:
        if part not in ("vit", "llm"):
            raise SinkError(f"part must be 'vit' or 'llm', got {part!r}")
        n = model.n_vit_layers if part == "vit" else model.n_llm_layers
        sites = [f"{part}.blocks.{l}.hook_resid_post" for l in range(n)]
    acts = model.run(batch, read=list(sites))
    frames = [massive_dims(acts[s], abs_threshold, ratio, mask=_token_mask(batch, s), site=s) for s in sites]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def top_dims(table: pd.DataFrame, k: int | None = None) -> list[int]:
    """Dims from a massive_dims table, most widespread first (layers x tokens where massive)."""
    if len(table) == 0:
        return []
    order = table.groupby("dim")["count"].sum().sort_values(ascending=False, kind="stable")
    dims = [int(d) for d in order.index]
    return dims[:k] if k is not None else dims
