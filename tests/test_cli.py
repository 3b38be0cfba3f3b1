"""The CLI as a user runs it: a real subprocess, JSON on stdout, one-line errors."""
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "mechsink.cli", *args], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"mechsink {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def test_inspect_json_lists_sites_and_token_map():
    p = run_cli("inspect", "--model", "tiny-llava", "--json")
    d = json.loads(p.stdout)
    assert d["sites"][0] == "vit.embed" and d["sites"][-1] == "llm.logits"
    assert "vit.out" in d["sites"] and "proj.out" in d["sites"]
    assert d["shapes"]["vit.out"] == [1, 16, 32]
    tm = d["token_map"]
    assert len(tm) == 16
    # identity layout: row-major patches occupy consecutive LLM positions
    first = tm[0]["llm_pos"]
    assert [(t["row"], t["col"], t["llm_pos"] - first) for t in tm] == [(i // 4, i % 4, i) for i in range(16)]
    assert {"llm_pos", "tile", "row", "col"} <= set(tm[0])


def test_inspect_saved_directory(tmp_path):
    import mechsink
    m = mechsink.load("tiny-llava")
    m.hf.save_pretrained(tmp_path)
    m.processor.save_pretrained(tmp_path)
    p = run_cli("inspect", "--model", str(tmp_path), "--json")
    assert json.loads(p.stdout)["family"] == "llava"


@pytest.mark.parametrize("args, needle", [
    (("inspect", "--model", "no-such-model"), "cannot open model"),
    (("inspect", "--model", "tiny-llava", "--image", "/nonexistent.png"), "image not found"),
])
def test_bad_input_is_one_line_error(args, needle):
    p = run_cli(*args, check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], p.stderr


def test_corrupt_image_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    p = run_cli("inspect", "--model", "tiny-llava", "--image", str(bad), check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "cannot read image" in p.stderr


def test_every_option_has_help_and_flags_are_plain_flags():
    import typer.main

    from mechsink.cli import app
    cmd = typer.main.get_command(app)
    missing = [(n, p.opts) for n, sub in cmd.commands.items() for p in sub.params if not getattr(p, "help", None)]
    assert missing == []
    p = subprocess.run([sys.executable, "-m", "mechsink.cli", "report", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--json" in p.stdout and "--resume" in p.stdout
    assert "<bool>" not in p.stdout                                  # a flag takes no value


def test_unreachable_hub_is_one_line_without_retries(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))   # a closed local port
    p = subprocess.run([sys.executable, "-m", "mechsink.cli", "inspect", "--model", "someorg/nosuchmodel"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) <= 2 and lines[-1].startswith("error: cannot open model 'someorg/nosuchmodel'"), p.stderr
    assert "retry" not in p.stderr.lower() and "Traceback" not in p.stderr
