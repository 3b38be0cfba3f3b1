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
    roles = llm_roles(inputs["input_ids"], inputs.get("attention_mask"), [cfg.image_token_id])
    patches, special, llm = [], [], []
    item = 0
    for s, group in enumerate(images):
        for i, run in enumerate(image_runs(roles[s], len(group), s)):
            expected = g * g + int(full)
            if len(run) != expected:
                from ..errors import PromptError
                raise PromptError(f"sample {s} image {i}: {len(run)} image tokens, expected {expected}")
            off = int(full)   # with the "full" strategy the CLS token also enters the LLM first
            special.append(dict(sample=s, image=i, tile=0, role="cls", vit_item=item, vit_pos=0,
                                out_item=item if full else -1, out_pos=0 if full else -1,
                                proj_item=item if full else -1, proj_pos=0 if full else -1,
                                llm_pos=int(run[0]) if full else -1))
            for p in range(g * g):
                r, c = divmod(p, g)
                patches.append(dict(sample=s, image=i, tile=0, row=r, col=c, vit_item=item, vit_pos=1 + p,
                                    out_item=item, out_pos=off + p, proj_item=item, proj_pos=off + p,
                                    llm_pos=int(run[off + p])))
                llm.append(dict(sample=s, llm_pos=int(run[off + p]), role="image", image=i, tile=0, row=r, col=c))
            item += 1
    grids = {(s, i, 0): (g, g) for s, group in enumerate(images) for i in range(len(group))}
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
