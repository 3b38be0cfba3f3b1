"""TokenMaps against maps worked out by hand, and against the tensors the models actually produce.

The hand-computed cases (grids below are indexed [row][col] of one tile or image):
- LLaVA-1.5, two left-padded samples: 4x4 patches behind a CLS.
- LLaVA-NeXT 40x10 px image: base view + two 16 px tiles side by side (a 4x8 canvas); unpadding
  keeps canvas rows 1-2, so each tile loses its top and bottom patch rows.
- LLaVA-NeXT 10x40 px image: two tiles stacked (8x4 canvas); unpadding keeps columns 1-2.
- LLaVA-OneVision: the 40x10 case without CLS, a 2x2-tile canvas pooled 8x8 -> 4x4, and a
  two-image sample (not tiled: base view + one newline each).
- Qwen2-VL / Qwen2.5-VL: a 24x16 px image = 4x6 patches = 2x3 merged tokens (2.5: two attention
  windows, so merged tokens run 0,1,3,4 | 2,5 through the ViT), batched with a 16x16 image.
- Gemma 3: 4x4 SigLIP patches average-pooled 2x2 into 4 image tokens.
- CLIP / SigLIP / DINOv2 with registers.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import mechsink
from mechsink.testing import build
from mechsink.testing import test_image as make_image
from mechsink.tokens import ROLE

_ = -1   # "never reaches the LLM"


def grid(tm, column, sample=0, image=0, tile=0) -> list[list[int]]:
    """One TokenMap column laid out on the patch grid of a tile."""
    rows = tm.patches[(tm.patches["sample"] == sample) & (tm.patches["image"] == image) & (tm.patches["tile"] == tile)]
    h, w = tm.grid(sample, image, tile)
    out = np.full((h, w), -99)
    out[rows["row"], rows["col"]] = rows[column]
    assert (out != -99).all()
    return out.tolist()


def newlines(tm, sample=0) -> list[int]:
    t = tm.llm_tokens
    return t.loc[(t["sample"] == sample) & (t["role"] == "newline"), "llm_pos"].tolist()


def img(w, h, seed=0):
    return make_image(48, seed=seed).resize((w, h))


ARANGE16 = np.arange(16).reshape(4, 4)


# -- LLaVA-1.5 ---------------------------------------------------------------------------------------
def test_llava_two_samples_with_left_padding():
    m = mechsink.load("tiny-llava")
    b = m.prepare([img(32, 32), img(32, 32, 1)], ["<image> what", "what is this <image> what"])
    tm = b.token_map
    # sample 0 is 3 tokens shorter, so left padding shifts its image run to start at 3 as well
    assert b.token_map.roles[0, :4].tolist() == [ROLE["pad"]] * 3 + [ROLE["image"]]
    assert b.token_map.roles[1, :4].tolist() == [ROLE["text"]] * 3 + [ROLE["image"]]
    for s in (0, 1):
        assert grid(tm, "vit_item", s) == [[s] * 4] * 4
        assert grid(tm, "vit_pos", s) == (1 + ARANGE16).tolist()
        assert grid(tm, "out_pos", s) == ARANGE16.tolist()
        assert grid(tm, "llm_pos", s) == (3 + ARANGE16).tolist()
    assert tm.special[["sample", "role", "vit_item", "vit_pos", "llm_pos"]].values.tolist() == [
        [0, "cls", 0, 0, -1], [1, "cls", 1, 0, -1]]
    assert_tensors_follow_map(m, b)


# -- LLaVA-NeXT ----------------------------------------------------------------------------------------
NEXT_WIDE = {   # 40x10 px: tiles 1 | 2, canvas rows 1-2 kept, newline after each kept row
    1: [[_, _, _, _], [16, 17, 18, 19], [25, 26, 27, 28], [_, _, _, _]],
    2: [[_, _, _, _], [20, 21, 22, 23], [29, 30, 31, 32], [_, _, _, _]],
}
NEXT_TALL = {   # 10x40 px: tile 1 over tile 2, canvas columns 1-2 kept, 3 LLM tokens per canvas row
    1: [[_, 16, 17, _], [_, 19, 20, _], [_, 22, 23, _], [_, 25, 26, _]],
    2: [[_, 28, 29, _], [_, 31, 32, _], [_, 34, 35, _], [_, 37, 38, _]],
}


@pytest.mark.parametrize("size, tiles, canvas, lines", [
    ((40, 10), NEXT_WIDE, (4, 8), [24, 33]),
    ((10, 40), NEXT_TALL, (8, 4), [18, 21, 24, 27, 30, 33, 36, 39]),
])
def test_llava_next_anyres_tiles_and_unpadding(size, tiles, canvas, lines):
    m = mechsink.load("tiny-llava-next")
    b = m.prepare([img(*size)], ["<image> what"])
    tm = b.token_map
    assert sorted(tm.grids) == [(0, 0, -1), (0, 0, 0), (0, 0, 1), (0, 0, 2)]
    assert tm.grid(0, 0, -1) == canvas
    assert grid(tm, "llm_pos", tile=0) == ARANGE16.tolist()           # base view first
    for t, expected in tiles.items():
        assert grid(tm, "llm_pos", tile=t) == expected
        assert grid(tm, "vit_item", tile=t) == [[t] * 4] * 4
        assert grid(tm, "vit_pos", tile=t) == (1 + ARANGE16).tolist()
        assert grid(tm, "proj_pos", tile=t) == ARANGE16.tolist()
    assert newlines(tm) == lines
    assert np.nonzero(tm.roles[0] == ROLE["newline"])[0].tolist() == lines
    n_img = 16 + len(lines) * (1 + (canvas[1] if size[0] > size[1] else 2))
    assert (tm.roles[0, :n_img] != ROLE["text"]).all() and tm.roles[0, n_img] == ROLE["text"]
    assert tm.special["tile"].tolist() == [0, 1, 2] and (tm.special["llm_pos"] == -1).all()
    assert_tensors_follow_map(m, b)


# -- LLaVA-OneVision -----------------------------------------------------------------------------------
def test_llava_onevision_has_no_cls_and_unpads_like_next():
    m = mechsink.load("tiny-llava-onevision")
    b = m.prepare([img(40, 10)], ["<image> what"])
    tm = b.token_map
    assert tm.special.empty
    for t, expected in NEXT_WIDE.items():
        assert grid(tm, "llm_pos", tile=t) == expected
        assert grid(tm, "vit_pos", tile=t) == ARANGE16.tolist()
    assert newlines(tm) == [24, 33]
    assert_tensors_follow_map(m, b)


POOLED = {  # 40x36 px -> 2x2 tiles, 8x8 canvas pooled to 4x4 (+newline): each 2x2 patch block -> one cell
    1: [[16, 16, 17, 17], [16, 16, 17, 17], [21, 21, 22, 22], [21, 21, 22, 22]],
    2: [[18, 18, 19, 19], [18, 18, 19, 19], [23, 23, 24, 24], [23, 23, 24, 24]],
    3: [[26, 26, 27, 27], [26, 26, 27, 27], [31, 31, 32, 32], [31, 31, 32, 32]],
    4: [[28, 28, 29, 29], [28, 28, 29, 29], [33, 33, 34, 34], [33, 33, 34, 34]],
}


def test_llava_onevision_pooled_canvas_maps_patches_to_their_cell():
    m = build("tiny-llava-onevision", vision_aspect_ratio="anyres_max_1")
    b = m.prepare([img(40, 36)], ["<image> what"])
    tm = b.token_map
    for t, expected in POOLED.items():
        assert grid(tm, "llm_pos", tile=t) == expected
    assert newlines(tm) == [20, 25, 30, 35]
    pooled = tm.llm_tokens[(tm.llm_tokens["tile"] == -1) & (tm.llm_tokens["role"] == "image")]
    assert pooled[["row", "col"]].values.tolist() == [[a, c] for a in range(4) for c in range(4)]
    assert_tensors_follow_map(m, b)


def test_llava_onevision_multi_image_sample_is_not_tiled():
    m = mechsink.load("tiny-llava-onevision")
    b = m.prepare([[img(40, 10), img(10, 40, 1)]], ["<image> and <image> what"])
    tm = b.token_map
    assert b.inputs["batch_num_images"].tolist() == [2]
    assert sorted(tm.grids) == [(0, 0, 0), (0, 1, 0)]
    assert grid(tm, "llm_pos", image=0) == ARANGE16.tolist()
    assert grid(tm, "llm_pos", image=1) == (18 + ARANGE16).tolist()     # "and" sits at 17
    assert grid(tm, "vit_item", image=1) == [[1] * 4] * 4
    assert newlines(tm) == [16, 34]
    assert_tensors_follow_map(m, b)


# -- Gemma 3 -------------------------------------------------------------------------------------------
def test_gemma3_pools_patch_blocks_into_one_token():
    m = mechsink.load("tiny-gemma3")
    b = m.prepare([img(32, 32), img(32, 32, 1)], ["<start_of_image> what", "<start_of_image> is there a cat ?"])
    tm = b.token_map
    cells = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # <start_of_image>, 4 image tokens, <end_of_image>, text; sample 0 is 4 tokens shorter (left padding)
    assert grid(tm, "proj_pos", 0) == cells and grid(tm, "proj_pos", 1) == cells
    assert grid(tm, "llm_pos", 1) == (1 + np.array(cells)).tolist()
    assert grid(tm, "llm_pos", 0) == (5 + np.array(cells)).tolist()
    assert grid(tm, "vit_pos", 1) == ARANGE16.tolist() and grid(tm, "vit_item", 1) == [[1] * 4] * 4
    assert_tensors_follow_map(m, b)


# -- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------------------------
QWEN_LLM = [[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6], [4, 4, 5, 5, 6, 6]]
QWEN = {
    "tiny-qwen2-vl": dict(
        vit=[[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11], [12, 13, 16, 17, 20, 21], [14, 15, 18, 19, 22, 23]],
        proj=[[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]),
    "tiny-qwen2.5-vl": dict(   # window 0 = merged tokens 0,1,3,4; window 1 = merged tokens 2,5
        vit=[[0, 1, 4, 5, 16, 17], [2, 3, 6, 7, 18, 19], [8, 9, 12, 13, 20, 21], [10, 11, 14, 15, 22, 23]],
        proj=[[0, 0, 1, 1, 4, 4], [0, 0, 1, 1, 4, 4], [2, 2, 3, 3, 5, 5], [2, 2, 3, 3, 5, 5]]),
}


@pytest.mark.parametrize("name", list(QWEN))
def test_qwen_merged_grid_and_window_order(name):
    m = mechsink.load(name)
    ph = "<|vision_start|><|image_pad|><|vision_end|> what"
    b = m.prepare([img(24, 16), img(16, 16, 1)], [ph, ph])
    tm = b.token_map
    assert tm.grid(0, 0) == (4, 6) and tm.grid(1, 0) == (4, 4)
    assert grid(tm, "vit_pos") == QWEN[name]["vit"]
    assert grid(tm, "out_pos") == QWEN[name]["vit"]
    assert grid(tm, "proj_pos") == QWEN[name]["proj"]
    assert grid(tm, "llm_pos") == QWEN_LLM
    assert (tm.patches[["vit_item", "out_item", "proj_item"]] == -1).all().all()
    # the second image follows in the flat sequence; it is one window, and 2 tokens of left padding
    assert grid(tm, "vit_pos", 1) == [[24, 25, 28, 29], [26, 27, 30, 31], [32, 33, 36, 37], [34, 35, 38, 39]]
    assert grid(tm, "proj_pos", 1) == [[6, 6, 7, 7], [6, 6, 7, 7], [8, 8, 9, 9], [8, 8, 9, 9]]
    assert grid(tm, "llm_pos", 1) == [[3, 3, 4, 4], [3, 3, 4, 4], [5, 5, 6, 6], [5, 5, 6, 6]]
    tok = tm.llm_tokens[tm.llm_tokens["sample"] == 0]
    assert tok[["llm_pos", "row", "col"]].values.tolist() == [[1 + 3 * r + c, r, c] for r in range(2) for c in range(3)]
    assert_tensors_follow_map(m, b)


def test_qwen2_5_vit_positions_are_the_window_ordered_patch_embeddings():
    """vit.embed (block 0 input) holds patch (r, c) at vit_pos, while the patch embedding, in
    processor order, holds it at the index the processor gave it."""
    m = mechsink.load("tiny-qwen2.5-vl")
    b = m.prepare([img(24, 16)], ["<|vision_start|><|image_pad|><|vision_end|> what"])
    seen = {}
    h = m.module("model.visual.patch_embed").register_forward_hook(lambda mod, a, out: seen.update(x=out.clone()))
    try:
        got = m.run(b, read=["vit.embed"])["vit.embed"]
    finally:
        h.remove()
    for r in b.token_map.patches.itertuples():
        processor_index = ((r.row // 2) * 3 + r.col // 2) * 4 + (r.row % 2) * 2 + r.col % 2
        assert torch.equal(got[r.vit_pos], seen["x"][processor_index])


# -- vision encoders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, specials, first", [
    ("tiny-clip", ["cls"], 1), ("tiny-siglip", [], 0), ("tiny-dinov2", ["cls", "register", "register"], 3)])
def test_encoder_sequences(name, specials, first):
    m = mechsink.load(name)
    b = m.prepare([img(32, 32), [img(20, 20, 1), img(30, 30, 2)]])
    tm = b.token_map
    for s, i, item in [(0, 0, 0), (1, 0, 1), (1, 1, 2)]:
        assert grid(tm, "vit_pos", s, i) == (first + ARANGE16).tolist()
        assert grid(tm, "vit_item", s, i) == [[item] * 4] * 4
        assert grid(tm, "out_pos", s, i) == (first + ARANGE16).tolist()
        assert grid(tm, "llm_pos", s, i) == [[-1] * 4] * 4
        sp = tm.special[(tm.special["sample"] == s) & (tm.special["image"] == i)]
        assert sp["role"].tolist() == specials and sp["vit_pos"].tolist() == list(range(len(specials)))
    out = m.run(b, read=["vit.out"])["vit.out"]
    assert out.shape[:2] == (3, first + 16)
    assert tm.roles.shape == (2, 0)


# -- the map agrees with the tensors -------------------------------------------------------------------
def assert_tensors_follow_map(m, batch):
    """Projector rows land where llm_pos says, newlines carry image_newline, and the projector
    input rows are the ViT rows vit_pos names (at the layer the projector reads)."""
    cfg = m.hf.config
    n = m.n_vit_layers
    layer = n - 1 if not hasattr(cfg, "vision_feature_layer") else cfg.vision_feature_layer % (n + 1) - 1
    got = m.run(batch, read=["vit.out", "proj.out", "llm.embed", f"vit.blocks.{layer}.hook_resid_post"])
    tm = batch.token_map
    vit = got[f"vit.blocks.{layer}.hook_resid_post"]
    if m.adapter.family == "gemma3":   # its projector reads the ViT output after the final LayerNorm
        vit = m.module("model.vision_tower.post_layernorm")(vit)
    assert got["proj.out"].abs().sum() > 0
    pooled = set(map(tuple, tm.llm_tokens.loc[tm.llm_tokens["tile"] == -1, ["sample", "llm_pos"]].values.tolist()))
    for r in tm.patches.itertuples():
        flat = r.vit_item < 0
        v = vit[r.vit_pos] if flat else vit[r.vit_item, r.vit_pos]
        o = got["vit.out"][r.out_pos] if flat else got["vit.out"][r.out_item, r.out_pos]
        assert torch.equal(v, o)
        if r.llm_pos >= 0 and (r.sample, r.llm_pos) not in pooled:
            p = got["proj.out"][r.proj_pos] if flat else got["proj.out"][r.proj_item, r.proj_pos]
            assert torch.equal(got["llm.embed"][r.sample, r.llm_pos], p)
    for r in tm.llm_tokens[tm.llm_tokens["role"] == "newline"].itertuples():
        assert torch.equal(got["llm.embed"][r.sample, r.llm_pos], m.module("model").image_newline)
    image = tm.role_mask("image", "newline")
    assert image.sum() == len(tm.llm_tokens)
