"""Reading a block's attention pattern makes only that block eager; the rest keeps SDPA."""
import weakref

import numpy as np
import pytest
import torch

import mechsink
from mechsink.models.attention import KEY
from mechsink.testing import test_image as make_image


def _impls(m):
    return [getattr(mod.config, "_attn_implementation", None) for name, mod in m.hf.named_modules()
            if name.endswith(("self_attn", ".attn", "attention")) and hasattr(mod, "config")]


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl", "tiny-llava-onevision", "tiny-gemma3"])
def test_only_read_blocks_turn_eager_and_patterns_equal_full_eager(name):
    m = mechsink.load(name)
    assert m.hf.config._attn_implementation == "sdpa"
    b = m.prepare([make_image(48), make_image(40, seed=1)], ["what is this ?", "is there a cat in this picture ?"])
    read = ["llm.blocks.1.attn.hook_pattern", "vit.blocks.0.attn.hook_pattern"]
    with m.attention("eager", sites=read):
        during = _impls(m)
    assert during.count(KEY) == 2 and during.count("sdpa") == len(during) - 2
    assert KEY not in _impls(m)
    part = m.run(b, read=read)
    with m.attention("eager"):
        full = m.run(b, read=read)
    plain = m.run(b)
    mask = b.inputs["attention_mask"].bool()
    for s in read:
        assert torch.allclose(part[s], full[s], atol=1e-6)
    assert (part["llm.logits"] - plain["llm.logits"]).abs()[mask].max() < 1e-5
    p = part["llm.blocks.1.attn.hook_pattern"]
    assert torch.allclose(p.sum(-1)[mask[:, None, :].expand(-1, p.shape[1], -1)], torch.tensor(1.0), atol=1e-5)


def test_causal_mask_is_rebuilt_when_sdpa_has_none():
    """One unpadded sample: SDPA passes no mask at all (is_causal); the eager block must be causal."""
    m = mechsink.load("tiny-llava")
    b = m.prepare([make_image(48)], ["what is this ?"])
    p = m.run(b, read=["llm.blocks.0.attn.hook_pattern"])["llm.blocks.0.attn.hook_pattern"][0]
    assert torch.count_nonzero(torch.triu(p, diagonal=1)) == 0
    with m.attention("eager"):
        q = m.run(b, read=["llm.blocks.0.attn.hook_pattern"])["llm.blocks.0.attn.hook_pattern"][0]
    assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_attention_statistics_stream_one_layer_at_a_time(name):
    """llm_attention / vit_attention equal the statistics of fully read patterns, reduce each layer
    as soon as it has run (never two patterns alive), and vit_attention stops before the LLM."""
    from mechsink.sinks import SinkSpec, detect, llm_attention, llm_attention_acts, vit_attention, vit_attention_acts
    from mechsink.sinks import attention as A
    m = mechsink.load(name)
    b = m.prepare([make_image(48), make_image(40, seed=1)], ["what is this ?", "is there a cat in this picture ?"])
    sinks = detect(m, b, SinkSpec(rule="topk", params={"k": 2}))
    nl, nv = m.n_llm_layers, m.n_vit_layers
    full = m.run(b, read=[f"llm.blocks.{l}.attn.hook_pattern" for l in range(nl)]
                 + [f"vit.blocks.{l}.attn.hook_pattern" for l in range(nv)])
    ref = llm_attention_acts({l: full[f"llm.blocks.{l}.attn.hook_pattern"] for l in range(nl)}, sinks,
                             b.token_map.roles, b.last_pos.tolist())
    got = llm_attention(m, b, sinks)
    assert len(got) == len(ref) and np.allclose(got["attn"], ref["attn"], atol=1e-6)
    vref = vit_attention_acts({l: full[f"vit.blocks.{l}.attn.hook_pattern"] for l in range(nv)}, sinks)
    refs, overlaps, llm_ran = [], [], []

    def reduce(p):
        overlaps.append(sum(r() is not None for r in refs))     # earlier layers' patterns still alive
        refs.append(weakref.ref(p))
        return tuple(p.shape)
    h = m.module(f"{m.adapter.llm_blocks}.0").register_forward_hook(lambda *a: llm_ran.append(1))
    try:
        per = A.stream_patterns(m, b, "vit", range(nv), reduce)
    finally:
        h.remove()
    assert sorted(per) == list(range(nv)) and overlaps == [0] * nv and not llm_ran
    vgot = vit_attention(m, b, sinks)
    assert np.allclose(vgot["attn"], vref["attn"], atol=1e-6)
