"""The report pipeline end to end, as a user runs it: a real CLI subprocess, files on disk, the HTML
rendered by a real headless browser, and a re-run from the manifest reproducing every number."""
import json
import subprocess
import sys

import pytest

from mechsink.report.browser import BrowserUnavailable, check_rendered


def cli(*args):
    p = subprocess.run([sys.executable, "-m", "mechsink.cli", *args], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "a"
    res = cli("report", "--model", "toy-llava", "--control", "planted-llava", "--limit", "24",
              "--causal-limit", "16", "--draws", "4", "--out", str(out), "--json")
    return out, res


def test_report_files_and_numbers(first_run):
    out, res = first_run
    manifest = json.loads((out / "manifest.json").read_text())
    numbers = manifest["numbers"]
    assert res["numbers"] == numbers
    assert manifest["config"]["model"] == "toy-llava" and manifest["config"]["control"] == "planted-llava"
    assert set(manifest["models"]) == {"toy-llava", "planted-llava"}
    assert {"torch", "transformers", "nnsight"} <= set(manifest["versions"])
    # the positive control must show its known answer: sinks found, ablation effect far above random
    assert numbers["control.sinks.images_with_sinks"] == numbers["control.sinks.images"] > 0
    assert numbers["control.sinks.mean_per_image"] == 3
    assert numbers["control.ablation.sink_effect.ci_low"] > numbers["control.ablation.random_effect.ci_high"]
    assert numbers["control.ablation.p_value"] < 0.01
    for key in ("main.sinks.images", "main.ablation.p_value", "main.norms.layer0.max_over_median"):
        assert key in numbers
    html = (out / "index.html").read_text()
    for title in ("Sink detection (toy-llava)", "Linear probes (toy-llava)", "Sink-to-the-front (toy-llava)",
                  "Positive control: planted-llava", "Activation patching (planted-llava)"):
        assert title in html


def test_report_renders_in_a_browser(first_run, tmp_path):
    out, _ = first_run
    try:
        r = check_rendered(out / "index.html", screenshot=tmp_path / "shot.png")
    except BrowserUnavailable as e:
        pytest.skip(f"no headless chromium: {e}")
    assert r["non_blank"] and r["all_images_rendered"]
    assert len(r["images"]) >= 10
    assert all(i["width"] > 0 and i["height"] > 0 for i in r["images"])


def test_rerun_from_manifest_reproduces_numbers(first_run, tmp_path):
    out, res = first_run
    again = cli("report", "--from", str(out / "manifest.json"), "--out", str(tmp_path / "b"), "--json")
    assert again["reproduced"] is True and again["differing"] == []
    assert again["numbers"] == res["numbers"]
