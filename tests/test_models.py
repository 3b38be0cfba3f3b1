"""Opening models: the registry, the site namespace of each architecture, prompt errors, and
save_pretrained round trips (processors included, without torchvision)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json

import pytest
import torch
import transformers as tf

import mechsink
from mechsink.errors import PromptError, SiteError, UnsupportedModel
from mechsink.models import adapter_for, adapters
from mechsink.testing import build
from mechsink.testing import test_image as make_image

LVLMS = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava-onevision", "tiny-gemma3"]
ENCODERS = ["tiny-clip", "tiny-siglip", "tiny-dinov2"]
IMAGE = {"tiny-qwen2-vl": (24, 16), "tiny-qwen2.5-vl": (24, 16), "tiny-llava-next": (40, 10),
         "tiny-llava-onevision": (40, 10), "tiny-gemma3": (32, 32)}

BLOCK0 = ["vit.blocks.0.hook_resid_pre", "vit.blocks.0.attn.hook_pattern", "vit.blocks.0.hook_attn_out",
          "vit.blocks.0.hook_resid_mid", "vit.blocks.0.mlp.hook_post", "vit.blocks.0.hook_mlp_out",
          "vit.blocks.0.hook_resid_post"]


def _vlm_sites(n_vit):
    last = f"vit.blocks.{n_vit - 1}.hook_resid_post"
    return dict(length=1 + 7 * n_vit + 1 + 2 + 7 * 2 + 1,
                head=["vit.embed", *BLOCK0, "vit.blocks.1.hook_resid_pre"],
                middle=[last, "vit.out", "proj.out", "llm.embed", "llm.blocks.0.hook_resid_pre",
                        "llm.blocks.0.attn.hook_pattern"],
                tail=["llm.blocks.1.hook_mlp_out", "llm.blocks.1.hook_resid_post", "llm.logits"])


SITES = {
    "tiny-llava": _vlm_sites(3), "tiny-llava-next": _vlm_sites(3), "tiny-llava-onevision": _vlm_sites(3),
    "tiny-qwen2-vl": _vlm_sites(2), "tiny-qwen2.5-vl": _vlm_sites(2), "tiny-gemma3": _vlm_sites(2),
    **{e: dict(length=23, head=["vit.embed", *BLOCK0, "vit.blocks.1.hook_resid_pre"], middle=[],
               tail=["vit.blocks.2.hook_mlp_out", "vit.blocks.2.hook_resid_post", "vit.out"]) for e in ENCODERS},
}


def inputs(m, name):
    img = make_image(48).resize(IMAGE.get(name, (32, 32)))
    return m.prepare([img], None if m.adapter.vision_only else ["what is this ?"])


@pytest.mark.parametrize("name", list(SITES))
def test_site_list_per_architecture(name):
    m = mechsink.load(name)
    names = m.site_names()
    want = SITES[name]
    assert len(names) == want["length"] == len(set(names))
    assert names[:len(want["head"])] == want["head"]
    assert names[-len(want["tail"]):] == want["tail"]
    if want["middle"]:
        i = names.index(want["middle"][0])
        assert names[i:i + len(want["middle"])] == want["middle"]
    else:
        assert not any(n.startswith(("proj", "llm")) for n in names)
        with pytest.raises(SiteError, match="vision encoder"):
            m.locate("llm.embed")


def test_registry_covers_the_families():
    table = adapters()
    assert {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2VLForConditionalGeneration",
            "Qwen2_5_VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
            "Gemma3ForConditionalGeneration", "CLIPVisionModel",
            "SiglipVisionModel", "Dinov2Model", "Dinov2WithRegistersModel"} <= set(table)
    assert {ad.family for ad in table.values() if ad.vision_only} == {"clip", "siglip", "dinov2", "dinov2_registers"}


def test_unsupported_architecture_is_one_line_naming_the_supported(tmp_path):
    with pytest.raises(UnsupportedModel) as e:
        adapter_for("GPT2LMHeadModel")
    msg = str(e.value)
    assert "\n" not in msg and "'GPT2LMHeadModel'" in msg
    assert "LlavaNextForConditionalGeneration" in msg and "Qwen2_5_VLForConditionalGeneration" in msg
    tf.GPT2Config(n_layer=1, n_embd=8, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="supported: .*CLIPVisionModel"):
        mechsink.load(tmp_path)


@pytest.mark.parametrize("name, prompt, n_images", [
    ("tiny-llava-next", "<image> <image> what", 1),
    ("tiny-llava-onevision", "<image> what", 2),
    ("tiny-qwen2-vl", "<|image_pad|> and <|image_pad|> what", 1),
    ("tiny-qwen2.5-vl", "<|vision_start|><|image_pad|><|vision_end|> what", 2),
    ("tiny-gemma3", "<start_of_image> what", 3),
])
def test_mismatched_image_placeholders_raise_prompt_error(name, prompt, n_images):
    m = mechsink.load(name)
    imgs = [make_image(32, seed=k).resize(IMAGE[name]) for k in range(n_images)]
    with pytest.raises(PromptError, match=f"placeholder.*for {n_images} image"):
        m.prepare([imgs], [prompt])


def test_default_prompts_use_each_family_chat_format():
    qwen = mechsink.load("tiny-qwen2-vl")
    b = qwen.prepare([make_image(32).resize((16, 16))])
    assert b.prompts[0] == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
                            "<|im_start|>assistant\n")
    ov = mechsink.load("tiny-llava-onevision")
    assert ov.format_prompt("is there a cat ?").startswith("<|im_start|>user <image>\nis there a cat ?")


@pytest.mark.parametrize("name", LVLMS + ENCODERS)
def test_save_pretrained_round_trip(name, tmp_path):
    m = mechsink.load(name)
    m.hf.save_pretrained(tmp_path)
    m.processor.save_pretrained(tmp_path)
    again = mechsink.load(tmp_path)
    assert type(again.hf) is type(m.hf) and again.adapter is m.adapter
    # With torchvision installed, AutoImageProcessor picks its torchvision backend, which resizes a
    # little differently from the PIL processors the zoo builds; without it the backend must match.
    ip, ip2 = getattr(m.processor, "image_processor", m.processor), getattr(again.processor, "image_processor", again.processor)
    same_backend = type(ip) is type(ip2)
    assert same_backend or importlib.util.find_spec("torchvision") is not None
    b, b2 = inputs(m, name), inputs(again, name)
    for k, v in b.inputs.items():
        assert torch.equal(v, b2.inputs[k]) if same_backend or "pixel" not in k else v.shape == b2.inputs[k].shape, k
    assert b.token_map.patches.equals(b2.token_map.patches)
    if m.adapter.vision_only:
        assert torch.equal(m.run(b, read=["vit.out"])["vit.out"], again.run(b, read=["vit.out"])["vit.out"])
    else:
        assert torch.equal(m.forward(b), again.forward(b))


def test_image_text_processor_saves_what_it_needs(tmp_path):
    """The torchvision-free processor keeps OneVision's settings through save/load."""
    m = build("tiny-llava-onevision", vision_aspect_ratio="anyres_max_1")
    m.processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "LlavaOnevisionImageTextProcessor"
    assert saved["vision_aspect_ratio"] == "anyres_max_1" and saved["num_image_tokens"] == 16
    assert "video_processor" not in saved
    again = m.adapter.processor_loader(str(tmp_path))
    assert again.vision_aspect_ratio == "anyres_max_1" and again.tokenizer.get_vocab() == m.processor.tokenizer.get_vocab()
