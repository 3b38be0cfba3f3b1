"""The models the benchmarks run: ``tiny-llava`` from the zoo, a ViT-B/16-sized random LLaVA and
``twin-llava``, the LLaVA-1.5-7B twin at cut depth (real config, processor and tokenizer; ViT-L/14-336
at its full 24 blocks and two 4096-wide LLM blocks; random weights). The twin needs npm for its
tokenizer the first time; without it the twin is skipped with the reason (``Skip``).

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
MODELS = ("tiny-llava", "vitb-llava", "twin-llava")
TWIN = "twin-llava-1.5-7b:vit=24,llm=2"
TWIN_CUT = "twin-llava-1.5-7b:vit=2,llm=1"     # ``twin-cut``: the streaming section's twin (real widths, cut deep)


class Skip(Exception):
    """A model that cannot be built on this machine (the reason is the message)."""


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
    if name in ("twin-llava", "twin-cut"):
        from mechsink.zoo.twins import TwinError
        try:
            m = mechsink.load(TWIN if name == "twin-llava" else TWIN_CUT, seed=seed)
        except TwinError as e:
            raise Skip(str(e)) from None
        m.name = name
        return m
    raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)}")
