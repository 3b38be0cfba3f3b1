"""Attribution patching: exact gradients, agreement with exact patching where the first-order
picture holds, and a pass count that does not grow with the sweep."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import mechsink
from mechsink.attribution import AttributionConfig, AttributionResult, agreement, attribute, gradients
from mechsink.metrics import Metric, gather_logits
from mechsink.patching import PatchError, block_sites
from mechsink.report.figures import attribution_heatmap
from mechsink.testing import test_image as make_image

PROMPTS = ["is there a cat ?", "is there a cat in this picture ?", "is there a dog ?"]




@pytest.fixture(scope="module")
def tiny():
    m = mechsink.load("tiny-llava")
    images = [make_image(seed=i) for i in range(3)]
    base = m.prepare(images, PROMPTS, answers=["yes", "no", "yes"])
    return m, images, base


def _noisy(image, seed, amp):
    a = np.asarray(image).astype(float) + np.random.default_rng(seed).normal(0, amp, np.asarray(image).shape)
    return Image.fromarray(np.clip(a, 0, 255).astype("uint8"))


def _sites(m):
    # a block's input is addressed as the previous block's output, so the last ViT block's input is
    # what LLaVA's projector reads (vision_feature_layer=-2)
    return block_sites(m, "vit") + ["vit.out", "proj.out"] + block_sites(m, "llm")


@pytest.mark.parametrize("site", ["vit.blocks.1.hook_resid_pre", "vit.blocks.2.hook_resid_pre", "vit.out", "proj.out",
                                  "llm.blocks.1.hook_resid_pre", "llm.blocks.0.hook_attn_out"])
def test_gradients_match_finite_differences(tiny, site):
    m, _, base = tiny
    metric = Metric("logit_diff")
    t = metric.targets(m, base)
    value, acts, grads = gradients(m, base, [site], metric, t)
    direction = torch.randn(acts[site].shape, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()                        # a small step, where the model is near-linear
    eps = 1e-2

    def run(sign):
        out = m.run(base, write={site: lambda x: x + sign * eps * direction.to(x)})["llm.logits"]
        return metric.score(gather_logits(out, t.keep(out.shape[1])), t)

    fd = ((run(1) - run(-1)) / (2 * eps)).sum()
    analytic = (grads[site] * direction).sum()
    assert abs(float(fd) - float(analytic)) <= 1e-2 * abs(float(analytic)) + 1e-4
    assert torch.allclose(value, run(0), atol=1e-5)
    assert float(grads[site].abs().max()) > 0.0            # every one of these sites reaches the logits
    if site == "vit.blocks.2.hook_resid_pre":               # the same tensor as the projector's input
        _, _, g_out = gradients(m, base, ["vit.out"], metric, t)
        assert torch.allclose(grads[site][:, 1:], g_out["vit.out"], atol=1e-7)


@pytest.mark.parametrize("amp, floor", [(2, 0.99), (40, 0.95)])
def test_attribution_ranks_cells_like_exact_patching(tiny, amp, floor):
    m, images, base = tiny
    source = m.prepare([_noisy(im, i, amp) for i, im in enumerate(images)], PROMPTS, answers=["yes", "no", "yes"])
    res = agreement(m, base, source, _sites(m), positions="all", metric="logprob")
    a = res.agreement
    assert a["n_cells"] == len(res.frame) == 3 * 17 + 2 * 16 + 2 * base.inputs["input_ids"].shape[1]
    assert a["spearman"] >= floor and a["pearson"] >= floor
    assert res.table().shape == res.table("exact").shape
    assert attribution_heatmap(res).axes


def test_token_set_units_and_different_images(tiny):
    m, _, base = tiny
    source = m.prepare([make_image(seed=10 + i) for i in range(3)], PROMPTS, answers=["yes", "no", "yes"])
    res = agreement(m, base, source, _sites(m), positions=["sinks", "random", "image"], sinks=(0, 5, 10),
                    metric="logit_diff", n_draws=3)
    assert set(res.frame["tokens"]) == {"sinks", "random", "image"}
    assert len(res.frame) == len(_sites(m)) * 5
    assert res.agreement["spearman"] > 0.9


def test_the_number_of_passes_does_not_grow_with_the_sweep(tiny):
    m, images, base = tiny
    source = m.prepare([_noisy(im, i, 20) for i, im in enumerate(images)], PROMPTS, answers=["yes", "no", "yes"])
    calls = []
    h = m.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        counts = []
        for sites in (["llm.blocks.1.hook_resid_pre"], block_sites(m, "llm") + block_sites(m, "llm", "hook_mlp_out"),
                      ["vit.blocks.0.hook_resid_pre"], _sites(m)):
            calls.clear()
            res = attribute(m, base, source, sites, positions="all", metric="logprob")
            counts.append(len(calls))
            assert len(res.frame) > 0
    finally:
        h.remove()
    assert counts[0] == counts[1] <= 3 and counts[2] == counts[3] <= 3


def test_metrics_without_a_useful_gradient_are_refused(tiny):
    m, _, base = tiny
    for name in ("accuracy", "kl"):
        with pytest.raises(PatchError, match="gradient"):
            attribute(m, base, base, ["proj.out"], metric=name)
    with pytest.raises(PatchError, match="derived"):
        attribute(m, base, base, ["llm.blocks.0.hook_resid_mid"])


def test_config_roundtrip_and_result_reload(tiny, tmp_path):
    import pandas as pd
    for cfg in (AttributionConfig(), AttributionConfig(sites=("proj.out",), positions=["sinks", "random(match=border)"],
                                                       metric=Metric("logit_diff", answers=("yes", "no")), n_draws=2)):
        back = AttributionConfig.from_json(cfg.to_json())
        assert back == cfg and back.fingerprint() == cfg.fingerprint()
    with pytest.raises(PatchError, match="gradient"):
        AttributionConfig(metric="kl")
    m, images, base = tiny
    source = m.prepare([_noisy(im, i, 20) for i, im in enumerate(images)], PROMPTS, answers=["yes", "no", "yes"])
    res = agreement(m, base, source, config=AttributionConfig(sites=("proj.out", "llm.blocks.0.hook_resid_pre"),
                                                              positions=["sinks", "image"]), sinks=(0, 5))
    res.save(tmp_path / "a")
    back = AttributionResult.load(tmp_path / "a")
    pd.testing.assert_frame_equal(back.frame, res.frame)
    assert back.config == res.config and back.summary()["agreement"] == res.summary()["agreement"]
