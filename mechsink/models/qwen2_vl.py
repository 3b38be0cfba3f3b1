"""Qwen2-VL and Qwen2.5-VL: a dynamic-resolution ViT whose patch merger is the projector.

The processor cuts each image into a (h, w) grid of patches and flattens every patch of the batch
into one sequence, each 2x2 block of patches contiguous. The ViT runs on that [tokens, d] sequence
(no batch axis: ``*_item`` is -1) with attention kept inside each image. The merger concatenates
the 4 patches of a block into one LLM token, so 4 patches share a ``proj_pos`` and an ``llm_pos``.

Qwen2.5-VL reorders blocks into attention windows before ViT block 0 and restores the order after
the merger. Its ``vit_pos`` and ``proj_pos`` are positions in the window-ordered sequence the
blocks and the merger actually see, and ``vit.embed`` is the input of block 0 (window order),
not the patch embedding.

``patches.row/col`` are patch-grid cells and ``grids[(s, i, 0)]`` the patch grid; ``llm_tokens``
rows use the merged grid (``row // 2, col // 2``). The ViT attention modules do not return their
pattern, so ``vit.blocks.{l}.attn.hook_pattern`` is recomputed from their inputs as a block-diagonal
[heads, tokens, tokens] tensor (zero between images and between windows). It is dense: for large
images read the patterns of a few layers per run.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..errors import PromptError
from ..tokens import TokenMap
from .base import Adapter, BlockParts
from .llava import image_runs, llm_roles
from .processors import Qwen2_5_VLImageTextProcessor, Qwen2VLImageTextProcessor, loader

CHAT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


def vision_pattern(attn: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Attention probabilities [heads, tokens, tokens] of a Qwen ViT attention module, from its
    inputs, exactly as its eager path computes them chunk by chunk (``cu_seqlens``)."""
    x = args[0] if args else kwargs["hidden_states"]
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    n = x.shape[0]
    q, k, _ = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *kwargs["position_embeddings"])
    q, k = q.transpose(0, 1), k.transpose(0, 1)          # [heads, tokens, head_dim]
    pattern = x.new_zeros(attn.num_heads, n, n)
    bounds = kwargs["cu_seqlens"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        scores = torch.matmul(q[:, a:b], k[:, a:b].transpose(1, 2)) * attn.scaling
        pattern[:, a:b, a:b] = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return pattern


def window_order(model, grid_thw: torch.Tensor) -> torch.Tensor | None:
    """For Qwen2.5-VL: where each merged block (in processor order) sits in the window-ordered
    sequence. None for Qwen2-VL (no reordering)."""
    vc = model.hf.config.vision_config
    if getattr(vc, "window_size", None) is None:
        return None
    from transformers.vision_utils import get_vision_window_index
    index, _ = get_vision_window_index(grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    return torch.argsort(index)


def qwen_layout(model, inputs, images) -> TokenMap:
    cfg = model.hf.config
    m = cfg.vision_config.spatial_merge_size
    unit = m * m
    thw = inputs["image_grid_thw"]
    where = window_order(model, thw)
    roles = llm_roles(inputs["input_ids"], inputs.get("attention_mask"), [cfg.image_token_id])
    patches, llm, grids = [], [], {}
    j, patch0 = 0, 0      # image index over the batch, its first patch in the flat sequence
    for s, group in enumerate(images):
        for i, run in enumerate(image_runs(roles[s], len(group), s)):
            t, h, w = (int(v) for v in thw[j])
            if t != 1:
                raise PromptError(f"sample {s} image {i}: {t} temporal patches; still images have 1")
            if len(run) != h * w // unit:
                raise PromptError(f"sample {s} image {i}: {len(run)} image tokens, expected {h * w // unit}")
            grids[(s, i, 0)] = (h, w)
            for r in range(h):
                for c in range(w):
                    block = (r // m) * (w // m) + c // m          # merged token, row-major
                    inner = (r % m) * m + c % m                   # patch inside its block
                    u = patch0 // unit + block                    # merged token over the batch
                    u_seq = int(where[u]) if where is not None else u
                    pos = u_seq * unit + inner
                    patches.append(dict(sample=s, image=i, tile=0, row=r, col=c, vit_item=-1, vit_pos=pos,
                                        out_item=-1, out_pos=pos, proj_item=-1, proj_pos=u_seq,
                                        llm_pos=int(run[block])))
            llm += [dict(sample=s, llm_pos=int(run[b]), role="image", image=i, tile=0, row=b // (w // m),
                         col=b % (w // m)) for b in range(len(run))]
            patch0 += h * w
            j += 1
    return TokenMap(patches, [], llm, roles, grids)


QWEN2_VL = Adapter(
    family="qwen2_vl",
    architectures=("Qwen2VLForConditionalGeneration",),
    vit_embed="model.visual.patch_embed",
    vit_blocks="model.visual.blocks",
    vit_out=("model.visual.merger", "input"),
    vit_parts=BlockParts(attn="attn", mlp="mlp", mlp_out_proj="mlp.fc2", pattern=vision_pattern),
    projector="model.visual.merger",
    llm_blocks="model.language_model.layers",
    lm_head="lm_head",
    layout=qwen_layout,
    chat=CHAT,
    image_placeholder="<|image_pad|>",
    processor_loader=loader(Qwen2VLImageTextProcessor),
)

# Qwen2.5-VL: the same layout; SwiGLU MLPs in the ViT, and blocks that see window-ordered patches.
QWEN2_5_VL = replace(
    QWEN2_VL,
    family="qwen2_5_vl",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    vit_embed=("model.visual.blocks.0", "input"),   # after the window reordering
    vit_parts=BlockParts(attn="attn", mlp="mlp", mlp_out_proj="mlp.down_proj", pattern=vision_pattern),
    processor_loader=loader(Qwen2_5_VLImageTextProcessor),
)

ADAPTERS = [QWEN2_VL, QWEN2_5_VL]
