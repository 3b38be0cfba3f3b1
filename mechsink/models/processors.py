"""Image+text processors for families whose HF processor also insists on a video processor.

Transformers builds video processors only with torchvision, which mechsink does not need (and which
breaks other classes here); these subclasses drop the video slot and keep everything else,
including what `save_pretrained` writes, so a saved model opens again without torchvision.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


@functools.cache
def image_text_processor(cls: type) -> type:
    """Subclass of the HF processor class `cls` without its ``video_processor`` argument."""
    sig = inspect.signature(cls.__init__)

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs)

    # ProcessorMixin reads the signature to know which attributes to save and load.
    __init__.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "video_processor"])
    name = f"{cls.__name__.removesuffix('Processor')}ImageTextProcessor"
    return type(name, (cls,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def loader(processor_class: str) -> Callable[[str], Any]:
    """A `processor_loader` for an Adapter: AutoProcessor first, then the image+text variant of
    ``transformers.<processor_class>`` when the full processor cannot be built."""
    def load(name: str):
        import transformers
        try:
            return transformers.AutoProcessor.from_pretrained(name)
        except Exception:  # no torchvision for the video processor, or a saved image+text processor
            return image_text_processor(getattr(transformers, processor_class)).from_pretrained(name)
    return load
