"""Attention received by visual tokens: planted LLM attends to its sinks, the null twin does not."""
import numpy as np
import pytest

import mechsink
from mechsink import testing
from mechsink.sinks import SinkError, detect, llm_attention, norm_bins, sink_ratio, vit_attention
from mechsink.sinks.attention import llm_query_mask
from mechsink.zoo import planted

N_IMAGES = 12


@pytest.fixture(scope="module")
def images():
    return planted.load_eval(limit=N_IMAGES)[0]


def run_llm(name, images, **kw):
    m = mechsink.load(name)
    b = m.prepare(images, prompts=[planted.PROMPT] * len(images))
    sinks = detect(m, b)
    return m, b, sinks, llm_attention(m, b, sinks, **kw)


@pytest.fixture(scope="module")
def planted_att(images):
    return run_llm("planted-llava", images, queries=("last",))


@pytest.fixture(scope="module")
def null_att(images):
    return run_llm("planted-llava-null", images, queries=("last",))


def test_planted_last_token_attends_to_the_sinks(planted_att):
    m, b, sinks, att = planted_att
    assert set(att.columns) >= {"part", "layer", "head", "sample", "llm_pos", "norm", "is_sink", "attn"}
    assert len(att) == m.n_llm_layers * 1 * N_IMAGES * 36          # one head
    r = sink_ratio(att).set_index("layer")
    assert r.loc[0, "n_images"] == N_IMAGES
    # layer 0: logit 25 on each of 3 sinks, 0 elsewhere -> each sink gets ~1/3
    assert r.loc[0, "sink_mean"] == pytest.approx(1 / 3, rel=1e-4)
    assert r.loc[0, "ratio"] > 1e6 and r.loc[0, "ci_low"] > 1
    # layer 1 has zero queries: uniform causal attention, ratio 1
    assert r.loc[1, "ratio"] == pytest.approx(1.0, rel=1e-5)


def test_null_twin_ratio_ci_contains_one(null_att):
    _, _, _, att = null_att
    r = sink_ratio(att)
    assert (r["ci_low"] <= 1 + 1e-6).all() and (r["ci_high"] >= 1 - 1e-6).all()
    assert r["ratio"].tolist() == pytest.approx([1.0, 1.0], rel=1e-5)


def test_text_queries_after_the_image_only(planted_att):
    m, b, sinks, _ = planted_att
    roles = b.token_map.roles
    keys = sinks.llm_tokens()
    key_pos = {int(s): g["llm_pos"].to_numpy() for s, g in keys.groupby("sample")}
    mask = llm_query_mask(roles, b.last_pos.tolist(), key_pos, ("text",))
    for s in range(b.size):
        q = np.flatnonzero(mask[s])
        assert q.min() > key_pos[s].max() and (roles[s, q] == 1).all()
        assert b.last_pos[s].item() in q
    # the BOS-like text token before the image is never a query
    assert not mask[:, 0].any()
    att = llm_attention(m, b, sinks, queries=("text",), layers=[0])
    assert sink_ratio(att)["ratio"].item() > 1e6
    with pytest.raises(SinkError, match="unknown query roles"):
        llm_attention(m, b, sinks, queries=("image",))
    with pytest.raises(SinkError, match="no answer query"):
        llm_attention(m, b, sinks, queries=("answer",))


def test_norm_bins_fixed_edges_and_quantiles(planted_att):
    _, _, _, att = planted_att
    nb = norm_bins(att, bins=[0, 50, 1000])
    l0 = nb[nb["layer"] == 0].set_index("bin_high")
    assert l0.loc[50.0, "n_tokens"] == 33 * N_IMAGES and l0.loc[1000.0, "n_tokens"] == 3 * N_IMAGES
    assert l0.loc[1000.0, "sink_frac"] == 1.0 and l0.loc[50.0, "sink_frac"] == 0.0
    assert l0.loc[1000.0, "attn_mean"] == pytest.approx(1 / 3, rel=1e-4)
    q = norm_bins(att, bins=4)
    assert q.groupby("layer")["n_tokens"].sum().tolist() == [36 * N_IMAGES] * 2
    assert (q.groupby("layer")["bin_low"].apply(lambda x: x.is_monotonic_increasing)).all()


def test_vit_received_attention_known_answer(planted_att):
    """Planted ViT layer 0: sink queries attend to patch 0, every other query (CLS included) to
    itself, so over 37 queries patch 0 receives 3/37, the other sinks ~0 and every patch 1/37."""
    m, b, sinks, _ = planted_att
    va = vit_attention(m, b, sinks, layers=[0])
    a = va[va["sample"] == 0].set_index("patch")["attn"]
    assert a[0] == pytest.approx(3 / 37, abs=1e-6)
    assert a[14] < 1e-6 and a[21] < 1e-6
    assert a.drop([0, 14, 21]).to_numpy() == pytest.approx(1 / 37, abs=1e-6)
    only_patches = vit_attention(m, b, sinks, layers=[0], queries="patch")
    assert only_patches[only_patches["sample"] == 0].set_index("patch")["attn"][0] == pytest.approx(3 / 36, abs=1e-6)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-llava-next"])
def test_vit_attention_rows_sum_to_one_per_tile(name):
    """Every query's attention sums to 1 over its own tile's tokens, so received attention summed
    over a tile's patches (plus its special tokens) is 1: checks the index bookkeeping on flat
    (Qwen2-VL) and tiled (LLaVA-NeXT) ViTs."""
    m = testing.build(name)
    b = m.prepare([testing.test_image(64), testing.test_image(48, seed=3).resize((40, 64))])
    sinks = detect(m, b)
    va = vit_attention(m, b, sinks, layers=[0], queries="patch")
    per_tile = va.groupby(["head", "sample", "image", "tile"])["attn"].sum()
    if len(sinks.special) == 0:
        assert per_tile.to_numpy() == pytest.approx(1.0, abs=1e-5)
    else:   # the rest went to the tile's CLS token (position 0 of its ViT item)
        pattern = m.run(b, read=["vit.blocks.0.attn.hook_pattern"])["vit.blocks.0.attn.hook_pattern"]
        for (h, s, i, t), total in per_tile.items():
            item = int(sinks.special.query("sample == @s and image == @i and tile == @t")["vit_item"].iloc[0])
            to_cls = pattern[item, h, 1:, 0].mean().item()
            assert total + to_cls == pytest.approx(1.0, abs=1e-5)
    la = llm_attention(m, b, sinks, per_head=False)
    assert (la["head"] == -1).all() and la["attn"].between(0, 1).all()
    assert len(la) == len(sinks.llm_tokens().query("role == 'image'")) * m.n_llm_layers


def test_attention_stats_over_a_dataset_counts_images_not_questions(images, tmp_path):
    """Two questions of each image: the ratio is over the 4 images (the unit), and equals the ratio
    of the images asked once; the frame is what llm_attention gives batch by batch."""
    import pandas as pd

    from mechsink.data import open_dataset
    from mechsink.sinks import AttentionConfig, SinkSpec, attention_stats
    rows = []
    for i, im in enumerate(images[:4]):
        im.save(tmp_path / f"{i}.png")
        rows += [{"id": f"{i}-{q}", "image": f"{i}.png", "question": planted.PROMPT} for q in range(2)]
    (tmp_path / "twice.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    (tmp_path / "once.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows[::2]))
    m = mechsink.load("planted-llava")
    cfg = AttentionConfig(queries=("last",), batch_size=3, n_boot=200)
    twice = attention_stats(m, open_dataset(tmp_path / "twice.jsonl"), SinkSpec(), cfg)
    once = attention_stats(m, open_dataset(tmp_path / "once.jsonl"), SinkSpec(), cfg)
    r2, r1 = twice.ratio(), once.ratio()
    assert (r2["n_images"] == 4).all() and (r1["n_images"] == 4).all()
    assert np.allclose(r2["ratio"], r1["ratio"]) and r2["ratio"].iloc[0] > 1e3      # layer 0 reads the sinks
    s = twice.summary()
    assert (s["n_images"], s["n_questions"]) == (4, 8)
    b = m.prepare([images[0], images[0], images[1]], prompts=[planted.PROMPT] * 3)      # the first batch
    direct = llm_attention(m, b, SinkSpec(), queries=("last",), per_head=False)
    got = twice.frame[twice.frame["sample"] < 3].drop(columns="image_key").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[direct.columns], direct[direct["sample"].isin([0, 1, 2])].reset_index(drop=True),
                                  check_dtype=False)
