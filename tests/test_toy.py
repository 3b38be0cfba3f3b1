"""The bundled toy LVLM: loads offline, stays small, ships a sound eval set, and actually answers."""
import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from mechsink.errors import MechsinkError
from mechsink.zoo import toy

REQUIRED = {"id": str, "image": str, "prompt": str, "answer": str, "question_type": str,
            "n_items": int, "majority_class": str, "top_left": str, "classes": list}
HAS_FASHION = (toy.FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists()


@pytest.fixture(scope="module")
def bundled():
    model = LlavaForConditionalGeneration.from_pretrained(toy.TOY_DIR).eval()
    return model, LlavaProcessor.from_pretrained(toy.TOY_DIR)


@pytest.fixture(scope="module")
def rows():
    return toy.load_eval_samples()


def test_bundled_folder_loads_offline_with_llava_shape(bundled):
    model, processor = bundled
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.vision_config.model_type == "clip_vision_model" and cfg.text_config.model_type == "llama"
    assert cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == cfg.image_seq_length == 144
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many items ?"}]}],
        add_generation_prompt=True)
    assert text == "USER: <image> how many items ? ASSISTANT:"
    enc = processor(text=text, images=Image.new("L", (84, 84)), return_tensors="pt")
    assert int((enc["input_ids"] == cfg.image_token_id).sum()) == 144
    assert enc["pixel_values"].shape == (1, 3, 84, 84)
    assert processor.tokenizer.unk_token_id not in enc["input_ids"][0].tolist()


def test_folder_is_small_and_pickle_free():
    files = [p for p in toy.TOY_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15 * 2**20
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "training_log.json", "metrics.json", "norm_stats.json"} <= names
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]


def test_eval_set_fields_and_labels_agree(rows):
    assert len({r["image"] for r in rows}) >= 600
    assert {r["question_type"] for r in rows} == {"presence", "global", "local"}
    for r in rows:
        for field, kind in REQUIRED.items():
            assert isinstance(r[field], kind), (r["id"], field)
        assert "<image>" not in r["prompt"] and "USER:" not in r["prompt"]
        assert len(r["answer"].split()) == 1
        assert 1 <= r["n_items"] <= 4 and r["majority_class"] in r["classes"]
        assert r["top_left"] == "nothing" or r["top_left"] in r["classes"]
        if r["prompt"] == "how many items ?":
            assert r["answer"] == toy.NUMBERS[r["n_items"] - 1]
        elif r["prompt"] == "which kind is most common ?":
            assert r["answer"] == r["majority_class"]
        elif r["prompt"] == "what is in the top-left corner ?":
            assert r["answer"] == r["top_left"]
        elif r["question_type"] == "presence":
            asked = r["prompt"].split()[3]
            assert r["answer"] == ("yes" if asked in r["classes"] else "no")
    assert len({r["id"] for r in rows}) == len(rows)
    presence = Counter(r["answer"] for r in rows if r["question_type"] == "presence")
    assert abs(presence["yes"] - presence["no"]) < 0.1 * sum(presence.values())  # POPE-style balance
    first = Image.open(rows[0]["image"])
    assert first.size == (84, 84) and not Path(json.loads(
        (toy.EVAL_DIR / "samples.jsonl").read_text().splitlines()[0])["image"]).is_absolute()


def test_every_answer_and_prompt_word_is_in_the_vocabulary(bundled, rows):
    tok = bundled[1].tokenizer
    words = {w for r in rows for w in (r["prompt"] + " " + r["answer"]).split()}
    assert tok.unk_token_id not in tok.convert_tokens_to_ids(sorted(words))


@pytest.mark.parametrize("qtype", ["presence", "global", "local"])
def test_accuracy_well_above_majority_baseline_on_a_slice(bundled, rows, qtype):
    # 60 samples: +0.2 over the majority answer is about 3 standard errors above guessing it.
    head = [r for r in rows if r["question_type"] == qtype][:60]
    preds = toy.predict(*bundled, head)
    baseline = Counter(r["answer"] for r in head).most_common(1)[0][1] / len(head)
    acc = np.mean([p == r["answer"] for p, r in zip(preds, head)])
    assert acc >= baseline + 0.2, (qtype, acc, baseline)


def test_training_batches_match_what_the_processor_makes(bundled, rows):
    _, processor = bundled
    r = rows[2]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
        add_generation_prompt=True)
    enc = processor(text=text, images=Image.open(r["image"]), return_tensors="pt")
    batch = toy.Batcher(processor.tokenizer).encode([[r]])
    pos = int(batch["answer_pos"][0, 0])
    assert torch.equal(batch["input_ids"][0, :pos], enc["input_ids"][0])
    assert batch["input_ids"][0, pos] == processor.tokenizer.convert_tokens_to_ids(r["answer"])
    canvas = np.asarray(Image.open(r["image"]))
    assert torch.equal(toy.pixels(canvas[None]), enc["pixel_values"])


def test_saved_metrics_and_norm_stats_are_complete(bundled):
    model, _ = bundled
    metrics = json.loads((toy.TOY_DIR / "metrics.json").read_text())
    assert metrics["n_images"] >= 600 and set(metrics["by_type"]) == set(toy.QUESTION_TYPES)
    stats = json.loads((toy.TOY_DIR / "norm_stats.json").read_text())
    layers = stats["layers"]
    assert [l["layer"] for l in layers] == list(range(model.config.vision_config.num_hidden_layers + 1))
    assert sum(l["feeds_projector"] for l in layers) == 1
    for l in layers:
        assert 1.0 <= l["max_over_median"]["median"] <= l["max_over_median"]["max"]
        assert 0.0 <= l["frac_images_with_outlier"] <= 1.0 and 0.0 <= l["outlier_on_background"] <= 1.0
    log = json.loads((toy.TOY_DIR / "training_log.json").read_text())
    assert log["records"] and log["final_validation"]


def test_norm_stats_agree_with_a_direct_vit_pass(bundled, rows, tmp_path):
    model, processor = bundled
    sub = tmp_path / "samples.jsonl"
    picked = [r for r in rows if r["question_type"] == "local"][:5]
    sub.write_text("".join(json.dumps({**r, "image": r["image"]}) + "\n" for r in picked))
    stats = toy.norm_stats(toy.TOY_DIR, sub, write=False)
    pv = processor.image_processor(images=[Image.open(r["image"]) for r in sorted(picked, key=lambda r: r["image"])],
                                   return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-1][:, 1:].norm(dim=-1)
    ratio = (feats.max(1).values / feats.median(1).values).median()
    last = stats["layers"][-1]
    assert last["feeds_projector"] and last["max_over_median"]["median"] == pytest.approx(float(ratio), rel=1e-5)
    assert stats["n_images"] == 5


def test_missing_files_raise_one_line_errors(tmp_path):
    with pytest.raises(MechsinkError, match="no toy model"):
        toy.load_toy(tmp_path)
    with pytest.raises(MechsinkError, match="no evaluation set"):
        toy.load_eval_samples(tmp_path / "nope.jsonl")


@pytest.mark.skipif(not HAS_FASHION, reason="needs the dataset-fashion-mnist Debian package")
def test_eval_images_regenerate_bit_exactly_from_held_out_items(rows):
    canvases, scenes, _ = toy.make_split(20_000, 10, toy.load_fashion("t10k"))
    for i in range(10):
        assert np.array_equal(canvases[i], np.asarray(Image.open(toy.EVAL_DIR / f"images/{i:04d}.png")))
    assert [r["cells"] for r in rows[:30:3]] == [[c or "nothing" for c in s.cells] for s in scenes]


@pytest.mark.skipif(not HAS_FASHION, reason="needs the dataset-fashion-mnist Debian package")
def test_training_is_seeded_and_saves_a_loadable_folder(tmp_path):
    tiny = toy.ToyConfig(vit_hidden=16, vit_layers=1, vit_heads=2, llm_hidden=16, llm_layers=1, llm_heads=2)
    tc = toy.TrainConfig(steps=2, batch_images=2, val_images=2, val_every=2, log_every=1)
    logs = [toy.train(tmp_path / name, tc, tiny) for name in ("a", "b")]
    assert [r["loss"] for r in logs[0]["records"]] == [r["loss"] for r in logs[1]["records"]]
    model, processor = toy.load_toy(tmp_path / "a")
    assert model.config.vision_config.hidden_size == 16 and processor.image_token_id == model.config.image_token_id
    assert json.loads((tmp_path / "a" / "training_log.json").read_text())["steps_done"] == 2
