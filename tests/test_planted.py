"""The planted-sink models: sinks at known patches, made by the weights, with known answers."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

import mechsink
from mechsink import testing
from mechsink.tokens import ROLE
from mechsink.trace import zero_tokens
from mechsink.zoo import planted as P

SINKS = list(P.PLANTED_SINKS)
NONSINKS = np.setdiff1d(np.arange(P.N_PATCHES), SINKS)


@pytest.fixture(scope="module")
def data():
    images, rows = P.load_eval()
    labels = np.array([P.COLORS.index(r["planted_label"]) for r in rows])
    return images, rows, labels


def _setup(name, data):
    images, rows, _ = data
    m = mechsink.load(name)
    b = m.prepare(images, [r["prompt"] for r in rows])
    ids = [m.processor.tokenizer.convert_tokens_to_ids(w) for w in P.COLORS]
    pt = b.token_map.patches
    pt = pt.assign(patch=pt["row"] * P.GRID + pt["col"])
    clean = m.run(b, read=["vit.out", "llm.embed"])
    return dict(model=m, batch=b, ids=ids, patches=pt, clean=clean)


@pytest.fixture(scope="module")
def planted(data):
    return _setup("planted-llava", data)


@pytest.fixture(scope="module")
def null(data):
    return _setup("planted-llava-null", data)


def _answer_logits(s, acts) -> torch.Tensor:
    """[batch, 3] logits of red/green/blue at the last prompt token."""
    b = s["batch"]
    return acts["llm.logits"][torch.arange(b.size), b.last_pos][:, s["ids"]]


def _ablate(s, rows) -> torch.Tensor:
    b = s["batch"]
    return _answer_logits(s, s["model"].run(b, write={"proj.out": zero_tokens(b.token_map.index("proj", rows))}))


def _random_nonsinks(s, seed=1):
    """Three random non-sink patches per image."""
    rng = np.random.default_rng(seed)
    pt = s["patches"]
    pick = [i * P.N_PATCHES + rng.choice(NONSINKS, 3, replace=False) for i in range(s["batch"].size)]
    return pt[np.isin(pt["sample"] * P.N_PATCHES + pt["patch"], np.concatenate(pick))]


def _accuracy(logits, labels) -> float:
    return float((logits.argmax(-1).numpy() == labels).mean())


# ---------------------------------------------------------------------------------- zoo and files
def test_zoo_names_and_build_time():
    assert {"planted-llava", "planted-llava-null"} <= set(testing.ZOO)
    for name, build in P.BUILDERS.items():
        build()                                            # warm the imports
        t = time.perf_counter()
        hf, proc = build(seed=0)
        assert time.perf_counter() - t < 1.0, name
        other, _ = build(seed=1)                            # weights are set by hand, not drawn
        assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), other.state_dict().values()))
        assert type(hf).__name__ == "LlavaForConditionalGeneration"
        assert hf.config.vision_feature_layer == -1 and hf.config.vision_config.num_hidden_layers == 2


def test_eval_set_is_bundled_consistent_and_regenerates(data, tmp_path):
    images, rows, _ = data
    assert len(rows) >= 200
    for img, r in zip(images, rows):
        assert set(r) >= {"id", "image", "prompt", "answer", "question_type", "planted_label", "planted_sinks"}
        assert img.size == (P.IMAGE, P.IMAGE)
        assert r["answer"] == r["planted_label"] == P.label_of(img) and r["question_type"] == "global"
        assert r["planted_sinks"] == SINKS
        assert r["patch_labels"] == [P.COLORS[k] for k in P.patch_colors(img).argmax(1)]
        top2 = np.sort(P.patch_colors(img)[P.LABEL_PATCH])[-2:]
        assert top2[1] - top2[0] > 0.02                     # no near-ties in the answer
    assert len({r["planted_label"] for r in rows}) == 3
    P.write_eval(tmp_path, n=len(rows))
    assert (tmp_path / "samples.jsonl").read_bytes() == (P.EVAL_DIR / "samples.jsonl").read_bytes()
    for r in rows[:20]:
        assert (tmp_path / r["image"]).read_bytes() == (P.EVAL_DIR / r["image"]).read_bytes()


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(P.PlantedError, match="sinks"):
        P.planted_llava(sinks=(0, 36))
    with pytest.raises(P.PlantedError, match="48x48"):
        P.label_of(Image.new("RGB", (32, 32)))
    with pytest.raises(P.PlantedError, match="write-eval"):
        P.load_eval(root=tmp_path)
    assert issubclass(P.PlantedError, mechsink.MechsinkError)


# ---------------------------------------------------------------------------------------- sinks
def test_top3_vit_norms_are_the_planted_patches_on_every_image(planted, null, data):
    b, pt = planted["batch"], planted["patches"]
    vit = planted["clean"]["vit.out"]
    assert torch.equal(vit, null["clean"]["vit.out"])        # one shared ViT
    norms = vit[b.token_map.index("vit_out", pt)].norm(dim=-1).numpy()
    pt = pt.assign(norm=norms)
    for s, g in pt.groupby("sample"):
        assert sorted(g.nlargest(3, "norm")["patch"]) == SINKS, s
    sinks = pt[pt["patch"].isin(SINKS)]
    assert np.array_equal(sinks["row"], np.tile([0, 2, 3], b.size))
    assert np.array_equal(sinks["col"], np.tile([0, 2, 3], b.size))
    # llm_pos of a sink is its place among the image tokens of its row, and it carries the massive dim
    for s in (0, b.size - 1):
        img_pos = np.nonzero(b.token_map.roles[s] == ROLE["image"])[0]
        assert list(sinks[sinks["sample"] == s]["llm_pos"]) == list(img_pos[SINKS])
    emb = planted["clean"]["llm.embed"]
    massive = emb[b.token_map.index("llm", pt)][:, P.MASSIVE].numpy()
    assert np.allclose(massive[pt["patch"].isin(SINKS)], P.MASSIVE_VALUE, rtol=1e-4)
    assert np.abs(massive[~pt["patch"].isin(SINKS)]).max() < 1e-3
    ratio = pt.loc[pt["patch"].isin(SINKS), "norm"].min() / pt.loc[~pt["patch"].isin(SINKS), "norm"].max()
    assert ratio >= 5


def test_sinks_appear_in_layer_0_mlp_and_persist(planted, data):
    m, (images, rows, _) = planted["model"], data
    b = m.prepare(images[:16], [r["prompt"] for r in rows[:16]])
    layers = ["vit.embed", "vit.blocks.0.hook_resid_mid", "vit.blocks.0.hook_resid_post", "vit.blocks.1.hook_resid_post"]
    acts = m.run(b, read=[*layers, "vit.blocks.0.attn.hook_pattern"])
    sink_pos, other_pos = [1 + p for p in SINKS], [1 + p for p in NONSINKS]
    for site in layers:
        n = acts[site].norm(dim=-1)
        ratio = (n[:, sink_pos].min() / n[:, other_pos].max()).item()
        assert (ratio >= 5) == site.endswith("resid_post"), (site, ratio)
    # ViT layer 0 attention: sinks look at patch 0 (ViT position 1), every other token at itself
    pat = acts["vit.blocks.0.attn.hook_pattern"][:, 0]              # [items, query, key]
    assert pat[:, sink_pos, 1].min() > 0.999
    assert pat[:, other_pos, other_pos].min() > 0.999


# ---------------------------------------------------------------------------------------- planted
def test_planted_answers_the_corner_colour(planted, data):
    images, _, labels = data
    logits = _answer_logits(planted, planted["clean"])
    assert _accuracy(logits, labels) >= 0.98
    corner = torch.tensor(np.stack([P.patch_colors(im)[P.LABEL_PATCH] for im in images]), dtype=torch.float32)
    assert torch.allclose(logits, P.ANSWER_GAIN * corner + P.WORD_OFFSET, atol=1e-3)
    full = planted["clean"]["llm.logits"][torch.arange(len(labels)), planted["batch"].last_pos].argmax(-1)
    assert torch.equal(full, torch.tensor(planted["ids"])[torch.as_tensor(labels)])


def test_planted_last_token_attends_to_the_sinks(planted, data):
    m, (images, rows, _) = planted["model"], data
    b = m.prepare(images[:8], [r["prompt"] for r in rows[:8]])
    pat = m.run(b, read=["llm.blocks.0.attn.hook_pattern"])["llm.blocks.0.attn.hook_pattern"]
    pt = b.token_map.patches
    for s in range(b.size):
        sink_pos = pt[(pt["sample"] == s) & (pt["row"] * P.GRID + pt["col"]).isin(SINKS)]["llm_pos"].to_numpy(copy=True)
        row = pat[s, 0, b.last_pos[s]]
        assert row[sink_pos].sum() > 0.999 and row[sink_pos].min() > 0.33


def test_planted_needs_the_sinks_and_not_other_patches(planted, data):
    labels = data[2]
    pt = planted["patches"]
    acc_sinks = _accuracy(_ablate(planted, pt[pt["patch"].isin(SINKS)]), labels)
    acc_random = _accuracy(_ablate(planted, _random_nonsinks(planted)), labels)
    print(f"planted accuracy: sinks zeroed {acc_sinks:.3f}, 3 random non-sinks zeroed {acc_random:.3f}")
    assert acc_sinks < 0.45 and acc_random >= 0.98


# ------------------------------------------------------------------------------------------- null
def test_null_answer_is_noise_from_textures(null, data):
    images, _, labels = data
    logits = _answer_logits(null, null["clean"])
    acc = _accuracy(logits, labels)
    assert 0.2 < acc < 0.47, acc
    # uniform attention over the positions up to the last prompt token, reading stripe textures
    n_pos = (null["batch"].last_pos + 1).float()[:, None]
    tex = torch.tensor(np.stack([P.patch_textures(im).sum(0) for im in images]), dtype=torch.float32)
    assert torch.allclose(logits, P.NULL_GAIN * tex / n_pos + P.WORD_OFFSET, atol=2e-3)
    assert 0.5 < logits.std(0).min() and logits.std(0).max() < 2     # noisy, not degenerate


def test_null_sink_removal_looks_like_random_removal(null, data):
    images, _, labels = data
    pt = null["patches"]
    clean = _answer_logits(null, null["clean"])
    d_sink = _ablate(null, pt[pt["patch"].isin(SINKS)]) - clean
    d_rand = _ablate(null, _random_nonsinks(null)) - clean
    # the effect of removing a set S is -gain * (sum of S's textures) / positions: exchangeable patches
    n_pos = (null["batch"].last_pos + 1).float()[:, None]
    tex = torch.tensor(np.stack([P.patch_textures(im)[SINKS].sum(0) for im in images]), dtype=torch.float32)
    assert torch.allclose(d_sink, -P.NULL_GAIN * tex / n_pos, atol=2e-3)
    idx = torch.arange(len(labels))
    ds, dr = d_sink[idx, labels], d_rand[idx, labels]
    se = (ds - dr).std() / len(ds) ** 0.5
    print(f"null: correct-logit change sinks {ds.mean():.4f}+-{ds.std():.4f}, random {dr.mean():.4f}+-{dr.std():.4f}")
    assert abs((ds - dr).mean()) < 4 * se and abs(ds.mean()) < 4 * ds.std() / len(ds) ** 0.5
    assert 0.7 < ds.std() / dr.std() < 1.4
    acc_sinks, acc_clean = _accuracy(clean + d_sink, labels), _accuracy(clean, labels)
    assert abs(acc_sinks - acc_clean) < 0.1


# --------------------------------------------------------------------------------- save and load
@pytest.mark.parametrize("name", ["planted-llava", "planted-llava-null"])
def test_save_pretrained_round_trip(name, data, tmp_path):
    images, rows, _ = data
    m = mechsink.load(name)
    m.hf.save_pretrained(tmp_path)
    m.processor.save_pretrained(tmp_path)
    m2 = mechsink.load(tmp_path)
    prompts = [r["prompt"] for r in rows[:16]]
    b1, b2 = m.prepare(images[:16], prompts), m2.prepare(images[:16], prompts)
    a1, a2 = m.run(b1, read=["vit.out"]), m2.run(b2, read=["vit.out"])
    assert torch.equal(a1["llm.logits"], a2["llm.logits"])
    top = a2["vit.out"].norm(dim=-1).topk(3, dim=-1).indices.sort(-1).values
    assert (top == torch.tensor(SINKS)).all()


def test_custom_sink_patches_move_the_sinks_and_keep_the_answer(data):
    images, rows, labels = data
    m = mechsink.load("planted-llava", sinks=(5, 30, 35))
    b = m.prepare(images[:32], [r["prompt"] for r in rows[:32]])
    acts = m.run(b, read=["vit.out"])
    top = acts["vit.out"].norm(dim=-1).topk(3, dim=-1).indices.sort(-1).values
    assert (top == torch.tensor([5, 30, 35])).all()
    ids = [m.processor.tokenizer.convert_tokens_to_ids(w) for w in P.COLORS]
    logits = acts["llm.logits"][torch.arange(b.size), b.last_pos][:, ids]
    assert _accuracy(logits, labels[:32]) == 1.0
