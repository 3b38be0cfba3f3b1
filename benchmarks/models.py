"""The models the benchmarks run: ``tiny-llava`` from the zoo and a ViT-B/16-sized random LLaVA.

The ViT-B/16-sized model has the shape the issue's targets are stated for: a CLIP ViT with 12
blocks of width 768 on 224 px images in 16 px patches (196 patches + CLS), a 2-layer projector and
a 4-layer Llama of width 512. Weights are seeded random (built offline from configs in a few
seconds); speed and memory depend on shapes, not on training.
"""
from __future__ import annotations

import mechsink

VITB_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, projection_dim=512)
VITB_TEXT = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=1024)
MODELS = ("tiny-llava", "vitb-llava")


def vitb_llava(seed: int = 0) -> mechsink.Model:
    """A LLaVA-1.5 with a ViT-B/16-sized CLIP tower (224 px, 196 patches) and a 4-layer Llama."""
    from mechsink.zoo.tiny import tiny_llava
    hf, proc = tiny_llava(seed, vision=VITB_VISION, text=VITB_TEXT)
    return mechsink.wrap(hf, proc, name="vitb-llava", source="benchmarks:vitb-llava")


def build(name: str, seed: int = 0) -> mechsink.Model:
    """A benchmark model by name (see MODELS)."""
    if name == "vitb-llava":
        return vitb_llava(seed)
    if name == "tiny-llava":
        return mechsink.load("tiny-llava", seed=seed)
    raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)}")
