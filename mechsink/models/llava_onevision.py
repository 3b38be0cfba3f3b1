"""LLaVA-OneVision: a SigLIP ViT (no CLS; every patch feeds the projector), any-res tiles as in
LLaVA-NeXT, and a Qwen2 LLM. Canvases larger than ``anyres_max_N`` tiles are bilinearly pooled
before they reach the LLM (see `llava_next` for how the TokenMap records that)."""
from __future__ import annotations

from ..tokens import TokenMap
from .base import Adapter, BlockParts
from .llava_next import anyres_layout
from .processors import LlavaOnevisionImageTextProcessor, loader


def onevision_layout(model, inputs, images) -> TokenMap:
    max_tiles = int(model.hf.config.vision_aspect_ratio.removeprefix("anyres_max_"))
    return anyres_layout(model, inputs, images, max_patches=max_tiles)


ADAPTER = Adapter(
    family="llava_onevision",
    architectures=("LlavaOnevisionForConditionalGeneration",),
    vit_embed="model.vision_tower.embeddings",
    vit_blocks="model.vision_tower.encoder.layers",
    vit_out=("model.multi_modal_projector", "input"),
    vit_parts=BlockParts(attn="self_attn", mlp="mlp", mlp_out_proj="mlp.fc2"),
    projector="model.multi_modal_projector",
    llm_blocks="model.language_model.layers",
    lm_head="lm_head",
    layout=onevision_layout,
    chat="<|im_start|>user <image>\n{question}<|im_end|>\n<|im_start|>assistant\n",
    processor_loader=loader(LlavaOnevisionImageTextProcessor),
    nested_images=True,
)
