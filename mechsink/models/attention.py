"""Eager attention for the blocks whose patterns are read, the model's own implementation elsewhere.

SDPA and flash attention never materialise attention probabilities; reading a block's pattern
needs the eager path. Switching the whole model (``Model.attention("eager")``) costs memory and
time in every block and changes the numerics of blocks nobody reads (eager and SDPA/flash are
known to diverge in bf16 on Qwen2-VL). ``eager_blocks`` gives only the attention modules of the
read blocks a private copy of the config whose implementation is ``"mechsink_eager"``: that
function turns whatever mask the model built for its own implementation (None with the causal
flag, SDPA's boolean mask, flash's 2-D padding mask, eager's additive mask) into an additive
mask and runs the module family's own ``eager_attention_forward``.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Iterable

import torch

KEY = "mechsink_eager"


def _additive(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, causal: bool) -> torch.Tensor | None:
    q_len, k_len = query.shape[-2], key.shape[-2]
    neg = torch.finfo(query.dtype).min
    if mask is not None and mask.dim() == 2:          # flash: [batch, keys] padding mask (1 = keep)
        keep = mask.bool()[:, None, None, -k_len:]
        mask = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(~keep, neg)
        needs_causal = causal
    elif mask is not None and mask.dtype == torch.bool:   # sdpa: True = attend, causality included
        keep = mask[..., -k_len:]
        mask = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(~keep, neg)
        needs_causal = False
    elif mask is not None:                            # already additive (eager)
        return mask[..., -k_len:]
    else:                                             # None: sdpa/flash rely on the causal flag
        needs_causal = causal
    if needs_causal and q_len > 1:
        tri = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        c = torch.zeros(q_len, k_len, dtype=query.dtype, device=query.device).masked_fill(~tri, neg)
        mask = c[None, None] if mask is None else (mask + c).clamp(min=neg)
    return mask


def mechsink_eager(module, query, key, value, attention_mask, *args, **kwargs):
    """Eager attention (returns the probabilities) under any implementation's mask."""
    family = sys.modules[type(module).__module__]
    eager = getattr(family, "eager_attention_forward")
    causal = bool(getattr(module, "is_causal", False))
    kwargs.pop("is_causal", None)
    mask = _additive(attention_mask, query, key, causal)
    return eager(module, query, key, value, mask, *args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(KEY, mechsink_eager)


@contextlib.contextmanager
def eager_blocks(modules: Iterable[torch.nn.Module]):
    """Within the block, these attention modules run eagerly (and return their patterns); the rest
    of the model keeps its implementation."""
    _register()
    saved = []
    try:
        for m in modules:
            cfg = getattr(m, "config", None)
            if cfg is None or getattr(cfg, "_attn_implementation", None) in ("eager", KEY):
                continue
            private = copy.copy(cfg)
            private._attn_implementation_internal = KEY
            saved.append((m, cfg))
            m.config = private
        yield
    finally:
        for m, cfg in saved:
            m.config = cfg


def parity(model, batch) -> float:
    """max |Δ logit| (over real, non-padding positions) between eager attention everywhere and the
    model's own implementation, on one batch: the number a report records next to any result
    that read attention patterns (eager and SDPA/flash diverge in bf16 on Qwen2-VL)."""
    inputs = dict(batch.inputs)
    inputs.setdefault("use_cache", False)
    with torch.no_grad():
        own = model.hf(**inputs).logits.float()
        with model.attention("eager"):
            eager = model.hf(**inputs).logits.float()
    mask = batch.inputs.get("attention_mask")
    d = (own - eager).abs()
    return float((d[mask.bool()] if mask is not None else d).max())
