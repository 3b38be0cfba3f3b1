"""Tiny, architecture-faithful, seeded random models built offline from configs (< 1 s each)."""
from __future__ import annotations

import torch
import transformers as tf

from ..models.processors import (LlavaOnevisionImageTextProcessor, Qwen2_5_VLImageTextProcessor,
                                 Qwen2VLImageTextProcessor)
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


# -- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------------------
QWEN_SPECIALS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")


def qwen_processor(cls, patch_size: int, merge_size: int, max_side: int = 32):
    """An image+text Qwen processor: 4 px patches, 2x2 merges, images resized to multiples of 8 px."""
    tok = word_tokenizer([*WORDS, "user", "assistant"], extra_special=QWEN_SPECIALS)
    factor = patch_size * merge_size
    ip = tf.Qwen2VLImageProcessorPil(min_pixels=factor * factor, max_pixels=max_side * max_side,
                                     patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2)
    return cls(image_processor=ip, tokenizer=tok)


def _qwen_text(tok, **kw) -> dict:
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}, **ids)
    return {**base, **kw}


def _qwen_ids(tok) -> dict:
    c = tok.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def tiny_qwen2_vl(seed: int = 0, *, vision: dict | None = None, text: dict | None = None, **cfg_kw):
    """(hf model, processor) for a tiny Qwen2-VL (2 ViT blocks, 2x2 merger, M-RoPE LLM)."""
    proc = qwen_processor(Qwen2VLImageTextProcessor, patch_size=4, merge_size=2)
    vc = {**dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                 spatial_merge_size=2, temporal_patch_size=2), **(vision or {})}
    cfg = tf.Qwen2VLConfig(vision_config=vc, text_config=_qwen_text(proc.tokenizer, **(text or {})),
                           **_qwen_ids(proc.tokenizer), **cfg_kw)
    seeded(seed)
    return tf.Qwen2VLForConditionalGeneration(cfg).eval(), proc


def tiny_qwen2_5_vl(seed: int = 0, *, vision: dict | None = None, text: dict | None = None, **cfg_kw):
    """(hf model, processor) for a tiny Qwen2.5-VL: 16 px attention windows (2x2 merged tokens),
    block 0 windowed, block 1 full attention."""
    proc = qwen_processor(Qwen2_5_VLImageTextProcessor, patch_size=4, merge_size=2)
    vc = {**dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=4,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
          **(vision or {})}
    cfg = tf.Qwen2_5_VLConfig(vision_config=vc, text_config=_qwen_text(proc.tokenizer, **(text or {})),
                              **_qwen_ids(proc.tokenizer), **cfg_kw)
    seeded(seed)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg).eval(), proc


BUILDERS["tiny-qwen2-vl"] = tiny_qwen2_vl
BUILDERS["tiny-qwen2.5-vl"] = tiny_qwen2_5_vl


# -- LLaVA-OneVision -----------------------------------------------------------------------------
def tiny_llava_onevision(seed: int = 0, *, vision: dict | None = None, text: dict | None = None,
                         vision_aspect_ratio: str = "anyres_max_9", **cfg_kw):
    """(hf model, processor) for a tiny LLaVA-OneVision (SigLIP + Qwen2, any-res tiles).
    ``vision_aspect_ratio="anyres_max_1"`` makes 2x2-tile canvases pool down to 4x4 tokens."""
    vc = tf.SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=16, patch_size=4), **(vision or {})})
    tok = word_tokenizer([*WORDS, "user", "assistant"], extra_special=("<image>", "<video>", "<|im_start|>", "<|im_end|>"))
    ip = tf.LlavaOnevisionImageProcessorPil(size={"height": vc.image_size, "width": vc.image_size},
                                            image_grid_pinpoints=PINPOINTS)
    g = vc.image_size // vc.patch_size
    proc = LlavaOnevisionImageTextProcessor(
        image_processor=ip, tokenizer=tok, num_image_tokens=g * g, vision_feature_select_strategy="full",
        image_token="<image>", vision_aspect_ratio=vision_aspect_ratio)
    tc = tf.Qwen2Config(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False), **(text or {})})
    cfg = tf.LlavaOnevisionConfig(vision_config=vc, text_config=tc, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                                  vision_aspect_ratio=vision_aspect_ratio,
                                  image_token_id=tok.convert_tokens_to_ids("<image>"), **cfg_kw)
    seeded(seed)
    return tf.LlavaOnevisionForConditionalGeneration(cfg).eval(), proc


BUILDERS["tiny-llava-onevision"] = tiny_llava_onevision


# -- standalone vision encoders ------------------------------------------------------------------
def _vit(**kw) -> dict:
    return {**dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4), **kw}


def tiny_clip(seed: int = 0, **kw):
    """(CLIPVisionModel, image processor): CLS + 4x4 patches."""
    cfg = tf.CLIPVisionConfig(**_vit(intermediate_size=64) | kw)
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size},
                                  crop_size={"height": cfg.image_size, "width": cfg.image_size})
    seeded(seed)
    return tf.CLIPVisionModel(cfg).eval(), ip


def tiny_siglip(seed: int = 0, **kw):
    """(SiglipVisionModel, image processor): 4x4 patches, no CLS."""
    cfg = tf.SiglipVisionConfig(**_vit(intermediate_size=64) | kw)
    ip = tf.SiglipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size})
    seeded(seed)
    return tf.SiglipVisionModel(cfg).eval(), ip


def tiny_dinov2(seed: int = 0, **kw):
    """(Dinov2WithRegistersModel, image processor): CLS + 2 registers + 4x4 patches."""
    cfg = tf.Dinov2WithRegistersConfig(**_vit(mlp_ratio=2, num_register_tokens=2) | kw)
    ip = tf.BitImageProcessorPil(size={"shortest_edge": cfg.image_size},
                                 crop_size={"height": cfg.image_size, "width": cfg.image_size})
    seeded(seed)
    return tf.Dinov2WithRegistersModel(cfg).eval(), ip


BUILDERS.update({"tiny-clip": tiny_clip, "tiny-siglip": tiny_siglip, "tiny-dinov2": tiny_dinov2})


# -- Gemma 3 -------------------------------------------------------------------------------------
GEMMA_SPECIALS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}


def tiny_gemma3(seed: int = 0, *, vision: dict | None = None, text: dict | None = None, **cfg_kw):
    """(hf model, processor) for a tiny Gemma 3: SigLIP 4x4 patches pooled 2x2 into 4 image tokens."""
    vc = tf.SiglipVisionConfig(**{**_vit(intermediate_size=64, num_hidden_layers=2), **(vision or {})})
    tok = word_tokenizer([*WORDS, "user", "model"],
                         extra_special=(*GEMMA_SPECIALS.values(), "<start_of_turn>", "<end_of_turn>"))
    tok._set_model_specific_special_tokens(special_tokens=GEMMA_SPECIALS)   # the processor reads tok.boi_token etc.
    ip = tf.Gemma3ImageProcessorPil(size={"height": vc.image_size, "width": vc.image_size})
    proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4)
    tc = tf.Gemma3TextConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, vocab_size=len(tok), sliding_window=8,
                                       max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), **(text or {})})
    cfg = tf.Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=4, boi_token_index=tok.boi_token_id,
                          eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id, **cfg_kw)
    seeded(seed)
    hf = tf.Gemma3ForConditionalGeneration(cfg).eval()
    # HF initialises the projection to zeros, which would cut the ViT off from the LLM
    torch.nn.init.normal_(hf.model.multi_modal_projector.mm_input_projection_weight, std=vc.hidden_size ** -0.5)
    return hf, proc


BUILDERS["tiny-gemma3"] = tiny_gemma3
