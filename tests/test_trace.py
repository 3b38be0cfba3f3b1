"""Reads and writes at sites, checked against plain PyTorch hooks written here independently.

For every zoo architecture the test registers ordinary forward hooks / pre-hooks on the HF modules
(paths written out below, not taken from the adapters), computes resid_mid by hand, and requires
each site read through mechsink (nnsight) to be bit-identical. The Qwen ViT attention does not
return its pattern; the reference captures it from the model's own eager attention function.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib

import pytest
import torch

import mechsink
from mechsink.errors import SiteError
from mechsink.testing import test_image as make_image
from mechsink.trace import set_tokens

LLAVA_LIKE = dict(embed=("model.vision_tower.embeddings", "out"), vit="model.vision_tower.encoder.layers",
                  attn="self_attn", fc2="mlp.fc2", vit_out=("model.multi_modal_projector", "in"),
                  proj="model.multi_modal_projector", llm="model.language_model.layers")
QWEN = dict(embed=("model.visual.patch_embed", "out"), vit="model.visual.blocks", attn="attn", fc2="mlp.fc2",
            vit_out=("model.visual.merger", "in"), proj="model.visual.merger", llm="model.language_model.layers",
            qwen_module="transformers.models.qwen2_vl.modeling_qwen2_vl")
SPEC = {
    "tiny-llava": LLAVA_LIKE,
    "tiny-llava-next": LLAVA_LIKE,
    "tiny-llava-onevision": LLAVA_LIKE,
    "tiny-qwen2-vl": QWEN,
    "tiny-qwen2.5-vl": {**QWEN, "embed": ("model.visual.blocks.0", "in"), "fc2": "mlp.down_proj",
                        "qwen_module": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"},
    "tiny-gemma3": {**LLAVA_LIKE, "llm_attn_out": "post_attention_layernorm", "llm_mlp_out": "post_feedforward_layernorm"},
    "tiny-clip": dict(embed=("embeddings", "out"), vit="encoder.layers", attn="self_attn", fc2="mlp.fc2",
                      vit_out=("encoder.layers.2", "out")),
    "tiny-siglip": dict(embed=("embeddings", "out"), vit="encoder.layers", attn="self_attn", fc2="mlp.fc2",
                        vit_out=("encoder.layers.2", "out")),
    "tiny-dinov2": dict(embed=("embeddings", "out"), vit="encoder.layer", attn="attention", fc2="mlp.fc2",
                        attn_out="layer_scale1", mlp_out="layer_scale2", vit_out=("encoder.layer.2", "out")),
}
NAMES = list(SPEC)
IMAGES = {"tiny-llava-next": (40, 10), "tiny-llava-onevision": (40, 10), "tiny-qwen2-vl": (24, 16),
          "tiny-qwen2.5-vl": (24, 16)}


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(name):
        if name not in cache:
            m = mechsink.load(name)
            size = IMAGES.get(name, (32, 32))
            imgs = [make_image(48, seed=0).resize(size), make_image(48, seed=1).resize(size)]
            prompts = None if m.adapter.vision_only else ["what is this ?", "is there a cat ?"]
            cache[name] = (m, m.prepare(imgs, prompts))
        return cache[name]
    return get


def _first(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _main(out):
    return out[0] if isinstance(out, tuple) else out


def reference(m, batch, spec) -> dict[str, torch.Tensor]:
    """Every site, captured with plain torch hooks in an eager forward pass."""
    hf, got, handles = m.hf, {}, []

    def put(name, value):
        got[name] = value.detach().clone()

    def out_hook(name, pick=_main):
        return lambda mod, args, out: put(name, pick(out))

    def in_hook(name):
        return lambda mod, args, kwargs: put(name, _first(args, kwargs))

    def hook(path, where, name, pick=_main):
        mod = hf.get_submodule(path)
        handles.append(mod.register_forward_hook(out_hook(name, pick)) if where == "out"
                       else mod.register_forward_pre_hook(in_hook(name), with_kwargs=True))

    hook(*spec["embed"], "vit.embed")
    hook(*spec["vit_out"], "vit.out")
    n_vit = len(hf.get_submodule(spec["vit"]))
    qwen = spec.get("qwen_module")
    for l in range(n_vit):
        b, p = f"{spec['vit']}.{l}", f"vit.blocks.{l}."
        hook(b, "in", p + "hook_resid_pre")
        hook(b, "out", p + "hook_resid_post")
        hook(f"{b}.{spec.get('attn_out', spec['attn'])}", "out", p + "hook_attn_out")
        if not qwen:
            hook(f"{b}.{spec['attn']}", "out", p + "attn.hook_pattern", pick=lambda o: o[1])
        hook(f"{b}.{spec['fc2']}", "in", p + "mlp.hook_post")
        hook(f"{b}.{spec.get('mlp_out', 'mlp')}", "out", p + "hook_mlp_out")
    if "proj" in spec:
        hook(spec["proj"], "out", "proj.out")
        hook(f"{spec['llm']}.0", "in", "llm.embed")
        hook("lm_head", "out", "llm.logits")
        for l in range(len(hf.get_submodule(spec["llm"]))):
            b, p = f"{spec['llm']}.{l}", f"llm.blocks.{l}."
            hook(b, "in", p + "hook_resid_pre")
            hook(b, "out", p + "hook_resid_post")
            hook(f"{b}.{spec.get('llm_attn_out', 'self_attn')}", "out", p + "hook_attn_out")
            hook(f"{b}.self_attn", "out", p + "attn.hook_pattern", pick=lambda o: o[1])
            hook(f"{b}.mlp.down_proj", "in", p + "mlp.hook_post")
            hook(f"{b}.{spec.get('llm_mlp_out', 'mlp')}", "out", p + "hook_mlp_out")
    # Qwen ViT: the eager attention function sees one image/window chunk at a time.
    chunks, bounds, restore = [], [], None
    if qwen:
        mod = importlib.import_module(qwen)
        eager = mod.eager_attention_forward

        def spy(module, *a, **k):
            out, w = eager(module, *a, **k)
            if "Vision" in type(module).__name__:
                chunks.append(w[0].detach().clone())
            return out, w
        restore = (mod, eager)
        mod.eager_attention_forward = spy
        for l in range(n_vit):
            attn = hf.get_submodule(f"{spec['vit']}.{l}.{spec['attn']}")
            handles.append(attn.register_forward_pre_hook(
                lambda mod_, args, kwargs: bounds.append(kwargs["cu_seqlens"].tolist()), with_kwargs=True))
    try:
        with torch.no_grad(), m.attention("eager"):
            hf(**batch.inputs)
    finally:
        for h in handles:
            h.remove()
        if restore:
            setattr(restore[0], "eager_attention_forward", restore[1])
    for part in ("vit", "llm"):
        for l in range(n_vit if part == "vit" else m.n_llm_layers):
            p = f"{part}.blocks.{l}."
            got[p + "hook_resid_mid"] = got[p + "hook_resid_pre"] + got[p + "hook_attn_out"]
    if qwen:
        n = got["vit.embed"].shape[0]
        for l, cu in enumerate(bounds):
            pattern = torch.zeros(chunks[0].shape[0], n, n)
            for a, b in zip(cu[:-1], cu[1:]):
                pattern[:, a:b, a:b] = chunks.pop(0)
            got[f"vit.blocks.{l}.attn.hook_pattern"] = pattern
    return got


@pytest.mark.parametrize("name", NAMES)
def test_every_site_matches_plain_torch_hooks(zoo, name):
    m, batch = zoo(name)
    expected = reference(m, batch, SPEC[name])
    names = m.site_names()
    assert set(expected) == set(names)
    got = m.run(batch, read=names)
    for site in names:
        assert got[site].shape == expected[site].shape, site
        assert torch.equal(got[site], expected[site]), (site, (got[site] - expected[site]).abs().max())


def _logits_or_out(m, res):
    return res["vit.out"] if m.adapter.vision_only else res["llm.logits"]


@pytest.mark.parametrize("name", NAMES)
def test_writing_a_site_with_its_own_value_changes_nothing(zoo, name):
    m, batch = zoo(name)
    # (LLaVA and LLaVA-NeXT read the penultimate ViT block, so the last one cannot move the logits)
    sites = ["vit.embed", "vit.blocks.0.hook_resid_mid", "vit.blocks.0.mlp.hook_post",
             "vit.blocks.1.hook_attn_out", "vit.blocks.1.hook_resid_pre"]
    if not m.adapter.vision_only:
        sites += ["vit.out", "proj.out", "llm.embed", "llm.blocks.0.hook_resid_mid", "llm.blocks.0.hook_mlp_out",
                  "llm.blocks.1.mlp.hook_post", "llm.blocks.1.hook_resid_post"]
    read = ["vit.out"] if m.adapter.vision_only else []
    base = _logits_or_out(m, m.run(batch, read=read))
    for site in sites:
        same = _logits_or_out(m, m.run(batch, read=read, write={site: lambda x: x.clone()}))
        assert torch.equal(same, base), site
        # ... while a real edit at the same site does change the output (the write takes effect);
        # not a constant shift, which LayerNorms downstream would erase
        moved = _logits_or_out(m, m.run(batch, read=read, write={site: lambda x: x + torch.linspace(0, 1, x.shape[-1])}))
        assert not torch.allclose(moved, base), site


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next", "tiny-llava-onevision", "tiny-qwen2-vl",
                                  "tiny-qwen2.5-vl", "tiny-gemma3"])
def test_editing_image_tokens_at_proj_out_is_causal(zoo, name):
    """Changing the projector output of some patches changes exactly their LLM positions at
    llm.embed, and the logits only from the first of them on (Gemma 3: from the first token of
    the image, whose tokens attend to each other both ways)."""
    m, batch = zoo(name)
    tm = batch.token_map
    reached = tm.patches[(tm.patches["llm_pos"] >= 0) & (tm.patches["sample"] == 0)]
    cut = reached["llm_pos"].quantile(0.6)
    rows = reached[reached["llm_pos"] >= cut]
    first = int(rows["llm_pos"].min())
    unchanged = int(reached["llm_pos"].min()) if name == "tiny-gemma3" else first
    idx = tm.index("proj", rows)
    base = m.run(batch, read=["llm.embed"])
    edit = m.run(batch, read=["llm.embed"], write={"proj.out": set_tokens(idx, torch.full((1,), 3.0))})
    changed = (edit["llm.embed"] != base["llm.embed"]).any(-1).nonzero().tolist()
    assert sorted(map(tuple, changed)) == sorted((0, int(p)) for p in rows["llm_pos"].unique())
    diff = (edit["llm.logits"] != base["llm.logits"]).any(-1)
    assert not diff[0, :unchanged].any()
    assert diff[0, first]
    assert not diff[1].any()     # the other sample of the batch is untouched


def test_qwen_vit_pattern_is_recomputed_and_read_only(zoo):
    m, batch = zoo("tiny-qwen2.5-vl")
    assert m.locate("vit.blocks.0.attn.hook_pattern")[1] == "derived"
    got = m.run(batch, read=["vit.blocks.0.attn.hook_pattern", "vit.blocks.1.attn.hook_pattern"])
    # Block 0 attends within 16 px windows, block 1 within whole images; rows are distributions.
    for l in (0, 1):
        p = got[f"vit.blocks.{l}.attn.hook_pattern"]
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5)
    support0 = (got["vit.blocks.0.attn.hook_pattern"][0] > 0).sum(-1)
    support1 = (got["vit.blocks.1.attn.hook_pattern"][0] > 0).sum(-1)
    # each image is 4x6 patches = 2x3 merged tokens: windows of 2x2 and 2x1 merged tokens
    assert support0.tolist() == ([16] * 16 + [8] * 8) * 2
    assert support1.tolist() == [24] * 48
    with pytest.raises(SiteError, match="cannot be written"):
        m.run(batch, write={"vit.blocks.0.attn.hook_pattern": lambda x: x})


def test_vit_out_of_an_encoder_is_its_last_block_output(zoo):
    m, batch = zoo("tiny-dinov2")
    assert m.locate("vit.out") == ("encoder.layer.2", "output", None)
    got = m.run(batch, read=["vit.out", "vit.blocks.2.hook_resid_post"])
    assert torch.equal(got["vit.out"], got["vit.blocks.2.hook_resid_post"])
    with pytest.raises(SiteError):
        m.locate("proj.out")
