"""The report pipeline end to end, as a user runs it: a real CLI subprocess, files on disk, the HTML
rendered by a real headless browser, and a re-run from the manifest reproducing every number."""
import json
import re
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
    # the image is the unit: toy-llava-eval asks 3 questions per image
    assert (numbers["main.findings.sinks.n_images"], numbers["main.findings.sinks.n_questions"]) == (8, 24)
    assert (numbers["main.ablation.n_images"], numbers["main.ablation.n_questions"]) == (6, 16)
    assert (numbers["main.findings.ablation.n_images"], numbers["main.findings.ablation.n_questions"]) == (6, 16)
    assert numbers["main.sinks.images"] == 8                     # each image detected once, not three times
    # no sinks in the toy: its fallback set is top3_norm in every key, never "sink"
    assert numbers["main.sinks.causal_rule_is_fallback"] == 1
    assert "main.ablation.top3_norm_effect.mean" in numbers and "main.ablation.sink_effect.mean" not in numbers
    leaked = [k for k in numbers if k.startswith("main.") and re.search(r"sink", k)
              and not k.startswith(("main.sinks.", "main.findings.sinks."))]
    assert leaked == []
    assert any(k.endswith(".top3_norm") for k in numbers if k.startswith("main.patching."))
    for h in ("sinks", "attention", "probes", "ablation", "patching", "subsets", "reorder"):
        assert numbers[f"main.findings.{h}.verdict"] in ("supported", "not_supported", "not_testable_here")
    assert numbers["control.findings.ablation.verdict"] == "supported"
    # every figure is captioned with what its marks show
    caps = [f["caption"] for f in manifest["artifacts"]["figures"]]
    assert len(caps) >= 10 and all(c and len(c.split()) >= 8 for c in caps), caps
    html = (out / "index.html").read_text()
    assert html.index('id="findings"') < html.index('id="model-and-data"')
    assert not re.search(r">\s*top3_norm[^<]*\bsinks\b", html)
    for title in ("Sink detection (toy-llava)", "Linear probes (toy-llava)", "top3_norm to the front (toy-llava)",
                  "Positive control: planted-llava", "Activation patching (planted-llava)"):
        assert title in html


def test_report_renders_in_a_browser(first_run, tmp_path):
    out, _ = first_run
    try:
        r = check_rendered(out / "index.html", screenshot=tmp_path / "shot.png")
    except BrowserUnavailable as e:
        pytest.skip(f"no headless chromium: {e}")
    assert r["non_blank"] and r["all_images_rendered"]
    assert r["tables_fit"], (r["page_width"], r["table_right_edges"])   # no table wider than the page
    assert r["figure_captions"] and all(len(c.split()) >= 8 for c in r["figure_captions"])
    first = r["first_screen"]                                           # the findings on the first screen
    assert "Findings" in first and first.count("not testable here") + first.count("supported") >= 7
    assert len(r["images"]) >= 10
    assert all(i["width"] > 0 and i["height"] > 0 for i in r["images"])


def test_rerun_from_manifest_reproduces_numbers(first_run, tmp_path):
    out, res = first_run
    again = cli("report", "--from", str(out / "manifest.json"), "--out", str(tmp_path / "b"), "--json")
    assert again["reproduced"] is True and again["differing"] == []
    assert again["numbers"] == res["numbers"]


# -- numbers quoted in the README and docs ------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
QUOTE = re.compile(r"(?:\*\*)?([−\-]?[0-9][0-9.,]*)(?:\*\*)?[×%]?(?:\*\*)?\s*<!-- demo:([\w.\-]+) -->")
VERDICT = re.compile(r"<!-- demo:([\w.\-]+)=(\w+) -->")
# numbers that do not depend on the run's limits (the model's own metrics.json, no sinks at all)
FIXED = ("main.model.accuracy.", "main.sinks.images_with_sinks", "main.sinks.causal_rule_is_fallback")


def quoted():
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        out += [(path.name, k, v.replace("−", "-").replace(",", "")) for v, k in QUOTE.findall(text)]
        out += [(path.name, k, ("verdict", v)) for k, v in VERDICT.findall(text)]
    return out


def mismatches(numbers: dict, keys=None) -> list:
    """Quoted numbers that a manifest's numbers contradict (within the quoted digits)."""
    bad = []
    for where, key, q in quoted():
        if keys is not None and not key.startswith(keys):
            continue
        v = numbers.get(key)
        if isinstance(q, tuple):
            if v != q[1]:
                bad.append((where, key, q[1], v))
            continue
        decimals = len(q.split(".")[1]) if "." in q else 0
        if v is None or abs(float(v) - float(q)) > 0.5 * 10 ** -decimals + 1e-12:
            bad.append((where, key, q, v))
    return bad


def test_numbers_quoted_in_readme_and_docs_match_a_fresh_demo(first_run):
    """Every quoted number names a key the fresh run records; verdicts and numbers that do not
    depend on the run's size are equal. (The remaining quoted numbers are checked against a full
    `mechsink demo` manifest with MECHSINK_DEMO_MANIFEST=path.)"""
    import os
    _, res = first_run
    q = quoted()
    assert len(q) >= 15
    numbers = res["numbers"]
    assert [k for _, k, _ in q if k not in numbers] == []
    verdicts = tuple(k for _, k, v in q if isinstance(v, tuple))
    assert mismatches(numbers, FIXED + verdicts) == []
    full = os.environ.get("MECHSINK_DEMO_MANIFEST")
    if full:
        assert mismatches(json.loads(open(full).read())["numbers"]) == []


def test_quoted_number_check_can_fail():
    assert mismatches({"main.model.accuracy.presence": 0.5}, ("main.model.accuracy.presence",)) != []
