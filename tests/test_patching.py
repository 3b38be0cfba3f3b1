"""Activation patching: identities, known answers on the planted model, and agreement with
TransformerLens's own patching utilities on a TransformerBridge of the same model."""
import copy
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

import mechsink
from mechsink.metrics import Metric
from mechsink.engine import Plan, Write, clean, execute
from mechsink.patching import PatchConfig, PatchError, PatchResult, PathPatchConfig, SweepConfig, block_sites, patch
from mechsink.report.figures import patch_heatmap
from mechsink.sweep import path_patch, sweep
from mechsink.testing import test_image as make_image
from mechsink.zoo import planted as P

SINKS = P.PLANTED_SINKS
LD = Metric("logit_diff", answers=P.COLORS)




@pytest.fixture(scope="module")
def planted():
    images, rows = P.load_eval(16)
    m = mechsink.load("planted-llava")
    prompts = [r["prompt"] for r in rows[:8]]
    base = m.prepare(images[:8], prompts, answers=[r["answer"] for r in rows[:8]])
    source = m.prepare(images[8:16], prompts, answers=[r["answer"] for r in rows[8:16]])
    return m, base, source


@pytest.fixture(scope="module")
def tiny():
    m = mechsink.load("tiny-llava")
    prompts = ["is there a cat ?", "what color is the cat in this picture ?", "is there a dog ?"]
    base = m.prepare([make_image(seed=i) for i in range(3)], prompts, answers=["yes", "no", "yes"])
    source = m.prepare([make_image(seed=10 + i) for i in range(3)], prompts, answers=["yes", "no", "yes"])
    return m, base, source


ALL_SITES = ("vit.embed", "vit.blocks.1.hook_resid_mid", "vit.out", "proj.out", "llm.embed",
             "llm.blocks.0.hook_attn_out", "llm.blocks.1.hook_resid_post")


def test_patching_base_with_itself_or_an_identical_source_changes_nothing(tiny):
    m, base, _ = tiny
    twin = m.prepare(base.images, ["is there a cat ?", "what color is the cat in this picture ?", "is there a dog ?"],
                     answers=["yes", "no", "yes"])
    for source, metric in ((base, "logprob"), (twin, "kl")):
        res = patch(m, base, source, PatchConfig(sites=ALL_SITES, selections=("sinks", "random", "image"),
                                                 metric=metric, n_draws=2), sinks=(0, 5))
        f = res.frame
        assert len(f) == len(ALL_SITES) * 4 * 3
        assert np.abs(f["patched"] - f["base"]).max() < 1e-6
        assert np.abs(f["source"] - f["base"]).max() < 1e-6
        assert f["recovery"].isna().all()                        # nothing to recover


def test_patching_every_image_token_at_proj_out_reproduces_the_source(tiny):
    m, base, source = tiny
    metric = Metric("logprob")
    b0 = clean(m, base, metric, read=["proj.out"])
    src = m.run(source, read=["proj.out"])
    everything = np.ones((1, len(base.token_map.patches)), dtype=bool)
    w = Write("proj.out", base.token_map.mask("proj", everything, tuple(b0["proj.out"].shape[:-1])), src["proj.out"])
    out = execute(m, base, Plan(1, [w]), metric, b0["targets"], inputs=b0["inputs"], want_next=True)
    src_next = src["llm.logits"][torch.arange(3), base.last_pos]
    assert torch.allclose(out["next"][0], src_next, atol=1e-5)
    assert not torch.allclose(b0["next"], src_next, atol=1e-3)
    res = patch(m, base, source, PatchConfig(sites=("proj.out", "vit.out", "llm.embed"), selections=("image",)), sinks=(0,))
    f = res.frame
    assert np.allclose(f["patched"], f["source"], atol=1e-5)


def test_planted_sinks_carry_the_answer(planted):
    m, base, source = planted
    res = patch(m, base, source, PatchConfig(sites=("vit.blocks.0.hook_resid_post", "proj.out",
                                                    "llm.blocks.0.hook_resid_pre", "llm.blocks.1.hook_resid_pre"),
                                             metric=LD, n_draws=4), sinks=SINKS)
    t = res.table()
    assert np.allclose(t.loc[["vit.blocks.0.hook_resid_post", "proj.out", "llm.blocks.0.hook_resid_pre"], "sinks"], 1.0, atol=1e-4)
    assert np.allclose(t["random"], 0.0, atol=1e-4)
    assert np.allclose(t.loc["llm.blocks.1.hook_resid_pre"], 0.0, atol=1e-4)   # the answer was read at layer 0
    assert set(res.frame["n_tokens"]) == {3, 36}
    fig = patch_heatmap(res)
    assert fig.axes


def test_sweep_tables_and_heatmaps(planted):
    m, base, source = planted
    sw = sweep(m, base, source, block_sites(m, "llm"), positions="all", metric=LD)
    t = sw.table()
    last = int(base.last_pos[0])
    assert t.shape == (2, base.inputs["input_ids"].shape[1])
    assert abs(t.loc["llm.blocks.1.hook_resid_pre", last] - 1.0) < 1e-4       # layer 1 is a no-op
    assert np.allclose(t.loc["llm.blocks.1.hook_resid_pre"].drop(last), 0.0, atol=1e-4)
    per_patch = sweep(m, base, source, ["proj.out", "vit.blocks.0.hook_resid_pre"], positions="patches", metric=LD)
    t = per_patch.table("effect")
    assert list(t.columns) == list(range(P.N_PATCHES))
    moved = set(np.nonzero(np.abs(t.loc["proj.out"].to_numpy()) > 1e-6)[0])
    assert moved == set(SINKS)                                   # only the sinks matter to the LLM
    assert abs(t.loc["vit.blocks.0.hook_resid_pre", P.LABEL_PATCH]) > 0.5     # the ViT copies the corner into them
    sets = sweep(m, base, source, block_sites(m, "llm"), positions=["sinks", "random"], sinks=SINKS, metric=LD)
    assert sets.table().loc["llm.blocks.0.hook_resid_pre", "sinks"] == pytest.approx(1.0, abs=1e-4)
    assert patch_heatmap(sets).axes


def test_path_patching_reaches_only_the_chosen_layers(planted, tiny):
    m, base, source = planted
    pp = path_patch(m, base, source, [0, 1, [0, 1]], sinks=SINKS, metric=LD)
    t = pp.table()
    assert t.loc["llm.layers.0", "sinks"] == pytest.approx(1.0, abs=1e-4)
    assert t.loc["llm.layers.1", "sinks"] == pytest.approx(0.0, abs=1e-4)
    assert t.loc["llm.layers.0+1", "image"] == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(t["random"], 0.0, atol=1e-4)
    # image tokens see only the (shared) text before them, so their source stream at every layer is
    # what direct patching at the LLM input produces: path patching into all layers must equal it
    m2, b2, s2 = tiny
    every = path_patch(m2, b2, s2, [[0, 1], [1]], sinks=(0,), selections=("image",))
    direct = patch(m2, b2, s2, PatchConfig(sites=("llm.embed",), selections=("image",)), sinks=(0,))
    both = every.frame[every.frame["site"] == "llm.layers.0+1"]
    assert np.allclose(both["patched"], direct.frame["patched"], atol=1e-5)
    late = every.frame[every.frame["site"] == "llm.layers.1"]
    assert np.abs(late["patched"].to_numpy() - both["patched"].to_numpy()).max() > 1e-5


def test_mismatched_pairs_and_bad_options_fail_clearly(tiny):
    m, base, _ = tiny
    other = m.prepare([make_image(seed=4)] * 3, ["is there a cat ?"] * 3, answers=["yes"] * 3)
    with pytest.raises(PatchError, match="same prompts"):
        patch(m, base, other, sinks=(0,))
    with pytest.raises(PatchError, match="token selection"):
        PatchConfig(selections=("corners",))
    with pytest.raises(PatchError, match="image patches"):
        PatchConfig(selections=("sinks", "cls"))
    with pytest.raises(PatchError, match="positions must lie"):
        sweep(m, base, base, ["llm.blocks.0.hook_resid_pre"], positions=[999])
    with pytest.raises(mechsink.MechsinkError, match="unknown site"):
        PatchConfig(sites=("llm.block.0",))


# -- TransformerLens ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bridge_cls():
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers import helpers
    original = helpers._ensure_torchvision
    helpers._ensure_torchvision = lambda: False      # never pip install torchvision
    yield TransformerBridge
    helpers._ensure_torchvision = original
    assert importlib.util.find_spec("torchvision") is None


class _WithImages:
    """A bridge whose runs always see the base images (TransformerLens patches token inputs)."""
    def __init__(self, bridge, **inputs):
        self._bridge, self._inputs = bridge, inputs

    def __getattr__(self, name):
        return getattr(self._bridge, name)

    def run_with_hooks(self, tokens, fwd_hooks=(), **kw):
        return self._bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **self._inputs, **kw)


def test_exact_patching_equals_transformer_lens(tiny, bridge_cls):
    from transformer_lens import patching as tlp
    m = tiny[0]
    prompts = ["is there a cat ?", "is there a cat in this picture ?"]          # one row left-padded
    base = m.prepare([make_image(seed=1), make_image(seed=2)], prompts, answers=["yes", "no"])
    source = m.prepare([make_image(seed=11), make_image(seed=12)], prompts, answers=["yes", "no"])
    hf = copy.deepcopy(m.hf)
    hf.config.architectures = [type(hf).__name__]
    tok = copy.deepcopy(m.processor.tokenizer)
    tok.init_kwargs.update(name_or_path="tiny-llava", add_bos_token=True)      # keeps the bridge off the hub
    br = bridge_cls.boot_transformers("tiny-llava", hf_model=hf, tokenizer=tok, device="cpu")
    am = base.inputs["attention_mask"]
    _, clean_cache = br.run_with_cache(source.inputs["input_ids"], pixel_values=source.inputs["pixel_values"], attention_mask=am)
    model = _WithImages(br, pixel_values=base.inputs["pixel_values"], attention_mask=am)
    metric = Metric("logprob")
    t = metric.targets(m, base)

    def tl_metric(logits):
        lp = torch.log_softmax(logits[torch.arange(base.size), t.pos].float(), -1)
        return lp[torch.arange(base.size), t.ids[:, 0]]

    theirs = tlp.get_act_patch_block_every(model, base.inputs["input_ids"], clean_cache, tl_metric, reduce="none")
    values = theirs.values                                         # [patch type, layer, pos, batch]
    hooks = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
    sites = [f"llm.blocks.{l}.{h}" for h in hooks for l in range(m.n_llm_layers)]
    ours = sweep(m, base, source, sites, positions="all", metric=metric).frame
    n_pos = base.inputs["input_ids"].shape[1]
    assert values.shape == (3, m.n_llm_layers, n_pos, base.size)
    got = torch.tensor(ours["patched"].to_numpy()).reshape(3, m.n_llm_layers, n_pos, base.size)
    real = am.bool()[None, None].expand(3, m.n_llm_layers, -1, -1).permute(0, 1, 3, 2)     # pads are not compared
    assert float((got - values.double()).abs()[real].max()) <= 1e-5
    assert float((values[real] - values[real].mean()).abs().max()) > 1e-3                 # the sweep is not flat


def test_patch_dataset_and_command_on_the_planted_eval_set(tmp_path):
    import json
    from typer.testing import CliRunner
    from mechsink.cli import app
    from mechsink.data import open_dataset
    from mechsink.patching import patch_dataset
    from mechsink.sources import corrupt
    m = mechsink.load("planted-llava")
    data = open_dataset(P.EVAL_DIR / "samples.jsonl", limit=8)
    cfg = PatchConfig(sites=("proj.out", "llm.blocks.1.hook_resid_pre"), metric=Metric("logit_diff", answers=P.COLORS),
                      n_draws=2, batch_size=4)
    res = patch_dataset(m, data, cfg, sinks=SINKS, out=tmp_path / "p")
    d = res.to_dict()
    json.dumps(d)
    assert d["n"] == 8 and d["unit"] == "tokens" and d["source"] == "shuffle"
    assert d["recovery"]["proj.out"]["sinks"] == pytest.approx(1.0, abs=1e-4)
    assert d["recovery"]["proj.out"]["random"] == pytest.approx(0.0, abs=1e-4)
    assert (tmp_path / "p" / "frame.parquet").exists()
    assert sorted(res.frame["sample"].unique()) == list(range(8)) and set(res.frame["id"]) == {s.id for s in data}
    pd.testing.assert_frame_equal(PatchResult.load(tmp_path / "p").frame, res.frame)
    # a source dataset paired by position: the same images give nothing to recover
    same = patch_dataset(m, data, cfg, source=data, sinks=SINKS)
    assert np.abs(same.frame["patched"] - same.frame["base"]).max() < 1e-6
    out = CliRunner().invoke(app, ["patch", "--model", "planted-llava", "--data", str(P.EVAL_DIR / "samples.jsonl"),
                                   "--limit", "4", "--corruption", "blank", "--sites", "proj.out", "--metric", "logprob",
                                   "--sweep", "patches", "--rule", "llava-1.5", "--batch-size", "4", "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    moved = {int(u) for u, v in d["effect"]["proj.out"].items() if abs(v) > 1e-6}
    assert d["unit"] == "patch" and moved == set(SINKS)
    out = CliRunner().invoke(app, ["patch", "--model", "planted-llava", "--data", str(P.EVAL_DIR / "samples.jsonl"),
                                   "--limit", "4", "--sites", "llm.blocks.*.hook_resid_pre", "--tokens", "sinks,random(match=border)",
                                   "--metric", "logit_diff", "--answers", ",".join(P.COLORS), "--draws", "2",
                                   "--rule", "llava-1.5", "--batch-size", "4", "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert list(d["recovery"]) == ["llm.blocks.0.hook_resid_pre", "llm.blocks.1.hook_resid_pre"]
    assert d["recovery"]["llm.blocks.0.hook_resid_pre"]["sinks"] == pytest.approx(1.0, abs=1e-4)
    assert d["recovery"]["llm.blocks.0.hook_resid_pre"]["random(match=border)"] == pytest.approx(0.0, abs=1e-4)
    images = [make_image(seed=i) for i in range(3)]
    shuffled = corrupt(images, "shuffle", seed=1)
    assert all(a is not b for a, b in zip(images, shuffled)) and {id(x) for x in shuffled} == {id(x) for x in images}
    assert corrupt(images, "noise")[0].size == images[0].size
    with pytest.raises(PatchError, match="corruption"):
        corrupt(images, "blur")


def test_configs_roundtrip_through_json_and_results_reload(tiny, tmp_path):
    configs = [PatchConfig(sites=("proj.out", "llm.blocks.0.hook_resid_pre"), selections=("sinks", "random(k=2, match=row)"),
                           metric=Metric("logit_diff", answers=("yes", "no")), n_draws=3, sinks_of="base"),
               PatchConfig(positions=(1, 4)), SweepConfig(), SweepConfig(positions=["sinks", "image"]),
               SweepConfig(sites=("vit.out",), positions="all", metric="kl"),
               PathPatchConfig(layers=[0, [0, 1]], selections="sinks,random", n_draws=2),
               PathPatchConfig()]
    for cfg in configs:
        back = type(cfg).from_json(cfg.to_json())
        assert back == cfg and back.fingerprint() == cfg.fingerprint(), cfg
    assert SweepConfig(positions=["sinks", "image"]).unit == "tokens" and SweepConfig().unit == "patch"
    assert PatchConfig(positions="all").unit == "position" and configs[5].layers == ((0,), (0, 1))
    with pytest.raises(mechsink.MechsinkError, match="no setting"):
        PatchConfig.from_dict({"tokens": ["sinks"]})
    m, base, source = tiny
    runs = [patch(m, base, source, configs[0], sinks=(0, 5)),
            sweep(m, base, source, ["llm.blocks.1.hook_resid_pre"], positions=[2, 3]),
            path_patch(m, base, source, [1], sinks=(0,), selections=("sinks", "image"))]
    for k, res in enumerate(runs):
        res.save(tmp_path / str(k))
        back = PatchResult.load(tmp_path / str(k))
        pd.testing.assert_frame_equal(back.frame, res.frame)
        assert type(back.config) is type(res.config) and back.config == res.config and back.unit == res.unit


def test_comparison_is_over_images_when_questions_share_them():
    """Six images asked twice each: the sinks vs random comparison pairs questions, averages them
    within their image and runs over 6 images; the planted sinks move the answer, random tokens not."""
    m = mechsink.load("planted-llava")
    images, rows = P.load_eval(6)
    imgs = [im for im in images for _ in range(2)]
    answers = [r["answer"] for r in rows for _ in range(2)]
    base = m.prepare(imgs, [P.PROMPT] * 12, answers=answers)
    from mechsink.sources import with_images
    source = with_images(m, base, imgs[2:] + imgs[:2])           # another image for every question
    res = patch(m, base, source, PatchConfig(sites=("proj.out",), selections=("sinks", "random"), n_draws=2),
                sinks=P.PLANTED_SINKS)
    assert res.counts() == {"n_images": 6, "n_questions": 12}
    s = res.summary()
    assert (s["n_images"], s["n_questions"]) == (6, 12)
    c = res.comparison("proj.out", "sinks", n_boot=200)
    assert (c.n, c.n_obs, c.unit) == (6, 12, "image")
    assert c.random.mean == pytest.approx(0.0, abs=1e-4) and c.sink.ci_low > 0.1
    f = res.frame.assign(drop=res.frame["base"] - res.frame["patched"])
    per_q = f.groupby(["sample", res.unit])["drop"].mean().unstack()
    per_img = (per_q["sinks"] - per_q["random"]).groupby(np.arange(12) // 2).mean().to_numpy()
    from mechsink.stats import paired_permutation_test
    assert c.diff.mean == pytest.approx(per_img.mean())
    assert c.p_value == pytest.approx(paired_permutation_test(per_img, np.zeros(6)))   # exact over 6 images
    assert c.p_value >= 1 / 64
    with pytest.raises(PatchError, match="no selection"):
        res.comparison("proj.out", "image")
