"""What a reviewer reads in a report (issue 12): honest labels for a fallback token set, findings
first, captions, numbers, tables that fit, a fresh working folder per run, and cleanup on failure."""
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest

from mechsink.errors import MechsinkError
from mechsink.report import Report
from mechsink.report import findings as FD
from mechsink.report import pipeline as PL
from mechsink.report.sections import _ratio_text
from mechsink.sinks import SinkSpec


def _ctx(fallback: bool):
    spec = SinkSpec(rule="topk", params={"k": 3}) if fallback else SinkSpec()
    return PL._Ctx(key="main", model=None, data=None, spec=SinkSpec(), causal_spec=spec, fallback=fallback)


def test_fallback_token_set_is_never_called_sinks():
    c = _ctx(True)
    assert c.label == "top3_norm"
    assert [c.name(v) for v in ("sinks", "nonsinks", "sink_effect", "sink", "random", "image", "non-sinks")] == \
        ["top3_norm", "not_top3_norm", "top3_norm_effect", "top3_norm", "random", "image", "not_top3_norm"]
    assert _ctx(False).name("sink_effect") == "sink_effect" and _ctx(False).label == "sinks"


def test_findings_come_first_with_effect_ci_p_images_and_verdict(tmp_path):
    rep = Report("t")
    rep.text("intro")
    rep.section("Ablation")
    rep.text("details")
    rows = []
    FD.add(rows, "main.findings.ablation", "m", "diff", effect=0.5, ci=(0.2, 0.8), p=0.001, n_images=80,
           n_questions=240, verdict=FD.verdict_of(0.001, 0.5))
    FD.add(rows, "main.findings.reorder", "m", "diff", effect=6.9e-18, ci=(-0.1, 0.1), p=1.0, n_images=8,
           n_questions=24, verdict=FD.verdict_of(1.0, 0.0, two_sided=True))
    FD.write(rep, rows)
    page = rep.write(tmp_path).read_text()
    assert page.index('id="findings"') < page.index('id="ablation"')
    assert page.index("intro") < page.index('id="findings"')
    found = page[page.index('id="findings"'):page.index('id="ablation"')]
    assert "0.5 [0.2, 0.8]" in found and "0.001" in found and "80 / 240" in found and ">supported<" in found
    assert "6.9e-18" not in found and ">0 [-0.1, 0.1]<" in found          # rounding noise is not an effect
    assert (tmp_path / "tables" / "findings.csv").exists() and "Table 1" not in found   # first, unnumbered
    n = rep.numbers
    assert n["main.findings.ablation.n_images"] == 80 and n["main.findings.ablation.verdict"] == "supported"
    assert n["main.findings.reorder.verdict"] == "not_supported"
    assert FD.verdict_of(0.01, -0.3) == FD.NOT_SUPPORTED                  # significant, wrong direction
    assert FD.verdict_of(None, None) == FD.NOT_TESTABLE


def test_image_counts_from_samples():
    class S:
        def __init__(self, i, path):
            self.id, self.image_path, self.labels = str(i), path, {}
    samples = [S(i, f"/img/{i // 3}.png") for i in range(240)]
    assert FD.counts(samples) == (80, 240)
    assert [s.id for s in FD.unique_images(samples)[:3]] == ["0", "3", "6"]


def test_wide_tables_are_split_and_no_negative_zero_in_csv(tmp_path):
    rep = Report("t")
    df = pd.DataFrame(np.arange(26, dtype=float).reshape(2, 13), columns=[f"c{i}" for i in range(13)])
    df.iloc[0, 1] = -0.0
    rep.table(df, "wide", index=False)
    out = rep.write(tmp_path)
    page = out.read_text()
    tables = re.findall(r"<table>.*?</table>", page, flags=re.S)
    assert len(tables) == 2
    assert all(t.count("<th>") <= 8 for t in tables)
    assert all("<th>c0</th>" in t for t in tables)                       # the key column repeats
    assert "part 1 of 2" in page and "part 2 of 2" in page
    assert "-0" not in (tmp_path / "tables" / "table-01.csv").read_text()


def test_ratio_with_zero_denominator_is_shown_as_such():
    r = pd.Series({"ratio": 7.2e10, "ci_low": 7.2e10, "ci_high": 7.2e10, "sink_mean": 0.33, "nonsink_mean": 4.6e-12})
    assert _ratio_text(r).startswith("n/a: denominator ~0")
    r2 = pd.Series({"ratio": 2.5, "ci_low": 1.5, "ci_high": 4.0, "sink_mean": 0.3, "nonsink_mean": 0.12})
    assert _ratio_text(r2) == "2.5 [1.5, 4]"


def test_rerun_starts_a_fresh_work_folder_unless_resumed(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    (out / "work").mkdir(parents=True)
    (out / "work" / PL.WORK_MARK).write_text("")
    (out / "work" / "old-cache").write_text("stale")
    seen = []

    def fake(config, out_, work, sections, control_sections):
        seen.append((work / "old-cache").exists())
        (work / "new-cache").write_text("x")
        return out_ / "index.html"
    monkeypatch.setattr(PL, "_run", fake)
    PL.run_report(PL.ReportConfig(), out, resume=True)
    PL.run_report(PL.ReportConfig(), out)
    assert seen == [True, False]
    # a work folder mechsink did not write is never deleted
    other = tmp_path / "other"
    (other / "work").mkdir(parents=True)
    with pytest.raises(MechsinkError, match="not written by mechsink"):
        PL.run_report(PL.ReportConfig(), other)


def test_failed_run_removes_what_it_created(tmp_path, monkeypatch, caplog):
    def boom(*a):
        raise MechsinkError("model not found")
    monkeypatch.setattr(PL, "_run", boom)
    fresh = tmp_path / "fresh"
    with pytest.raises(MechsinkError):
        PL.run_report(PL.ReportConfig(), fresh)
    assert not fresh.exists()                                           # no empty folder left behind
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(MechsinkError):
        PL.run_report(PL.ReportConfig(), kept)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    assert "removed" in caplog.text and str(kept) in caplog.text


def test_every_report_figure_is_captioned_with_its_bars():
    """Each rep.figure call in the report's sections passes a caption that names what the marks
    are (bars, bands, points, cells, lines) -- never a bare 'Figure N'."""
    src = (Path(PL.__file__).parent / "sections.py").read_text()
    calls = re.findall(r"rep\.figure\((.*?)\n\s{4}\S", src, flags=re.S)
    assert len(calls) >= 8
    for call in calls:
        assert re.search(r"(Histogram|Bars|bands|Points|Cells|line)", call), call


def test_norm_bins_are_named_without_float_noise():
    from mechsink.report.sections import _bin_labels
    b = pd.DataFrame({"layer": [0, 0, 1], "bin": ["x", "y", "x"], "bin_low": [1.6840000000000002, 0.5, 1.6840000000000002],
                      "bin_high": [3.069, 1.6840000000000002, 3.069]})
    assert _bin_labels(b)["bin"].tolist() == ["Q2: 1.68–3.07", "Q1: 0.5–1.68", "Q2: 1.68–3.07"]


def test_readme_cli_examples_work_after_the_first_command():
    import sys
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    for block in blocks[1:]:                         # after the set-up block: mechsink must be on the PATH
        lines = [l.split(" #")[0].strip() for l in block.splitlines() if l.strip()]
        first = next((i for i, l in enumerate(lines) if re.match(r"mechsink\s", l)), None)
        if first is not None:
            assert any("source .venv/bin/activate" in l for l in lines[:first]), block
    # the download tool docs/gpu.md names is installed in the venv
    gpu = (root / "docs" / "gpu.md").read_text()
    assert "huggingface-cli" not in gpu and ".venv/bin/hf download" in gpu
    assert (Path(sys.executable).parent / "hf").exists()
