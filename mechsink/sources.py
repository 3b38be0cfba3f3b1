"""Source runs for patching: where the values written into the base run come from.

Words: the **base** run is the one we change; the **source** run is where values come from. A
source batch has the base's token layout (same prompts, answers and token roles) with other
images: ``with_images(model, base, images)``, with the images of another dataset or corrupted
copies of the base's own (``corrupt``: ``shuffle``, another image of the batch; ``noise``; ``blank``).
``check_pair`` refuses a pair whose layouts differ.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .errors import MechsinkError

CORRUPTIONS = ("shuffle", "noise", "blank")


class PatchError(MechsinkError, ValueError):
    """Patching input that cannot work (mismatched runs, unsupported site, unknown corruption)."""


def check_pair(base, source) -> None:
    """Base and source must have the same token layout (same prompts and image sizes)."""
    for key in ("input_ids", "attention_mask", "pixel_values"):
        a, b = base.inputs.get(key), source.inputs.get(key)
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            raise PatchError(f"base and source differ in {key} shape ({None if a is None else tuple(a.shape)} vs "
                             f"{None if b is None else tuple(b.shape)}); patching needs the same prompts and image sizes")
    if not np.array_equal(base.token_map.roles, source.token_map.roles):
        raise PatchError("base and source have different token layouts; prepare both with the same prompts")


def corrupt(images: Sequence, how: str = "shuffle", seed: int = 0) -> list:
    """Source images for patching: ``shuffle`` (another image of the list, never the same one),
    ``noise`` (uniform noise of the same size) or ``blank`` (flat mid-grey)."""
    if how not in CORRUPTIONS:
        raise PatchError(f"unknown corruption {how!r}; use {', '.join(CORRUPTIONS)}")
    rng = np.random.default_rng(seed)
    if how == "shuffle":
        if len(images) < 2:
            raise PatchError("shuffle needs at least two images")
        perm = rng.permutation(len(images))
        while (perm == np.arange(len(images))).any():
            perm = rng.permutation(len(images))
        return [images[i] for i in perm]
    out = []
    for im in images:
        w, h = im.size
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if how == "noise" else np.full((h, w, 3), 128, np.uint8)
        out.append(Image.fromarray(a, "RGB"))
    return out


def with_images(model, batch, images: Sequence):
    """A batch like ``batch`` (same prompts, answers and token roles) with other images: the
    natural source for patching."""
    if len(images) != batch.size:
        raise PatchError(f"{len(images)} images for a batch of {batch.size}")
    out = model.prepare(images, batch.prompts)          # prompts already hold the placeholder and answers
    if out.inputs["input_ids"].shape != batch.inputs["input_ids"].shape:
        raise PatchError("the new images change the prompt layout; use images of the same size")
    out.token_map.roles = batch.token_map.roles.copy()
    out.answers = list(batch.answers) if batch.answers is not None else None
    return out


__all__ = ["CORRUPTIONS", "PatchError", "check_pair", "corrupt", "with_images"]
