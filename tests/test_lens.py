"""Agreement with TransformerLens (4.x, `TransformerBridge`) on the modules the zoo builds.

TransformerLens 4 has no HookedTransformer; its bridge wraps an existing HF module
(`boot_transformers(..., hf_model=...)`). It is booted on a deep copy, because it rewires the
module tree and forces eager attention. Its processor loader pip-installs torchvision when
AutoProcessor fails; that hook is disabled here (torchvision must never be installed).

- LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Gemma 3: the bridge wraps the whole model. Logits, the LLM
  residual stream and attention pattern of every layer, and the ViT block outputs (and, where the
  bridge exposes them, ViT patterns) agree with mechsink within 1e-5.
- Qwen2-VL / Qwen2.5-VL: the bridge does not support Qwen2-VL, and its Qwen2.5-VL adapter requires
  torchvision. Only the LLM is compared: the same weights in a Qwen2ForCausalLM on a text-only batch
  (M-RoPE with equal t/h/w positions is plain RoPE). The ViT of these families is covered against
  plain torch hooks in test_trace.py.
- Standalone encoders (CLIP/SigLIP/DINOv2 vision models): not supported by the bridge; not compared.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import importlib.util

import pytest
import torch
import transformers as tf

import mechsink
from mechsink.models import Batch
from mechsink.testing import test_image as make_image

TOL = 1e-5


@pytest.fixture(scope="module")
def bridge_cls():
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers import helpers
    original, present = helpers._ensure_torchvision, importlib.util.find_spec("torchvision") is not None
    helpers._ensure_torchvision = lambda: False      # never pip install torchvision
    yield TransformerBridge
    helpers._ensure_torchvision = original
    assert (importlib.util.find_spec("torchvision") is not None) == present


def boot(bridge_cls, hf, tokenizer, name):
    hf = copy.deepcopy(hf)
    hf.config.architectures = [type(hf).__name__]
    tok = copy.deepcopy(tokenizer)
    tok.init_kwargs.update(name_or_path=name, add_bos_token=True)   # keeps the bridge off the hub
    return bridge_cls.boot_transformers(name, hf_model=hf, tokenizer=tok, device="cpu")


def close(a, b, mask=None) -> float:
    d = (a.detach() - b).abs()
    return float((d[mask] if mask is not None else d).max())


@pytest.mark.parametrize("name, size", [("tiny-llava", (32, 32)), ("tiny-llava-next", (40, 10)),
                                        ("tiny-llava-onevision", (40, 10)), ("tiny-gemma3", (32, 32))])
def test_bridge_caches_match_our_sites(bridge_cls, name, size):
    m = mechsink.load(name)
    b = m.prepare([make_image(48).resize(size), make_image(48, seed=1).resize(size)],
                  ["what is this ?", "is there a cat in this picture ?"])
    nv, nl = m.n_vit_layers, m.n_llm_layers
    sites = ([f"llm.blocks.{l}.{h}" for l in range(nl) for h in ("hook_resid_post", "attn.hook_pattern")]
             + [f"vit.blocks.{l}.{h}" for l in range(nv) for h in ("hook_resid_post", "attn.hook_pattern")])
    ours = m.run(b, read=sites)
    br = boot(bridge_cls, m.hf, m.processor.tokenizer, name)
    extra = {k: v for k, v in b.inputs.items() if k != "input_ids"}
    logits, cache = br.run_with_cache(b.inputs["input_ids"], **extra)
    mask = b.inputs["attention_mask"].bool()
    assert close(logits, ours["llm.logits"], mask) <= TOL
    for l in range(nl):
        assert close(cache[f"blocks.{l}.hook_resid_post"], ours[f"llm.blocks.{l}.hook_resid_post"], mask) <= TOL
        assert close(cache[f"blocks.{l}.attn.hook_pattern"], ours[f"llm.blocks.{l}.attn.hook_pattern"]) <= TOL
    patterns = 0
    for l in range(nv):
        assert close(cache[f"vision_encoder.encoder_layers.{l}.hook_out"], ours[f"vit.blocks.{l}.hook_resid_post"]) <= TOL
        key = f"vision_encoder.encoder_layers.{l}.attn.hook_pattern"
        if key in cache:
            patterns += 1
            assert close(cache[key], ours[f"vit.blocks.{l}.attn.hook_pattern"]) <= TOL
    if name in ("tiny-llava", "tiny-gemma3"):   # these bridges expose ViT patterns: make sure they were compared
        assert patterns == nv


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_bridge_on_the_qwen_llm_alone(bridge_cls, name):
    m = mechsink.load(name)
    tok = m.processor.tokenizer
    enc = tok(["what is this ? is there a cat", "one two three"], return_tensors="pt", padding=True)
    batch = Batch(dict(enc), None, [], [[], []])          # text only: the ViT does not run
    nl = m.n_llm_layers
    ours = m.run(batch, read=[f"llm.blocks.{l}.{h}" for l in range(nl) for h in ("hook_resid_post", "attn.hook_pattern")])
    tc = m.hf.config.text_config
    cfg = tf.Qwen2Config(hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
                         num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
                         num_key_value_heads=tc.num_key_value_heads, vocab_size=tc.vocab_size,
                         max_position_embeddings=tc.max_position_embeddings, rms_norm_eps=tc.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": tc.rope_parameters["rope_theta"]},
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    lm = tf.Qwen2ForCausalLM(cfg).eval()
    lm.model.load_state_dict(m.hf.model.language_model.state_dict(), strict=True)
    lm.lm_head.load_state_dict(m.hf.lm_head.state_dict(), strict=True)
    br = boot(bridge_cls, lm, tok, f"{name}-llm")
    logits, cache = br.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"])
    mask = enc["attention_mask"].bool()
    assert close(logits, ours["llm.logits"], mask) <= TOL
    for l in range(nl):
        assert close(cache[f"blocks.{l}.hook_resid_post"], ours[f"llm.blocks.{l}.hook_resid_post"], mask) <= TOL
        assert close(cache[f"blocks.{l}.attn.hook_pattern"], ours[f"llm.blocks.{l}.attn.hook_pattern"]) <= TOL
