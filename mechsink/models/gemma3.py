"""Gemma 3: a SigLIP ViT, a projector that average-pools k x k patch blocks into one token, and a
Gemma 3 LLM whose image tokens attend to each other bidirectionally.

Every patch of a k x k block shares one ``proj_pos`` / ``llm_pos`` (pooling is exact, not a mixture
of neighbours). ``vit.out`` is the projector input, i.e. the ViT output after SigLIP's final
LayerNorm. The residual adds the post-attention / post-feedforward norms' outputs, which are
therefore ``hook_attn_out`` / ``hook_mlp_out``. Pan-and-scan crops are not supported.
"""
from __future__ import annotations

from dataclasses import replace

from ..errors import PromptError, UnsupportedModel
from ..tokens import TokenMap
from .base import BlockParts
from .llava import ADAPTER as LLAVA
from .llava import image_runs, llm_roles


def gemma3_layout(model, inputs, images) -> TokenMap:
    cfg = model.hf.config
    vc = cfg.vision_config
    g = vc.image_size // vc.patch_size
    side = int(cfg.mm_tokens_per_image ** 0.5)
    k = g // side
    crops = inputs.get("num_crops")
    if crops is not None and int(crops.sum()) > 0:
        raise UnsupportedModel(f"{model.name}: pan-and-scan crops are not supported; call the processor without them")
    roles = llm_roles(inputs["input_ids"], inputs.get("attention_mask"), [cfg.image_token_id])
    patches, llm, grids = [], [], {}
    item = 0
    for s, group in enumerate(images):
        for i, run in enumerate(image_runs(roles[s], len(group), s)):
            if len(run) != side * side:
                raise PromptError(f"sample {s} image {i}: {len(run)} image tokens, expected {side * side}")
            grids[(s, i, 0)] = (g, g)
            for p in range(g * g):
                r, c = divmod(p, g)
                cell = (r // k) * side + c // k
                patches.append(dict(sample=s, image=i, tile=0, row=r, col=c, vit_item=item, vit_pos=p,
                                    out_item=item, out_pos=p, proj_item=item, proj_pos=cell, llm_pos=int(run[cell])))
            llm += [dict(sample=s, llm_pos=int(run[cell]), role="image", image=i, tile=0, row=cell // side,
                         col=cell % side) for cell in range(side * side)]
            item += 1
    return TokenMap(patches, [], llm, roles, grids)


# LLaVA's module layout (SigLIP tower, multi_modal_projector); Gemma 3's LLM adds its attention and MLP
# outputs to the residual after an extra norm, so those norms are the attn_out / mlp_out sites.
ADAPTER = replace(
    LLAVA,
    family="gemma3",
    architectures=("Gemma3ForConditionalGeneration",),
    llm_parts=BlockParts(attn="self_attn", mlp="mlp", mlp_out_proj="mlp.down_proj",
                         attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm"),
    layout=gemma3_layout,
    chat="<start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n",
    image_placeholder="<start_of_image>",
    nested_images=True,
)
