"""LLaVA-1.5: CLIP ViT -> 2-layer MLP projector -> Llama/Vicuna. One LLM token per ViT patch."""
from __future__ import annotations

import numpy as np

from ..tokens import ROLE, TokenMap
from .base import Adapter, BlockParts


def llm_roles(input_ids, attention_mask, image_token_ids) -> np.ndarray:
    """Role code of every LLM position: pad / text / image."""
    ids = input_ids.cpu().numpy()
    roles = np.full(ids.shape, ROLE["text"], dtype=np.int8)
    roles[np.isin(ids, list(image_token_ids))] = ROLE["image"]
    if attention_mask is not None:
        roles[attention_mask.cpu().numpy() == 0] = ROLE["pad"]
    return roles


def image_runs(roles_row: np.ndarray, n_images: int, sample: int) -> list[np.ndarray]:
    """Split a row's image positions into one contiguous run per image placeholder."""
    pos = np.nonzero(roles_row == ROLE["image"])[0]
    runs = np.split(pos, np.nonzero(np.diff(pos) > 1)[0] + 1) if len(pos) else []
    if len(runs) != n_images:
        from ..errors import PromptError
        raise PromptError(f"sample {sample}: {len(runs)} image-token runs in the prompt for {n_images} image(s)")
    return runs


def llava_layout(model, inputs, images) -> TokenMap:
    cfg = model.hf.config
    vc = cfg.vision_config
    g = vc.image_size // vc.patch_size
    full = cfg.vision_feature_select_strategy == "full"
    off = int(full)   # with the "full" strategy the CLS token also enters the LLM first
    roles = llm_roles(inputs["input_ids"], inputs.get("attention_mask"), [cfg.image_token_id])
    p = np.arange(g * g, dtype=np.int64)
    r, c = np.divmod(p, g)
    keys, runs = [], []
    for s, group in enumerate(images):
        for i, run in enumerate(image_runs(roles[s], len(group), s)):
            if len(run) != g * g + off:
                from ..errors import PromptError
                raise PromptError(f"sample {s} image {i}: {len(run)} image tokens, expected {g * g + off}")
            keys.append((s, i))
            runs.append(run)
    n = len(keys)
    sample = np.array([k[0] for k in keys], dtype=np.int64)
    image = np.array([k[1] for k in keys], dtype=np.int64)
    item = np.arange(n, dtype=np.int64)
    llm_pos = np.array(runs, dtype=np.int64).reshape(n, g * g + off) if n else np.zeros((0, g * g + off), np.int64)
    each = lambda a: np.repeat(a, g * g)  # noqa: E731 - per image -> per patch
    grid = lambda a: np.tile(a, n)        # noqa: E731 - per grid cell -> per patch
    patches = dict(sample=each(sample), image=each(image), tile=np.zeros(n * g * g, np.int64), row=grid(r), col=grid(c),
                   patch=grid(p), vit_item=each(item), vit_pos=grid(p + 1), out_item=each(item), out_pos=grid(p + off),
                   proj_item=each(item), proj_pos=grid(p + off), llm_pos=llm_pos[:, off:].reshape(-1))
    no = np.full(n, -1, dtype=np.int64)
    special = dict(sample=sample, image=image, tile=np.zeros(n, np.int64), role=np.full(n, "cls", dtype=object),
                   vit_item=item, vit_pos=np.zeros(n, np.int64), out_item=item if full else no,
                   out_pos=np.zeros(n, np.int64) if full else no, proj_item=item if full else no,
                   proj_pos=np.zeros(n, np.int64) if full else no, llm_pos=llm_pos[:, 0] if full else no)
    llm = dict(sample=patches["sample"], llm_pos=patches["llm_pos"], role=np.full(n * g * g, "image", dtype=object),
               image=patches["image"], tile=patches["tile"], row=patches["row"], col=patches["col"])
    grids = {(int(s), int(i), 0): (g, g) for s, i in keys}
    return TokenMap(patches, special, llm, roles, grids)


ADAPTER = Adapter(
    family="llava",
    architectures=("LlavaForConditionalGeneration",),
    vit_embed="model.vision_tower.embeddings",
    vit_blocks="model.vision_tower.encoder.layers",
    vit_out=("model.multi_modal_projector", "input"),
    vit_parts=BlockParts(attn="self_attn", mlp="mlp", mlp_out_proj="mlp.fc2"),
    projector="model.multi_modal_projector",
    llm_blocks="model.language_model.layers",
    lm_head="lm_head",
    layout=llava_layout,
)
