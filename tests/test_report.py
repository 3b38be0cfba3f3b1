"""Report writer, manifest and figures: real files on disk, determinism, and a real browser render."""

import base64
import hashlib
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from mechsink.report import Report, ReportError, build_manifest, canonical_json, hash_directory, hash_file, to_jsonable
from mechsink.report import figures as F
from mechsink.report.browser import check_rendered, colour_pixels, decode_embedded_images, find_chromium
from mechsink.stats import compare_paired, comparison_frame

MAGENTA, CYAN = "#ff00ff", "#00c8ff"  # appear nowhere else on the page
PATCH = 0.2  # side of the colour patch, as a fraction of the figure


# --------------------------------------------------------------------------------- manifest


def test_to_jsonable_normalises_and_rounds():
    out = to_jsonable({"a": np.float32(0.1), "b": np.int64(3), "c": float("nan"), "d": [1.0 / 3, np.inf, -np.inf],
                       "e": (np.bool_(True), None), "f": np.arange(3)})
    assert out == {"a": 0.100000001490, "b": 3, "c": None, "d": [0.333333333333, "inf", "-inf"], "e": [True, None],
                   "f": [0, 1, 2]}
    assert type(out["b"]) is int and type(out["e"][0]) is bool
    # last-bit float noise does not change the JSON
    assert canonical_json({"x": 0.1 + 0.2}) == canonical_json({"x": 0.3})
    with pytest.raises(ReportError, match=r"config\.model has type object"):
        to_jsonable({"model": object()}, where="config")


def test_canonical_json_sorted_and_strict():
    text = canonical_json({"b": 1, "a": {"d": float("nan"), "c": 2}})
    assert text == '{\n  "a": {\n    "c": 2,\n    "d": null\n  },\n  "b": 1\n}'
    json.loads(text)


def test_hash_directory_tracks_content_and_names_not_location(tmp_path):
    def make(root, payload=b"weights"):
        (root / "sub").mkdir(parents=True)
        (root / "config.json").write_text('{"hidden_size": 8}')
        (root / "sub" / "model.safetensors").write_bytes(payload)
        return root

    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    assert hash_directory(a) == hash_directory(b)  # location does not matter
    os.utime(b / "config.json", (0, 0))
    assert hash_directory(a) == hash_directory(b)  # nor do timestamps
    c = make(tmp_path / "c", payload=b"weightz")
    assert hash_directory(c) != hash_directory(a)
    (b / "sub" / "model.safetensors").rename(b / "sub" / "renamed.safetensors")
    assert hash_directory(b) != hash_directory(a)
    (a / "extra").write_bytes(b"")
    assert hash_directory(a) != hash_directory(make(tmp_path / "d"))
    assert hash_file(a / "config.json") == "sha256:" + hashlib.sha256(b'{"hidden_size": 8}').hexdigest()
    assert hash_directory(a / "config.json") == hash_file(a / "config.json")
    with pytest.raises(ReportError, match="no such file"):
        hash_directory(tmp_path / "missing")


def test_build_manifest_contents_and_hashes(tmp_path):
    model_dir = tmp_path / "toy"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    m = build_manifest({"k": 4, "mode": "mean"}, {"draws": 0}, {"toy.x": 0.5}, {"toy": model_dir, "hub": "org/model"},
                       {"images": "sha256:abc"})
    for key in ("config", "config_sha256", "seeds", "numbers", "models", "data", "versions", "platform", "created",
                "content_sha256", "manifest_version"):
        assert key in m
    assert set(m["versions"]) >= {"python", "torch", "transformers", "nnsight", "transformer_lens", "numpy", "pandas",
                                  "sklearn", "mechsink"}
    assert m["versions"]["numpy"] == np.__version__ and m["versions"]["mechsink"]
    assert m["models"]["toy"]["sha256"] == hash_directory(model_dir)
    assert m["models"]["hub"] == {"ref": "org/model"}
    # the config hash ignores key order, and the content hash ignores the creation time
    again = build_manifest({"mode": "mean", "k": 4}, {"draws": 0}, {"toy.x": 0.5}, {"toy": model_dir, "hub": "org/model"},
                           {"images": "sha256:abc"})
    assert again["config_sha256"] == m["config_sha256"] and again["content_sha256"] == m["content_sha256"]
    assert build_manifest({"k": 5})["config_sha256"] != m["config_sha256"]
    assert build_manifest({"k": 4, "mode": "mean"}, numbers={"toy.x": 0.6})["content_sha256"] != m["content_sha256"]


# ---------------------------------------------------------------------------------- figures


def effect_frame():
    rng = np.random.default_rng(0)
    comps = {
        "toy": compare_paired(rng.normal(1.0, 1, 30), rng.normal(0, 1, (30, 4)), n_boot=500, n_perm=500),
        "tiny": compare_paired(rng.normal(0.3, 1, 30), rng.normal(0, 1, (30, 4)), n_boot=500, n_perm=500),
    }
    return comps, comparison_frame(comps)


def test_effect_plot_draws_each_estimate_with_its_interval():
    _, df = effect_frame()
    fig = F.effect_plot(df)
    ax = fig.axes[0]
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sink", "random", "diff"]
    points = [l for l in ax.lines if l.get_marker() == "o"]
    assert len(points) == 3
    for line, cond in zip(points, ["sink", "random", "diff"]):
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), df[df["condition"] == cond]["mean"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["toy", "tiny"]


def test_norm_histogram_counts_tokens_above_threshold():
    norms = np.array([10, 20, 30, 40, 50, 60, 70, 150, 160, 170, np.nan])
    fig = F.norm_histogram(norms, threshold=100)
    label = fig.axes[0].get_legend().get_texts()[0].get_text()
    assert "3 of 10 above (30.00 %)" in label
    assert sum(p.get_height() for p in fig.axes[0].patches) == 10


def test_layer_heatmap_accuracy_and_binned_bar():
    long = pd.DataFrame([{"layer": l, "head": h, "share": l + h / 10} for l in range(4) for h in range(3)])
    fig = F.layer_heatmap(long, index="layer", columns="head", values="share")
    mesh = fig.axes[0].collections[0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(4, 3)[2], [2.0, 2.1, 2.2])
    acc = pd.DataFrame({"layer": [0, 1, 2, 0, 1, 2], "tokens": ["sinks"] * 3 + ["nonsinks"] * 3,
                        "accuracy": [0.5, 0.7, 0.9, 0.5, 0.55, 0.6]})
    fig = F.accuracy_by_layer(acc, hue="tokens", chance=0.5)
    np.testing.assert_allclose(np.asarray(fig.axes[0].lines[0].get_ydata(), float), [0.5, 0.7, 0.9])
    bars = pd.DataFrame({"bin": ["global", "local"], "value": [40.0, 58.0], "lo": [37.0, 55.0], "hi": [43.0, 61.0]})
    fig = F.binned_bar(bars, low="lo", high="hi")
    assert [p.get_height() for p in fig.axes[0].patches] == [40.0, 58.0]
    with pytest.raises(ReportError, match=r"lacks columns \['accuracy'\]"):
        F.accuracy_by_layer(acc.drop(columns="accuracy"))


# ----------------------------------------------------------------------------------- report


def patched(fig: Figure, colour: str) -> Figure:
    """Add a solid colour square in the figure's corner, so the browser test can find the figure."""
    fig.add_artist(Rectangle((0.0, 0.0), PATCH, PATCH, transform=fig.transFigure, color=colour, zorder=10))
    return fig


def build_report(model_dir) -> Report:
    comps, df = effect_frame()
    r = Report("Toy model: sinks vs random", config={"ablation": {"k": 4, "mode": "mean"}}, seeds={"draws": 0},
               models={"toy": model_dir}, data={"images": "sha256:0123"})
    r.section("Ablation", "Sinks vs **matched random** tokens, `k = 4`.")
    r.numbers_from("toy.ablation", comps["toy"].to_dict())
    r.text(f"Sink effect {r.number('toy.ablation.sink.mean', comps['toy'].sink.mean)}.")
    r.figure(patched(F.effect_plot(df), MAGENTA), "Sink vs random effect")
    r.section("Norms")
    r.figure(patched(F.norm_histogram(np.random.default_rng(1).gamma(5, 8, 2000), 100), CYAN), "Token norms")
    r.table(df.round(4), "Effects with 95 % CIs")
    return r


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x01" * 128)
    return d


def test_report_writes_files_and_manifest(tmp_path, model_dir):
    index = build_report(model_dir).write(tmp_path / "out")
    assert index == tmp_path / "out" / "index.html"
    page = index.read_text()
    assert page.count("<img ") == 2 and "<table>" in page and "<script" not in page
    assert 'href="#ablation"' in page and 'id="ablation"' in page and 'href="#recorded-numbers"' in page
    assert "<strong>matched random</strong>" in page
    sizes = decode_embedded_images(page)
    assert len(sizes) == 2 and all(w > 300 and h > 300 for w, h in sizes)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    comps, _ = effect_frame()
    assert m["numbers"]["toy.ablation.diff.mean"] == pytest.approx(comps["toy"].diff.mean, rel=1e-11)
    assert m["numbers"]["toy.ablation.test"] == comps["toy"].test
    assert {"toy.ablation.sink.mean", "toy.ablation.p_value", "toy.ablation.diff.ci_low"} <= set(m["numbers"])
    assert m["models"]["toy"]["sha256"] == hash_directory(model_dir)
    assert len(m["artifacts"]["figures"]) == 2 and m["artifacts"]["tables"][0]["file"] == "tables/table-01.csv"
    csv = pd.read_csv(tmp_path / "out" / "tables" / "table-01.csv")
    assert list(csv["condition"]) == ["sink", "random", "diff", "sink", "random", "diff"]
    # every recorded number is shown in the page
    for key in m["numbers"]:
        assert f"<td>{key}</td>" in page


def test_report_is_deterministic_apart_from_created(tmp_path, model_dir):
    a = build_report(model_dir).write(tmp_path / "a")
    b = build_report(model_dir).write(tmp_path / "b")
    ma, mb = (json.loads((p.parent / "manifest.json").read_text()) for p in (a, b))
    assert ma.pop("created") and mb.pop("created")
    assert ma == mb
    strip = lambda text: re.sub(r"Created [^ ]+", "", text)  # noqa: E731
    assert strip(a.read_text()) == strip(b.read_text())


def test_report_numbers_refuse_silent_replacement():
    r = Report("t")
    assert r.number("a.b", 0.123456) == "0.1235"
    assert r.number("a.b", 0.123456) == "0.1235"  # same value again is fine
    with pytest.raises(ReportError, match="already recorded"):
        r.number("a.b", 0.5)
    with pytest.raises(ReportError, match="dotted words"):
        r.number("a b", 1)
    with pytest.raises(ReportError, match="scalar"):
        r.number("a.c", [1, 2])
    assert r.number("a.nan", float("nan")) == "n/a" and r.numbers["a.nan"] is None
    with pytest.raises(ReportError, match="DataFrame"):
        r.table([[1, 2]])


def test_rewrite_removes_stale_tables_only(tmp_path):
    r = Report("t")
    r.table(pd.DataFrame({"x": [1]}))
    r.table(pd.DataFrame({"x": [2]}))
    r.write(tmp_path)
    (tmp_path / "tables" / "notes.txt").write_text("mine")
    r2 = Report("t")
    r2.table(pd.DataFrame({"x": [3]}))
    r2.write(tmp_path)
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["notes.txt", "table-01.csv"]


# ---------------------------------------------------------------------------------- browser

needs_browser = pytest.mark.skipif(find_chromium() is None, reason="no Chromium (apt-get install chromium) for the render check")


@pytest.mark.browser
@needs_browser
def test_report_renders_in_headless_chromium(tmp_path, model_dir):
    index = build_report(model_dir).write(tmp_path / "out")
    shot = tmp_path / "screenshot.png"
    res = check_rendered(index, screenshot=shot, colours=[MAGENTA, CYAN, "#00ff00"], tolerance=8)
    assert res["all_images_rendered"], res["images"]
    assert [i["width"] > 0 for i in res["images"]] == [True, True]
    assert res["non_blank"] and 0.05 < res["ink_fraction"] < 0.9
    assert res["table_rows"][0] == 7  # header + 6 effect rows
    assert res["screenshot_size"][1] == res["page_height"] > 1000  # full page captured
    # each figure's colour patch shows up at (nearly) its full size; an absent colour does not
    for colour, (w, h) in zip([MAGENTA, CYAN], res["decoded_sizes"]):
        expected = (PATCH * w) * (PATCH * h)
        assert 0.8 * expected < res["colour_pixels"][colour] < 1.2 * expected, (colour, res["colour_pixels"], expected)
    assert res["colour_pixels"]["#00ff00"] == 0
    with Image.open(shot) as im:
        assert im.size[0] == 1200
        assert colour_pixels(im, MAGENTA, 8) == res["colour_pixels"][MAGENTA]


@pytest.mark.browser
@needs_browser
def test_browser_check_detects_a_broken_image(tmp_path):
    good = Report("t")
    good.figure(patched(F.norm_histogram([1.0, 2.0, 3.0]), MAGENTA))
    index = good.write(tmp_path)
    page = index.read_text()
    # a truncated PNG: valid base64, corrupt image data
    b64 = re.search(r"base64,([A-Za-z0-9+/=]+)", page).group(1)
    broken = base64.b64encode(base64.b64decode(b64)[:200]).decode()
    index.write_text(page.replace(b64, broken))
    with pytest.raises(ReportError, match="does not decode"):
        check_rendered(index)
    # an image the browser cannot load at all (missing file) reports naturalWidth 0
    index.write_text(page.replace(f"data:image/png;base64,{b64}", "missing.png"))
    res = check_rendered(index, colours=[MAGENTA])
    assert res["images"][0]["width"] == 0 and not res["all_images_rendered"]
    assert res["colour_pixels"][MAGENTA] == 0
    assert not math.isnan(res["ink_fraction"])
