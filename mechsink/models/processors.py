"""Image+text processors for families whose HF processor also insists on a video processor.

Transformers builds video processors only with torchvision, which mechsink does not need (and which
breaks other classes here). These subclasses leave the video slot empty and keep everything else,
including what `save_pretrained` writes, so a saved model opens again without torchvision.
Their ``__init__`` signatures are spelled out because ProcessorMixin reads them to decide what to
save and load.
"""
from __future__ import annotations

from typing import Any, Callable

import transformers as tf


class Qwen2VLImageTextProcessor(tf.Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageTextProcessor(tf.Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class LlavaOnevisionImageTextProcessor(tf.LlavaOnevisionProcessor):
    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)


def loader(image_text: type) -> Callable[[str], Any]:
    """A `processor_loader` for an Adapter: the full processor through AutoProcessor when it can be
    built, else the `image_text` variant."""
    def load(name: str):
        try:
            proc = tf.AutoProcessor.from_pretrained(name)
            if hasattr(proc, "image_processor"):   # not AutoProcessor's bare-tokenizer fallback
                return proc
        except Exception:  # no torchvision for the video processor
            pass
        return image_text.from_pretrained(name)
    return load
