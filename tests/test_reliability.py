"""Bad input, as an adversarial user gives it: every case ends in a finished result with the bad
items listed, or in exit code 2 with one line -- never a hang, a traceback or a lost result.
(Store corruption, locks and disk-full cases live in test_store_integrity.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mechsink
from mechsink.cli import app

FAMILIES = ["tiny-llava", "tiny-llava-next", "tiny-llava-onevision", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-gemma3"]
BIN = str(Path(sys.executable).parent / "mechsink")


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_line_error(code, err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return code == 2 and len(lines) == 1 and lines[0].startswith("error: ")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A dataset with a device, a FIFO, 1000x1 and 4000x300 images among good ones."""
    d = tmp_path_factory.mktemp("hostile")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(d / "good.png")
    Image.new("RGB", (1000, 1)).save(d / "wide.png")
    Image.new("RGB", (4000, 300)).save(d / "long.png")
    os.mkfifo(d / "fifo.png")
    rows = [("a", "good.png"), ("b", "wide.png"), ("c", "long.png"), ("d", "/dev/zero"), ("e", "fifo.png"),
            ("f", "good.png")]
    (d / "data.jsonl").write_text("".join(json.dumps({"id": i, "image": im, "question": "Is it red?", "answer": "yes"})
                                          + "\n" for i, im in rows))
    return d


@pytest.mark.parametrize("family", FAMILIES)
def test_devices_fifos_and_extreme_aspect_ratios_are_listed_not_fatal(family, hostile, tmp_path):
    code, out, err = run("sinks", "-m", family, "--data", hostile / "data.jsonl", "--rule", "topk", "-p", "k=2",
                         "--json", "--errors", tmp_path / "errors.jsonl")
    assert code == 0, err
    done = json.loads(out)
    listed = [json.loads(l) for l in (tmp_path / "errors.jsonl").read_text().splitlines()]
    ids = {r["sample_id"] for r in listed}
    assert {"d", "e"} <= ids                                      # /dev/zero and the FIFO never hang
    assert len(done) + len(ids) == 6 and len(done) >= 2           # both good images always go through
    for r in listed:
        assert r["reason"] and "\n" not in r["reason"]


def test_statistics_that_pair_images_rebatch_a_last_batch_of_one():
    for args in (["ablate", "--mode", "resample"], ["patch"]):
        code, out, err = run(*args, "-m", "planted-llava", "-n", "3", "--batch-size", "2", "--draws", "2", "--json")
        assert code == 0, err
        assert json.loads(out)["n"] == 3


def test_model_folders_that_are_unsafe_or_broken_fail_in_one_line(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {"AutoConfig": "x.Config"}}))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    pickled = tmp_path / "pickled"
    m = mechsink.load("tiny-llava")
    m.hf.save_pretrained(pickled)
    m.processor.save_pretrained(pickled)
    from safetensors.torch import load_file
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    for folder, needle in ((remote, "never runs"), (corrupt, "not valid JSON"), (pickled, "safetensors")):
        code, _, err = run("inspect", "-m", folder)
        assert one_line_error(code, err) and needle in err, err


def test_outputs_that_cannot_be_written_fail_before_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run("cache", "-m", "planted-llava", "-n", "2", "--out", afile / "store")
    assert one_line_error(code, err), err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): no read-only folder to test")
        code, _, err = run("cache", "-m", "planted-llava", "-n", "2", "--out", ro / "store")
        assert one_line_error(code, err), err
    finally:
        ro.chmod(0o700)


def test_an_unwritable_side_file_never_costs_the_result(hostile):
    code, out, err = run("sinks", "-m", "tiny-llava", "--data", hostile / "data.jsonl", "--rule", "topk", "-p", "k=2",
                         "--json", "--errors", "/proc/no/such/errors.jsonl")
    assert code == 0 and len(json.loads(out)) == 4
    assert "could not write" in err


def test_bad_options_are_one_line_errors():
    for args, needle in ((["sinks", "-m", "planted-llava", "-p", "tau=abc"], "must be a number"),
                         (["sinks", "-m", "planted-llava", "--batch-size", "0"], "at least 1"),
                         (["sinks", "-m", "planted-llava", "--device", "cuda"], "cuda"),
                         (["ablate", "-m", "planted-llava", "--mode", "nope"], "mode")):
        if args[-1] == "cuda" and torch.cuda.is_available():
            continue
        code, _, err = run(*args)
        assert one_line_error(code, err) and needle in err, (args, err)


def test_manifest_keys_of_colliding_labels_differ():
    from mechsink.report.pipeline import _part
    assert _part("presence") == "presence"
    keys = {_part(x) for x in ("颜色", "形状", "x y", "x_y", "x-y")}
    assert len(keys) == 5 and all(k.replace("-", "").replace("_", "").isalnum() for k in keys)


def test_interrupt_says_what_was_saved(tmp_path):
    """SIGINT during a long cache run: one line saying how to resume, exit 130, and the same command
    then resumes to a finished store."""
    out = tmp_path / "store"
    cmd = [BIN, "cache", "-m", "toy-llava", "-n", "160", "--batch-size", "4", "--sites", "vit.out", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # a shell's background jobs inherit an ignored SIGINT: give the command the default disposition
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(600):                       # wait until the first shard journal exists
            if any(out.glob("**/*.tmp")) or any(out.glob("shards/*")):
                break
            if p.poll() is not None:
                break
            import time
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    if p.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    errors = [l[l.index("error:"):] for l in err.replace("\r", "\n").splitlines() if "error:" in l]
    assert p.returncode == 130 and len(errors) == 1 and errors[0].startswith("error: interrupted"), err
    assert "resume" in errors[0] and "Traceback" not in err
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)     # the same command resumes
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["n_samples"] == 160


# -- the report: nothing the data says becomes markup -----------------------------------------------
PAYLOAD = '<img src=x onerror=alert(1)><script>alert(2)</script>'


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]


@pytest.mark.browser
def test_html_payloads_in_names_and_labels_stay_text(tmp_path):
    from mechsink.report.browser import _run, find_chromium
    from mechsink.report.pipeline import ReportConfig, run_report
    from mechsink.zoo import planted
    browser = find_chromium()
    if browser is None:
        pytest.skip("no Chromium: the report's DOM is checked in a real browser (installed by .ci/run)")
    model_dir = tmp_path / f"model {PAYLOAD.replace('/', '')}"
    m = mechsink.load("planted-llava")
    m.hf.save_pretrained(model_dir)
    m.processor.save_pretrained(model_dir)
    images, rows = planted.load_eval(limit=6)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    lines = []
    for i, (im, r) in enumerate(zip(images, rows)):
        im.save(data_dir / f"{i}.png")
        lines.append({"id": f"{i}{PAYLOAD}", "image": f"{i}.png", "question": planted.PROMPT, "answer": r["answer"],
                      "question_type": PAYLOAD if i % 2 else "plain", "folder": PAYLOAD})
    data = data_dir / f"x{PAYLOAD.replace('/', '')}.jsonl"
    data.write_text("".join(json.dumps(l) + "\n" for l in lines))
    cfg = ReportConfig(model=str(model_dir), data=str(data), control=None, limit=6, causal_limit=4, attention_limit=2,
                       draws=2, batch_size=3, probe_labels=("folder",), title=f"t{PAYLOAD}")
    index = run_report(cfg, tmp_path / "report", sections=("detection", "ablation"))
    with tempfile.TemporaryDirectory() as profile:
        dom = _run(browser, ["--dump-dom", index.resolve().as_uri()], Path(profile), 120)
    parsed = _Tags()
    parsed.feed(dom)
    ours = {"html", "head", "meta", "title", "style", "body", "main", "header", "nav", "h1", "h2", "h3", "ol", "ul", "li",
            "a", "p", "strong", "em", "code", "section", "figure", "img", "figcaption", "div", "table", "caption",
            "thead", "tbody", "tr", "th", "td", "span", "footer", "br", "hr", "details", "summary", "pre", "small",
            "link", "sup", "sub", "b", "i", "blockquote", "colgroup", "col", "aside", "dl", "dt", "dd"}
    assert "script" not in parsed.tags and set(parsed.tags) <= ours, set(parsed.tags) - ours
    assert not [a for a in parsed.attrs if a[1].startswith("on")], "event-handler attributes in the page"
    assert all(v.startswith("data:image/png;base64,") for t, k, v in parsed.attrs if t == "img" and k == "src")
    assert "alert(1)" in dom                               # the payload is there, as text


def test_a_logprob_run_records_no_candidate_answers():
    """`ablate --json` on a colour task used to record answers ["yes", "no"] it never read."""
    code, out, err = run("ablate", "-m", "planted-llava", "-n", "4", "--draws", "2", "--json")
    assert code == 0, err
    metric = json.loads(out)["config"]["metric"]
    assert metric["name"] == "logprob" and metric["answers"] == []
    code, out, err = run("ablate", "-m", "planted-llava", "-n", "4", "--draws", "2", "--metric", "logit_diff",
                         "--answers", "red,green,blue", "--json")
    assert code == 0 and json.loads(out)["config"]["metric"]["answers"] == ["red", "green", "blue"], err


def test_cache_lists_what_the_processor_refuses(hostile, tmp_path):
    code, out, err = run("cache", "-m", "tiny-llava-next", "--data", hostile / "data.jsonl", "--out", tmp_path / "s",
                         "--sites", "vit.out", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["summary"]["n_samples"] == 2 and res["errors"]["by_kind"] == {"not_a_file": 2, "processing": 2}
    listed = {json.loads(l)["sample_id"] for l in (tmp_path / "s" / "errors.jsonl").read_text().splitlines()}
    assert listed == {"b", "c", "d", "e"}
