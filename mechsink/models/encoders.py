"""Standalone vision encoders: CLIP, SigLIP, DINOv2 (with or without registers).

Vision-only models have the ``vit.*`` sites and ``vit.out`` = the output of the last block (before
any final norm or pooling head). Each image is one ViT item. The sequence is
[CLS] + [registers] + patches, as the encoder has them; CLS and registers are listed in
``special`` with roles ``cls`` and ``register``.
"""
from __future__ import annotations

import numpy as np

from ..tokens import TokenMap
from .base import Adapter, BlockParts


def encoder_layout(n_cls: int, n_registers: str | None = None):
    """Layout for an encoder with `n_cls` CLS tokens and `config.<n_registers>` register tokens."""
    def layout(model, inputs, images) -> TokenMap:
        cfg = model.hf.config
        regs = getattr(cfg, n_registers) if n_registers else 0
        ph, pw = inputs["pixel_values"].shape[-2:]
        rows, cols = ph // cfg.patch_size, pw // cfg.patch_size
        patches, special, grids = [], [], {}
        item = 0
        for s, group in enumerate(images):
            for i in range(len(group)):
                grids[(s, i, 0)] = (rows, cols)
                for v, role in enumerate(["cls"] * n_cls + ["register"] * regs):
                    special.append(dict(sample=s, image=i, tile=0, role=role, vit_item=item, vit_pos=v,
                                        out_item=item, out_pos=v, proj_item=-1, proj_pos=-1, llm_pos=-1))
                off = n_cls + regs
                for p in range(rows * cols):
                    r, c = divmod(p, cols)
                    patches.append(dict(sample=s, image=i, tile=0, row=r, col=c, vit_item=item, vit_pos=off + p,
                                        out_item=item, out_pos=off + p, proj_item=-1, proj_pos=-1, llm_pos=-1))
                item += 1
        return TokenMap(patches, special, [], np.zeros((len(images), 0), dtype=np.int8), grids)
    return layout


CLIP = Adapter(
    family="clip",
    architectures=("CLIPVisionModel",),
    vit_embed="embeddings",
    vit_blocks="encoder.layers",
    vit_out=("encoder.layers.{last}", "output"),
    vit_parts=BlockParts(attn="self_attn", mlp="mlp", mlp_out_proj="mlp.fc2"),
    layout=encoder_layout(1),
    vision_only=True,
)

SIGLIP = Adapter(
    family="siglip",
    architectures=("SiglipVisionModel",),
    vit_embed="embeddings",
    vit_blocks="encoder.layers",
    vit_out=("encoder.layers.{last}", "output"),
    vit_parts=BlockParts(attn="self_attn", mlp="mlp", mlp_out_proj="mlp.fc2"),
    layout=encoder_layout(0),
    vision_only=True,
)

# The residual adds the layer-scaled outputs; giant checkpoints use a SwiGLU MLP (down_proj).
_DINO_PARTS = BlockParts(attn="attention", mlp="mlp", mlp_out_proj="mlp.fc2|mlp.down_proj",
                         attn_out="layer_scale1", mlp_out="layer_scale2")

DINOV2 = Adapter(
    family="dinov2",
    architectures=("Dinov2Model",),
    vit_embed="embeddings",
    vit_blocks="encoder.layer",
    vit_out=("encoder.layer.{last}", "output"),
    vit_parts=_DINO_PARTS,
    layout=encoder_layout(1),
    vision_only=True,
)

DINOV2_REGISTERS = Adapter(
    family="dinov2_registers",
    architectures=("Dinov2WithRegistersModel",),
    vit_embed="embeddings",
    vit_blocks="encoder.layer",
    vit_out=("encoder.layer.{last}", "output"),
    vit_parts=_DINO_PARTS,
    layout=encoder_layout(1, "num_register_tokens"),
    vision_only=True,
)

ADAPTERS = [CLIP, SIGLIP, DINOV2, DINOV2_REGISTERS]
