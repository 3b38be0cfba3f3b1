"""Tiny, architecture-faithful, seeded random models built offline from configs (< 1 s each)."""
from __future__ import annotations

import torch
import transformers as tf

from .vocab import word_tokenizer

# Enough words for the default prompts, POPE-style questions and the tests.
WORDS = ("describe the image . is there a an in this picture ? yes no what which how many kind of object "
         "color top left right bottom corner center cat dog person car shirt bag one two three four").split()


def seeded(seed: int):
    torch.manual_seed(seed)


def clip_vision_config(**kw) -> tf.CLIPVisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=32, patch_size=8, projection_dim=32)
    return tf.CLIPVisionConfig(**{**base, **kw})


def llama_config(vocab_size: int, **kw) -> tf.LlamaConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                tie_word_embeddings=False)
    return tf.LlamaConfig(**{**base, **kw})


def llava_processor(image_size: int, patch_size: int, words=WORDS) -> tf.LlavaProcessor:
    tok = word_tokenizer(list(words))
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})
    return tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                             vision_feature_select_strategy="default", image_token="<image>",
                             num_additional_image_tokens=1)


def tiny_llava(seed: int = 0, *, vision: dict | None = None, text: dict | None = None, **cfg_kw):
    """(hf model, processor) for a tiny LLaVA-1.5."""
    vc = clip_vision_config(**(vision or {}))
    proc = llava_processor(vc.image_size, vc.patch_size)
    tc = llama_config(len(proc.tokenizer), **(text or {}))
    cfg = tf.LlavaConfig(vision_config=vc, text_config=tc, vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"), **cfg_kw)
    seeded(seed)
    return tf.LlavaForConditionalGeneration(cfg).eval(), proc


BUILDERS = {"tiny-llava": tiny_llava}


# -- any-resolution LLaVA ------------------------------------------------------------------------
# 16 px tiles of 4 px patches (a 4x4 grid per tile); canvases of up to 2x2 tiles.
PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def tiny_llava_next(seed: int = 0, *, vision: dict | None = None, text: dict | None = None, **cfg_kw):
    """(hf model, processor) for a tiny LLaVA-NeXT (CLIP + Llama, any-res tiles, unpadding)."""
    vc = clip_vision_config(**{"image_size": 16, "patch_size": 4, **(vision or {})})
    tok = word_tokenizer(list(WORDS))
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": vc.image_size}, image_grid_pinpoints=PINPOINTS,
                                       crop_size={"height": vc.image_size, "width": vc.image_size})
    proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=vc.patch_size,
                                 vision_feature_select_strategy="default", image_token="<image>",
                                 num_additional_image_tokens=1)
    tc = llama_config(len(tok), **(text or {}))
    cfg = tf.LlavaNextConfig(vision_config=vc, text_config=tc, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
                             image_token_id=tok.convert_tokens_to_ids("<image>"), **cfg_kw)
    seeded(seed)
    return tf.LlavaNextForConditionalGeneration(cfg).eval(), proc


BUILDERS["tiny-llava-next"] = tiny_llava_next
