"""Every paper recipe in configs/paper runs with one command (``mechsink report --recipe FILE``):
each is run offline on the tiny model of its family, with its own sink rule and sections, on the
bundled images with small limits."""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from mechsink.report.pipeline import MAIN_SECTIONS, ReportConfig, read_config, run_report

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
TINY = {"llava-hf/llava-1.5-7b-hf": "tiny-llava", "Qwen/Qwen2.5-VL-7B-Instruct": "tiny-qwen2.5-vl",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf": "tiny-llava-onevision"}
# Qwen2.5-VL computes its own 3-D position ids, so tokens cannot be dropped from its sequence; the
# dual projector needs LLaVA's [items, tokens, d] projector input.
NOT_RUN = {"tiny-qwen2.5-vl": {"subsets", "reorder", "diysink"}}
RUNNABLE = sorted(p for p in PAPER.glob("*.json") if not p.name.endswith(".recipe.json"))


def test_every_recipe_file_reads_as_a_report_config():
    recipes = sorted(PAPER.glob("*.recipe.json"))
    assert len(recipes) == 3 and len(RUNNABLE) == 6
    for p in recipes:                               # the recipe points at its report config
        assert read_config(p) == read_config(PAPER / json.loads(p.read_text())["report"]["config"])
    covered = set()
    for p in RUNNABLE:
        cfg = read_config(p)
        assert cfg.model in TINY
        covered |= set(cfg.sections or MAIN_SECTIONS)
    # every analysis the README lists under "Paper" and the report's sections have a recipe
    assert {"relevance", "decoding", "diysink", "subsets", "reorder", "probes", "ablation", "patching"} <= covered


@pytest.mark.parametrize("path", RUNNABLE, ids=[p.stem for p in RUNNABLE])
def test_recipe_runs_on_the_tiny_model_of_its_family(path, tmp_path):
    cfg = read_config(path)
    small = ReportConfig.from_dict({**cfg.to_dict(), "model": TINY[cfg.model], "data": None, "control": None,
                                    "limit": 6, "causal_limit": 4, "attention_limit": 3, "draws": 2, "batch_size": 3,
                                    "probe_labels": ["planted_label"], "device": None, "dtype": None})
    index = run_report(small, tmp_path / "r")
    numbers = json.loads((index.parent / "manifest.json").read_text())["numbers"]
    for section in small.sections or MAIN_SECTIONS:
        if section != "detection" and section != "attention":
            assert any(k.startswith(f"main.findings.{section}.") for k in numbers), section
    assert "main.findings.sinks.verdict" in numbers
    not_run = {k.split(".")[2] for k in numbers if k.endswith(".not_run")}
    # what a model family cannot run is said in the report; nothing else may fail
    assert not_run <= NOT_RUN.get(small.model, set()), not_run
