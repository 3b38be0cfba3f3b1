"""LLaVA-OneVision: a SigLIP ViT (no CLS; every patch feeds the projector), any-res tiles as in
LLaVA-NeXT, and a Qwen2 LLM. Canvases larger than ``anyres_max_N`` tiles are bilinearly pooled
before they reach the LLM (see `llava_next` for how the TokenMap records that)."""
from __future__ import annotations

from dataclasses import replace

from ..tokens import TokenMap
from .llava import ADAPTER as LLAVA
from .llava_next import anyres_layout
from .processors import LlavaOnevisionImageTextProcessor, loader


def onevision_layout(model, inputs, images) -> TokenMap:
    max_tiles = int(model.hf.config.vision_aspect_ratio.removeprefix("anyres_max_"))
    return anyres_layout(model, inputs, images, max_patches=max_tiles)


# LLaVA's module layout with SigLIP (no CLS), a Qwen2 chat format and pooled any-res tiles.
ADAPTER = replace(
    LLAVA,
    family="llava_onevision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    layout=onevision_layout,
    chat="<|im_start|>user <image>\n{question}<|im_end|>\n<|im_start|>assistant\n",
    processor_loader=loader(LlavaOnevisionImageTextProcessor),
    nested_images=True,
)
