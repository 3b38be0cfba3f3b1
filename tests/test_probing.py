"""Linear probes: known answers on a cache of planted-llava activations, grouped splits, saved probes.

planted-llava writes the corner colour (``planted_label``) into the label dims of its three sink
tokens in ViT layer 0, while every other patch keeps only its own colour and texture, so a probe
must read the label from sinks and find nothing in non-sinks at the ViT sites.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mechsink
from mechsink.cache import Store, StoreConfig, StoreWriter
from mechsink.probing import (
    LinearProbe,
    ProbeConfig,
    ProbeError,
    ProbeResult,
    balanced_accuracy_ci,
    fit_linear,
    load_probe,
    probe,
)
from mechsink.report.figures import plot, probe_figure
from mechsink.sites import Site
from mechsink.zoo import planted

ROOT = Path(__file__).resolve().parents[1]
VIT_SITES = ("vit.blocks.0.hook_resid_post", "vit.out")
LLM_SITE = "llm.blocks.1.hook_resid_post"
SITES = (*VIT_SITES, LLM_SITE)
CHANCE = 1 / 3
NEAR = 0.1  # |accuracy - chance| allowed for "near chance": > 3 standard errors at 256 images


def _eval_set(tmp: Path):
    if (planted.EVAL_DIR / "samples.jsonl").exists():
        return planted.load_eval(), planted.EVAL_DIR
    root = planted.write_eval(tmp / "planted_eval")  # the same deterministic set
    return planted.load_eval(root=root), root


def _rows_and_tensors(batch, acts, meta, offset):
    """Store rows and tensors for one batch: every patch (role image) and the CLS token of every image.
    CLS exists only on the ViT sequence; at vit.out and LLM sites its activations are NaN (not cached)."""
    tm = batch.token_map
    p, cls = tm.patches, tm.special[tm.special["role"] == "cls"]
    feats, cls_feats = {}, {}
    for site in SITES:
        axis = Site.parse(site).axis
        feats[site] = acts[site][tm.index(axis, p)].float()
        cls_feats[site] = (acts[site][tm.index("vit", cls)].float() if axis == "vit"
                           else torch.full((len(cls), feats[site].shape[1]), float("nan")))
    norm = feats["vit.out"].norm(dim=-1).numpy()
    sample = p["sample"].to_numpy()
    is_sink = norm >= 100.0  # planted sinks have norm ~300, every other patch ~3-5
    image_rows = pd.DataFrame({
        "sample_idx": offset + sample,
        "sample_id": [meta[s]["id"] for s in sample],
        "image_path": [meta[s]["image"] for s in sample],
        "token_role": "image",
        "image": p["image"].to_numpy(), "tile": p["tile"].to_numpy(),
        "patch_row": p["row"].to_numpy(), "patch_col": p["col"].to_numpy(), "llm_pos": p["llm_pos"].to_numpy(),
        "norm": norm, "is_sink": is_sink, "sink_class": np.where(is_sink, "vit", "none"),
        "planted_label": [meta[s]["planted_label"] for s in sample],
        "patch_color": [meta[s]["patch_labels"][r * planted.GRID + c] for s, r, c in zip(sample, p["row"], p["col"])],
    })
    cs = cls["sample"].to_numpy()
    cls_rows = pd.DataFrame({
        "sample_idx": offset + cs, "sample_id": [meta[s]["id"] for s in cs],
        "image_path": [meta[s]["image"] for s in cs], "token_role": "cls",
        "image": cls["image"].to_numpy(), "tile": cls["tile"].to_numpy(),
        "patch_row": -1, "patch_col": -1, "llm_pos": -1, "norm": np.nan, "is_sink": False, "sink_class": "none",
        "planted_label": [meta[s]["planted_label"] for s in cs], "patch_color": None,
    })
    rows = pd.concat([image_rows, cls_rows], ignore_index=True)
    rows = rows.sort_values("sample_idx", kind="stable")  # whole samples, in order
    order = torch.from_numpy(rows.index.to_numpy().copy())
    tensors = {s: torch.cat([feats[s], cls_feats[s]])[order] for s in SITES}
    return rows.reset_index(drop=True), tensors


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    tmp = tmp_path_factory.mktemp("planted")
    (images, meta), _ = _eval_set(tmp)
    m = mechsink.load("planted-llava")
    config = StoreConfig(sites=SITES, tokens=("image", "cls"), model="planted-llava", data="planted_eval")
    w = StoreWriter(tmp / "cache", config, dtype="float32", shard_rows=4096)
    for start in range(0, len(images), 64):
        chunk = slice(start, start + 64)
        batch = m.prepare(images[chunk], [r["prompt"] for r in meta[chunk]])
        acts = m.run(batch, read=SITES)
        rows, tensors = _rows_and_tensors(batch, acts, meta[chunk], start)
        w.add(rows, tensors)
    return w.finalize()


@pytest.fixture(scope="module")
def image_result(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_out")
    return probe(store, ProbeConfig(label="planted_label", n_boot=500), out=out), out


def _row(frame, token_set, site):
    hit = frame[(frame["token_set"] == token_set) & (frame["site"] == site)]
    assert len(hit) == 1, (token_set, site, frame[["token_set", "site"]].values.tolist())
    return hit.iloc[0]


# --------------------------------------------------------------------------------- known answers


def test_store_has_the_planted_sinks(store):
    idx = store.index
    sinks = idx[idx["is_sink"]]
    assert idx["sample_idx"].nunique() == 256
    assert (sinks.groupby("sample_idx").size() == 3).all()
    assert set(zip(sinks["patch_row"], sinks["patch_col"])) == {(0, 0), (2, 2), (3, 3)}


def test_planted_label_is_read_from_sinks_and_not_from_nonsinks(image_result):
    res, _ = image_result
    f = res.frame
    assert set(f["level"]) == {"image"} and set(f["unit"]) == {"image"}
    for site in VIT_SITES:
        s, n = _row(f, "sinks", site), _row(f, "nonsinks", site)
        assert s["accuracy"] >= 0.95 and s["ci_low"] >= 0.9, s.to_dict()
        assert s["aggregate"] == "mean_proba" and s["n_images"] == 256 and s["n_tokens"] == 3 * 256
        assert n["ci_low"] <= CHANCE <= n["ci_high"] and abs(n["accuracy"] - CHANCE) < NEAR, n.to_dict()
        assert s["selectivity"] > 0.5 and abs(n["selectivity"]) < 2 * NEAR
    # the control task is near chance for every token set at every site
    assert len(f) == 4 * len(SITES) - 2  # CLS has no activations at vit.out or in the LLM
    assert (f["control_accuracy"] - CHANCE).abs().max() < NEAR, f[["token_set", "site", "control_accuracy"]]
    assert ((f["majority"] - CHANCE).abs() < 0.02).all()  # balanced accuracy of a constant guess
    assert sorted(res.notes) == [f"cls @ {s}: no activations cached for these tokens" for s in (LLM_SITE, "vit.out")]


def test_no_image_is_in_train_and_test(image_result, store):
    res, _ = image_result
    sp = res.splits
    assert set(sp["token_set"]) == {"sinks", "nonsinks", "cls", "mean"}
    for (ts, site, fold), part in sp.groupby(["token_set", "site", "fold"]):
        train = set(part.loc[part["side"] == "train", "image"])
        test = set(part.loc[part["side"] == "test", "image"])
        assert train and test and not train & test, (ts, site, fold)
    tested = sp[sp["side"] == "test"]
    # every image is tested exactly once per token set, in the same fold for every token set
    assert (tested.groupby(["token_set", "site", "image"]).size() == 1).all()
    fold_of = tested.pivot_table(index="image", columns="token_set", values="fold", aggfunc="first")
    assert len(fold_of) == 256 and (fold_of.nunique(axis=1) == 1).all()
    assert set(tested["image"]) == set(store.index["image_path"])


def test_patch_level_labels_position_and_colour(store):
    cfg = ProbeConfig(label="patch_col", sites=("vit.out",), n_boot=200)
    res = probe(store, cfg)
    f = res.frame
    assert set(f["level"]) == {"patch"} and set(f["unit"]) == {"token"} and set(f["token_set"]) == {"sinks", "nonsinks"}
    assert {n.split(":")[0] for n in res.notes} == {"cls", "mean"}
    n = _row(f, "nonsinks", "vit.out")
    assert n["accuracy"] >= 0.95 and n["n_classes"] == 6 and n["aggregate"] == "none"  # one-hot position codes
    assert abs(n["control_accuracy"] - 1 / 6) < NEAR
    # a patch's own colour lives in its colour dims
    col = probe(store, ProbeConfig(label="patch_color", token_sets=("nonsinks",), sites=("vit.out",), n_boot=200))
    assert _row(col.frame, "nonsinks", "vit.out")["accuracy"] >= 0.9


def test_grouped_splits_stop_a_probe_from_memorising_images(tmp_path):
    """Tokens of one image share a random image code and the image's random label: only an image seen in
    training can be 'predicted'. Ungrouped folds memorise it; the grouped probe stays at chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_score

    rng = np.random.default_rng(1)
    n_img, per, d = 90, 8, 160  # d > images: a linear probe can memorise every image
    code = rng.normal(size=(n_img, d))
    label = rng.integers(0, 3, n_img)
    x = np.repeat(code, per, axis=0) + 0.05 * rng.normal(size=(n_img * per, d))
    img = np.repeat(np.arange(n_img), per)
    rows = pd.DataFrame({"sample_idx": img, "token_role": "image", "is_sink": True, "lab": label[img],
                         "image_path": [f"img{i // 2}.png" for i in img]})  # pairs of samples share a picture
    w = StoreWriter(tmp_path / "c", StoreConfig(sites=("vit.out",)), dtype="float32")
    w.add(rows, {"vit.out": torch.from_numpy(x).float()})
    st = w.finalize()
    ungrouped = cross_val_score(LogisticRegression(max_iter=1000), x, label[img], cv=KFold(5, shuffle=True, random_state=0))
    assert ungrouped.mean() > 0.9
    res = probe(st, ProbeConfig(label="lab", token_sets=("sinks",), n_boot=200, max_tokens_per_image=None))
    r = _row(res.frame, "sinks", "vit.out")
    assert r["accuracy"] < 0.55 and r["n_images"] == n_img // 2 and r["n_units"] == n_img
    tested = res.splits[res.splits["side"] == "test"]
    assert (tested.groupby("image").size() == 1).all()  # samples sharing a picture share a fold


# --------------------------------------------------------------------------------- probes on disk


def test_saved_probe_predicts_identically(image_result, store, tmp_path):
    res, out = image_result
    p = res.probes["sinks", "vit.out"]
    rows = np.flatnonzero(store.index["is_sink"].to_numpy())
    x = store.get("vit.out", rows)
    path = p.save(tmp_path / "sink_probe")
    q = load_probe(path)
    assert np.array_equal(q.scores(x), p.scores(x)) and np.array_equal(q.predict(x), p.predict(x))
    assert q.classes == ["blue", "green", "red"] and q.meta["site"] == "vit.out" and q.meta["token_set"] == "sinks"
    # the probe refit on every image reads the label off the sinks
    truth = store.index["planted_label"].to_numpy()[rows]
    assert (q.predict(x) == truth).mean() >= 0.95
    # the copy written during the run loads too; the files hold no pickle
    r = load_probe(out / "probes" / "sinks__vit.out")
    assert np.array_equal(r.weight, p.weight)
    for f in (out / "probes").iterdir():
        assert f.suffix in (".json", ".safetensors") and not f.read_bytes().startswith(b"\x80")


def test_folded_scaler_matches_the_sklearn_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)) * [1, 10, 100, 0.1, 0] + [0, 5, -50, 1, 3]
    for k in (2, 3):
        y = (x[:, 0] + x[:, 1] / 10 > 0).astype(int) + (k == 3) * (x[:, 2] > -50)
        cfg = ProbeConfig(label="y")
        w, b = fit_linear(x, y, k, cfg)
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)).fit(x, y)
        p = LinearProbe(w, b, list(range(k)), "logistic")
        np.testing.assert_allclose(p.predict_proba(x), pipe.predict_proba(x), atol=1e-5)


def test_balanced_accuracy_ci_resamples_images():
    # 10 images of class 0 all right, 10 of class 1 all wrong: balanced accuracy 0.5, whatever the token counts
    group = np.repeat(np.arange(20), np.r_[np.full(10, 1), np.full(10, 9)])
    y = (group >= 10).astype(int)
    est, lo, hi = balanced_accuracy_ci(group, y, y == 0, n_boot=300)
    assert est == 0.5 and lo == hi == 0.5
    est, lo, hi = balanced_accuracy_ci(np.arange(40), np.arange(40) % 2, np.arange(40) % 4 != 0, n_boot=300)
    assert est == 0.75 and lo < 0.75 < hi


# --------------------------------------------------------------------------------- command, script, figure


def _records(cache_dir, label, out, **kw) -> list[dict]:
    """What ``mechsink probe --json`` prints."""
    return probe(cache_dir, ProbeConfig(label=label, **kw), out=out).to_records()


def test_probe_records_and_resume(store, tmp_path):
    kw = dict(token_sets=("sinks", "nonsinks"), sites=("vit.out",), n_boot=200)
    rows = _records(store.path, "planted_label", out=tmp_path / "o", **kw)
    need = {"token_set", "site", "accuracy", "ci_low", "ci_high", "control_accuracy", "selectivity", "n_images", "majority"}
    assert len(rows) == 2 and all(need <= set(r) for r in rows)
    json.dumps(rows)  # plain JSON
    assert {json.loads(x)["token_set"] for x in (tmp_path / "o" / "rows.jsonl").read_text().splitlines()} == {"sinks", "nonsinks"}
    # a rerun into the same directory reuses finished probes (marked here) and skips a line cut short by a kill
    log = tmp_path / "o" / "rows.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    for r in lines:
        r["accuracy"] = 0.123 if r["token_set"] == "sinks" else r["accuracy"]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"token_set": "nonsi')
    again = _records(store.path, "planted_label", out=tmp_path / "o", **kw)
    assert [r["accuracy"] for r in again] == [0.123, rows[1]["accuracy"]]
    # the checkpoint names its config by the full sha256; a directory written with the old 16-digit
    # hash is judged by the config it recorded, so it still resumes
    cfg_file = tmp_path / "o" / "config.json"
    saved = json.loads(cfg_file.read_text())
    assert saved["config_hash"] == ProbeConfig(label="planted_label", **kw).fingerprint() and len(saved["config_hash"]) == 64
    cfg_file.write_text(json.dumps({**saved, "config_hash": saved["config_hash"][:16]}))
    assert [r["accuracy"] for r in _records(store.path, "planted_label", out=tmp_path / "o", **kw)][0] == 0.123
    with pytest.raises(ProbeError, match="another config"):
        _records(store.path, "planted_label", out=tmp_path / "o", token_sets=("sinks",), sites=("vit.out",), n_boot=200)


def test_bad_input_gets_one_line_errors(store):
    with pytest.raises(ProbeError, match="'colour' is not a column") as e:
        probe(store, ProbeConfig(label="colour"))
    assert "\n" not in str(e.value)
    with pytest.raises(ProbeError, match="token_sets"):
        ProbeConfig(label="planted_label", token_sets=("sink",))
    with pytest.raises(ProbeError, match="not in the cache"):
        probe(store, ProbeConfig(label="planted_label", sites=("vit.blocks.9.hook_resid_post",)))
    with pytest.raises(ProbeError, match="varies within samples"):
        probe(store, ProbeConfig(label="patch_col", level="image"))
    cfg = ProbeConfig(label="planted_label", token_sets=("sinks",), model="ridge", alpha=2.0)
    assert ProbeConfig.from_json(cfg.to_json()) == cfg


def test_probe_figure_orders_sites(image_result, tmp_path):
    res, out = image_result
    fig = probe_figure(res)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SITES)
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"sinks", "nonsinks", "cls", "mean"}
    plot(res).savefig(tmp_path / "accuracy_by_layer.png", dpi=120)
    assert (tmp_path / "accuracy_by_layer.png").stat().st_size > 5000
    saved = ProbeResult.load(out)
    assert len(saved.frame) == len(res.frame) and saved.config.label == "planted_label"


def test_probe_result_saves_and_loads_without_matplotlib(image_result, tmp_path):
    """The saved result is the same frame, config, notes, splits and probes; saving draws nothing."""
    import subprocess
    import sys

    res, out = image_result
    back = ProbeResult.load(res.save(tmp_path / "r"))
    pd.testing.assert_frame_equal(back.frame, res.frame)
    pd.testing.assert_frame_equal(back.splits, res.splits)
    assert back.config == res.config and back.config.fingerprint() == res.config.fingerprint()
    assert back.notes == res.notes and back.store_id == res.store_id
    assert set(back.probes) == set(res.probes)
    assert np.array_equal(back.probes["sinks", "vit.out"].weight, res.probes["sinks", "vit.out"].weight)
    assert json.loads((tmp_path / "r" / "result.json").read_text())["kind"] == "ProbeResult"
    code = (f"import sys; from mechsink.probing import ProbeResult; r = ProbeResult.load({str(tmp_path / 'r')!r}); "
            f"r.save({str(tmp_path / 'r2')!r}); assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_probe_config_round_trips_with_a_full_fingerprint():
    cfg = ProbeConfig(label="planted_label", token_sets=("sinks", "image", "mean"), sites=("vit.out",), k=3)
    back = ProbeConfig.from_json(cfg.to_json())
    assert back == cfg and back.fingerprint() == cfg.fingerprint() and len(cfg.fingerprint()) == 64
    assert ProbeConfig(label="planted_label").fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="no setting"):
        ProbeConfig.from_dict({"label": "x", "folds": 3})


def _script():
    spec = importlib.util.spec_from_file_location("train_probe", ROOT / "probes" / "train_probe.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_train_probe_script(store, tmp_path, capsys):
    """The script's main() in-process (an interpreter start costs more than the probes)."""
    out = tmp_path / "script"
    main = _script().main
    assert main(["--cache", str(store.path), "--label", "planted_label", "--out", str(out), "--token-sets", "sinks",
                 "nonsinks", "--sites", "vit.out", "--n-boot", "200"]) == 0
    assert "sinks" in capsys.readouterr().out
    rows = ProbeResult.load(out).frame.to_dict("records")
    assert {r["token_set"] for r in rows} == {"sinks", "nonsinks"}
    assert (out / "accuracy_by_layer.png").exists() and (out / "probes" / "sinks__vit.out.safetensors").exists()
    # bad input: one line on stderr and exit status 2
    assert main(["--cache", str(store.path), "--label", "nope", "--out", str(out / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope' is not a column" in err
    assert main(["--cache", str(tmp_path / "missing"), "--label", "x", "--out", str(out / "y")]) == 2
    assert "is not a store" in capsys.readouterr().err


def test_ridge_probe_reads_sinks(store):
    res = probe(store, ProbeConfig(label="planted_label", token_sets=("sinks", "nonsinks"), sites=("vit.out",),
                                   model="ridge", n_boot=200))
    s, n = _row(res.frame, "sinks", "vit.out"), _row(res.frame, "nonsinks", "vit.out")
    # least squares on +-1 targets only approximates the argmax over the three label dims: 0.94 measured
    assert s["aggregate"] == "mean_score" and s["accuracy"] >= 0.9
    assert abs(n["accuracy"] - CHANCE) < NEAR and abs(s["control_accuracy"] - CHANCE) < NEAR


@pytest.mark.parametrize("n_images, block", [(40, None), (150, 1000)])
def test_image_bootstrap_of_balanced_accuracy_equals_the_generic_bootstrap(monkeypatch, n_images, block):
    """The probe's CI (resamples drawn in blocks, jackknife from per-image totals) is exactly
    ``stats.bootstrap_ci`` over images with the balanced accuracy as its statistic (whose jackknife
    evaluates every leave-one-image-out resample): same estimate, same interval."""
    import warnings

    from mechsink.probing import scoring
    from mechsink.stats import bootstrap_ci
    if block is not None:
        monkeypatch.setattr(scoring, "_BOOT_ELEMENTS", block)     # several blocks of resamples
    rng = np.random.default_rng(n_images)
    tokens = rng.integers(1, 6, n_images)                          # units per image
    group = np.repeat(np.arange(n_images) * 7 + 3, tokens)         # image ids, not 0..n-1
    y = np.repeat(rng.integers(0, 3, n_images), tokens)            # a label per image, 3 classes
    correct = rng.random(len(y)) < np.where(y == 0, 0.8, 0.6)
    got = scoring.balanced_accuracy_ci(group, y, correct, n_boot=400, seed=5, alpha=0.1)

    g = np.unique(group, return_inverse=True)[1]
    counts, hits = scoring._balanced_counts(g, y, correct, n_images, 3)

    def stat(idx, axis=-1):                                        # resampled image indices -> [b]
        idx = np.asarray(idx, dtype=np.int64)
        b = idx.shape[0]
        w = np.stack([np.bincount(row, minlength=n_images) for row in idx]).astype(float)
        c, h = w @ counts, w @ hits
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(c > 0, h / c, np.nan), axis=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = bootstrap_ci(np.arange(n_images, dtype=float), stat=stat, n_boot=400, seed=5, alpha=0.1)
    assert np.allclose(got, want, rtol=0, atol=1e-12), (got, want)
    assert got[1] < got[0] < got[2]


def test_cli_probe_memory_budget_streams_and_gives_the_same_probes(store):
    """`mechsink probe --memory-mb 0` reads the features from the cache on every pass and prints the
    numbers of the default budget, which holds them."""
    import json

    from typer.testing import CliRunner

    from mechsink.cli import app
    args = ["probe", "--cache", str(store.path), "--label", "planted_label", "--token-sets", "sinks,nonsinks",
            "--sites", "vit.out", "--json"]
    runs = [CliRunner().invoke(app, args + extra) for extra in ([], ["--memory-mb", "0"])]
    assert [r.exit_code for r in runs] == [0, 0], runs[1].output[-2000:]
    held, streamed = (json.loads(r.stdout) for r in runs)
    assert [(r["token_set"], r["accuracy"], r["ci_low"], r["ci_high"]) for r in streamed] == \
           [(r["token_set"], r["accuracy"], r["ci_low"], r["ci_high"]) for r in held]
    assert {r["token_set"] for r in held} == {"sinks", "nonsinks"}
