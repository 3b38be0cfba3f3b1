"""LLaVA-NeXT: any-resolution tiles around a CLIP ViT, a 2-layer MLP projector and a Llama-type LLM.

Each image becomes a base view (tile 0: the whole image resized to the ViT's input size) and the
tiles 1.. of a high-resolution canvas, cut row-major. Every tile is one ViT item. In the LLM the
base tile's tokens come first, then the canvas row by row with the processor's padding rows or
columns removed ("unpadding") and one ``image_newline`` token closing each row. Patches removed by
unpadding never reach the LLM (``llm_pos`` -1).

TokenMap conventions (shared with LLaVA-OneVision):
- ``patches.row/col`` are cells of the patch's own tile; ``grids[(s, i, t)]`` is (g, g) for every
  tile and ``grids[(s, i, -1)]`` the whole canvas in patches, so tile t >= 1 sits at canvas rows
  ``(t-1) // (canvas_cols/g) * g`` and columns ``(t-1) % (canvas_cols/g) * g`` onward.
- ``llm_tokens`` rows with role ``newline`` have tile -1, ``row`` = the canvas row they close
  (counted after unpadding; 0 for the single newline after an image that was not tiled), col -1.
- When LLaVA-OneVision pools an oversized canvas (``anyres_max_N``), canvas tokens are bilinear
  mixtures: they are listed with tile -1 and their pooled-grid cell, and each canvas patch points
  at the pooled cell that contains its centre (an approximation of the mixing, by design).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..errors import PromptError, UnsupportedModel
from ..tokens import ROLE, TokenMap
from .llava import ADAPTER as LLAVA
from .llava import image_runs, llm_roles


def _n_cls(vision_config) -> int:
    """CLS tokens in front of the patches (CLIP has one, SigLIP none)."""
    return 1 if vision_config.model_type.startswith("clip") else 0


def anyres_layout(model, inputs, images, *, max_patches: int | None = None) -> TokenMap:
    """TokenMap of LLaVA-NeXT / LLaVA-OneVision. ``max_patches`` is OneVision's ``anyres_max_N``."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape, image_size_to_num_patches, unpad_image)
    cfg = model.hf.config
    vc = cfg.vision_config
    g = vc.image_size // vc.patch_size
    n_cls = _n_cls(vc)
    drop = 1 if cfg.vision_feature_select_strategy == "default" else 0
    if n_cls != drop:
        raise UnsupportedModel(f"{model.name}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} "
                               f"with {n_cls} CLS token(s) does not give {g}x{g} features per tile")
    pinpoints = cfg.image_grid_pinpoints
    sizes = inputs["image_sizes"].tolist()
    # OneVision does not tile the images of a multi-image sample.
    per_sample = inputs.get("batch_num_images")
    patching = ([int(n) == 1 for n in per_sample for _ in range(int(n))] if per_sample is not None
                else [True] * len(sizes))
    roles = llm_roles(inputs["input_ids"], inputs.get("attention_mask"), [cfg.image_token_id])
    patches, special, llm, grids = [], [], [], {}
    item, j = 0, 0
    for s, group in enumerate(images):
        for i, run in enumerate(image_runs(roles[s], len(group), s)):
            size = sizes[j]
            n_tiles = image_size_to_num_patches(size, pinpoints, vc.image_size) if patching[j] else 1
            j += 1
            # LLM order: base tile, then canvas rows (each closed by a newline).
            canvas = _canvas(size, n_tiles, g, pinpoints, vc.image_size, max_patches,
                             get_anyres_image_grid_shape, unpad_image)
            expected = g * g + (canvas["rows"] * (canvas["cols"] + 1) if canvas else 1)
            if len(run) != expected:
                raise PromptError(f"sample {s} image {i}: {len(run)} image tokens, expected {expected}")
            for t in range(n_tiles):
                grids[(s, i, t)] = (g, g)
                if n_cls:
                    special.append(dict(sample=s, image=i, tile=t, role="cls", vit_item=item + t, vit_pos=0,
                                        out_item=-1, out_pos=-1, proj_item=-1, proj_pos=-1, llm_pos=-1))
                for p in range(g * g):
                    r, c = divmod(p, g)
                    k = p if t == 0 else _canvas_index(canvas, t, r, c, g)
                    pos = int(run[k]) if k >= 0 else -1
                    patches.append(dict(sample=s, image=i, tile=t, row=r, col=c, vit_item=item + t, vit_pos=n_cls + p,
                                        out_item=item + t, out_pos=p, proj_item=item + t, proj_pos=p, llm_pos=pos))
                    if t == 0 or (k >= 0 and not canvas["pooled"]):
                        llm.append(dict(sample=s, llm_pos=pos, role="image", image=i, tile=t, row=r, col=c))
            if canvas:
                grids[(s, i, -1)] = (canvas["nph"] * g, canvas["npw"] * g)
                for a in range(canvas["rows"]):
                    base = g * g + a * (canvas["cols"] + 1)
                    if canvas["pooled"]:
                        llm += [dict(sample=s, llm_pos=int(run[base + b]), role="image", image=i, tile=-1, row=a, col=b)
                                for b in range(canvas["cols"])]
                    llm.append(dict(sample=s, llm_pos=int(run[base + canvas["cols"]]), role="newline", image=i,
                                    tile=-1, row=a, col=-1))
            else:
                llm.append(dict(sample=s, llm_pos=int(run[-1]), role="newline", image=i, tile=-1, row=0, col=-1))
            item += n_tiles
    for r in llm:
        if r["role"] == "newline":
            roles[r["sample"], r["llm_pos"]] = ROLE["newline"]
    llm.sort(key=lambda r: (r["sample"], r["llm_pos"]))
    return TokenMap(patches, special, llm, roles, grids)


def _canvas(size, n_tiles, g, pinpoints, tile_px, max_patches, grid_shape, unpad) -> dict | None:
    """Geometry of the tiled canvas as the model packs it: tile layout, the rows/columns unpadding
    keeps, and the (rows, cols) of canvas tokens in the LLM (pooled when over ``max_patches``)."""
    if n_tiles == 1:
        return None
    nph, npw = grid_shape(size, pinpoints, tile_px)
    H, W = nph * g, npw * g
    # Run the model's own unpadding on a grid of indices to learn which cells survive.
    kept = unpad(torch.arange(H * W).view(1, H, W), size)[0]
    h, w = kept.shape
    row0, col0 = divmod(int(kept[0, 0]), W)
    rows, cols, pooled = h, w, False
    if max_patches is not None:
        ratio = math.sqrt(h * w / (max_patches * g * g))
        if ratio > 1.1:
            rows, cols, pooled = int(h // ratio), int(w // ratio), True
    return dict(nph=nph, npw=npw, row0=row0, col0=col0, h=h, w=w, rows=rows, cols=cols, pooled=pooled)


def _canvas_index(cv: dict, t: int, r: int, c: int, g: int) -> int:
    """Index in the image's LLM token run of cell (r, c) of tile t >= 1, or -1 when unpadded away."""
    R = (t - 1) // cv["npw"] * g + r - cv["row0"]
    C = (t - 1) % cv["npw"] * g + c - cv["col0"]
    if not (0 <= R < cv["h"] and 0 <= C < cv["w"]):
        return -1
    if cv["pooled"]:   # the pooled cell holding the patch centre
        R, C = int((R + 0.5) * cv["rows"] / cv["h"]), int((C + 0.5) * cv["cols"] / cv["w"])
    return g * g + R * (cv["cols"] + 1) + C


# Same module layout as LLaVA-1.5; only the token layout differs.
ADAPTER = replace(LLAVA, family="llava_next", architectures=("LlavaNextForConditionalGeneration",), layout=anyres_layout)
