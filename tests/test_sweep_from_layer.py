"""Sweeps that start where they patch: residual-stream patches run from the patched block on, from
the clean stream, and give the numbers of the reference path (every copy reruns the whole LLM) and
of TransformerLens's patching utilities."""
import copy
import importlib.util

import numpy as np
import pytest
import torch

import mechsink
from mechsink.metrics import Metric
from mechsink.sweep import path_patch, sweep
from mechsink.testing import test_image as make_image
from mechsink.zoo import planted as P


def _pair(name):
    m = mechsink.load(name)
    if name == "planted-llava":
        images, rows = P.load_eval(8)
        prompts = [r["prompt"] for r in rows[:4]]
        return (m, m.prepare(images[:4], prompts, answers=[r["answer"] for r in rows[:4]]),
                m.prepare(images[4:8], prompts, answers=[r["answer"] for r in rows[4:8]]), Metric("logit_diff", answers=P.COLORS))
    prompts = ["is there a cat ?", "is there a cat in this picture ?"]                 # one row left-padded
    return (m, m.prepare([make_image(seed=1), make_image(seed=2)], prompts, answers=["yes", "no"]),
            m.prepare([make_image(seed=11), make_image(seed=12)], prompts, answers=["yes", "no"]), Metric("logprob"))


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "planted-llava"])
def test_sweep_from_the_patched_layer_equals_the_full_rerun(name):
    m, base, source, metric = _pair(name)
    n = m.n_llm_layers
    sites = ["llm.embed"] + [f"llm.blocks.{l}.hook_resid_pre" for l in range(n)] + [f"llm.blocks.{n - 1}.hook_resid_post"]
    for positions in ("patches", "all"):
        kw = dict(positions=positions, metric=metric, rows_per_forward=16)
        fast = sweep(m, base, source, sites, **kw).frame
        ref = sweep(m, base, source, sites, from_layer=False, **kw).frame
        assert len(fast) == len(ref)
        diff = np.abs(fast["patched"].to_numpy() - ref["patched"].to_numpy())
        assert np.nanmax(diff) <= 1e-5
        assert np.nanmax(np.abs(ref["patched"] - ref["base"])) > 1e-4                       # the sweep moves the metric
    sels = ("image",) if name != "planted-llava" else ("sinks", "image")
    kw = dict(selections=sels, metric=metric, layers=[0, (0, 1), n - 1])
    a = path_patch(m, base, source, **kw).frame["patched"].to_numpy()
    b = path_patch(m, base, source, from_layer=False, **kw).frame["patched"].to_numpy()
    assert np.abs(a - b).max() <= 1e-5


def test_mixed_sites_fall_back_per_chunk():
    m, base, source, metric = _pair("tiny-llava")
    sites = ["llm.blocks.1.hook_attn_out", "llm.blocks.1.hook_resid_pre", "proj.out"]
    fast = sweep(m, base, source, sites, positions="patches", metric=metric, rows_per_forward=4).frame
    ref = sweep(m, base, source, sites, positions="patches", metric=metric, from_layer=False).frame
    assert np.abs(fast["patched"].to_numpy() - ref["patched"].to_numpy()).max() <= 1e-5


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
    def __init__(self, bridge, **inputs):
        self._bridge, self._inputs = bridge, inputs

    def __getattr__(self, name):
        return getattr(self._bridge, name)

    def run_with_hooks(self, tokens, fwd_hooks=(), **kw):
        return self._bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **self._inputs, **kw)


def test_fast_sweep_equals_transformer_lens(bridge_cls):
    from transformer_lens import patching as tlp
    m, base, source, metric = _pair("tiny-llava")
    hf = copy.deepcopy(m.hf)
    hf.config.architectures = [type(hf).__name__]
    tok = copy.deepcopy(m.processor.tokenizer)
    tok.init_kwargs.update(name_or_path="tiny-llava", add_bos_token=True)
    br = bridge_cls.boot_transformers("tiny-llava", hf_model=hf, tokenizer=tok, device="cpu")
    am = base.inputs["attention_mask"]
    _, cache = br.run_with_cache(source.inputs["input_ids"], pixel_values=source.inputs["pixel_values"], attention_mask=am)
    t = metric.targets(m, base)

    def tl_metric(logits):
        lp = torch.log_softmax(logits[torch.arange(base.size), t.pos].float(), -1)
        return lp[torch.arange(base.size), t.ids[:, 0]]

    model = _WithImages(br, pixel_values=base.inputs["pixel_values"], attention_mask=am)
    theirs = tlp.get_act_patch_resid_pre(model, base.inputs["input_ids"], cache, tl_metric, reduce="none").values   # [layer, pos, batch]
    sites = [f"llm.blocks.{l}.hook_resid_pre" for l in range(m.n_llm_layers)]
    ours = sweep(m, base, source, sites, positions="all", metric=metric).frame
    got = torch.tensor(ours["patched"].to_numpy()).reshape(m.n_llm_layers, -1, base.size)
    real = am.bool().T[None].expand(m.n_llm_layers, -1, -1)
    assert float((got - theirs.double()).abs()[real].max()) <= 1e-5
