"""The extractor: every cached vector equals a single-sample forward pass; planted sinks land in
the right rows; resume, config changes, token selections and the CLI entry point."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mechsink  # noqa: E402
from mechsink.cache import Store, StoreError  # noqa: E402
from mechsink.cache.extract import extract  # noqa: E402
from mechsink.data import Dataset, Sample, open_dataset  # noqa: E402
from mechsink.sinks import SinkSpec  # noqa: E402
from mechsink.sites import Site  # noqa: E402
from mechsink.testing import test_image as make_image  # noqa: E402
from mechsink.tokens import _AXIS_COLUMNS, ROLE  # noqa: E402
from mechsink.zoo.planted import EVAL_DIR, MASSIVE, PLANTED_SINKS  # noqa: E402

PROMPTS = ["what color is the corner ?", "what is this ?", None, "is there a cat in this picture ?", "how many ?"]
_models: dict[str, mechsink.Model] = {}


def model(name: str):
    if name not in _models:
        _models[name] = mechsink.load(name)
    return _models[name]


def planted_data(n: int, prompts=True) -> Dataset:
    """n planted images with prompts of different lengths (so batches are padded)."""
    ds = open_dataset(EVAL_DIR / "samples.jsonl", limit=n)
    if not prompts:
        return ds
    return Dataset([Sample(s.id, s.image_path, PROMPTS[k % len(PROMPTS)], labels=s.labels) for k, s in enumerate(ds)],
                   name="planted-mixed")


def image_data(tmp_path, n: int) -> Dataset:
    d = tmp_path / "images"
    d.mkdir(exist_ok=True)
    samples = []
    for k in range(n):
        p = d / f"{k:02d}.png"
        make_image(size=(32, 40, 48)[k % 3], seed=k).save(p)
        labels = {"seed": k, "kind": ["a", "b"][k % 2]}
        samples.append(Sample(f"img{k}", str(p), PROMPTS[k % len(PROMPTS)], labels=labels))
    return Dataset(samples, name="images")


def single_pass(m, sample, sites):
    """The TokenMap and activations of one sample run alone (no padding)."""
    b = m.prepare([sample.load_image()], [sample.prompt])
    return b.token_map, m.run(b, read=sites)


def expected_vector(tm, acts, site, frame_row: pd.DataFrame) -> np.ndarray | None:
    """The site's vector for one TokenMap row (patches/special/llm frame), None where it has none."""
    axis = Site.parse(site).axis
    pos_col = _AXIS_COLUMNS[axis][1]
    if pos_col not in frame_row.columns or int(frame_row[pos_col].iloc[0]) < 0:
        return None
    if axis == "llm":
        return acts[site][0, int(frame_row["llm_pos"].iloc[0])].float().numpy()
    return acts[site][tm.index(axis, frame_row)][0].float().numpy()


@pytest.mark.parametrize("name,sites", [
    ("planted-llava", ["vit.blocks.0.hook_resid_post", "vit.out", "proj.out", "llm.blocks.1.hook_resid_post"]),
    ("tiny-qwen2-vl", ["vit.blocks.0.hook_resid_post", "vit.out", "proj.out", "llm.blocks.0.hook_resid_post"]),
    ("tiny-llava-next", ["vit.out", "llm.blocks.0.hook_resid_post"]),
])
def test_every_vector_equals_a_single_sample_pass(tmp_path, name, sites):
    m = model(name)
    ds = planted_data(5) if name == "planted-llava" else image_data(tmp_path, 5)
    tokens = ["image", "cls", "text", "newline"]
    store = extract(m, ds, sites=sites, tokens=tokens, out=tmp_path / "store", store_dtype="float32", batch_size=3,
                    shard_rows=60)
    assert len(store.summary["shards"]) > 1
    idx = store.index
    vecs = {s: store.get(s) for s in sites}
    for i, sample in enumerate(ds):
        tm, acts = single_pass(m, sample, sites)
        rows = idx[idx.sample_idx == i]
        assert (rows.sample_id == sample.id).all() and (rows.image_path == sample.image_path).all()
        for key, value in sample.labels.items():  # dataset labels ride along on every row
            assert (rows[key] == (value if np.isscalar(value) else json.dumps(value))).all(), key
        want_text = np.flatnonzero(tm.roles[0] == ROLE["text"])
        got = rows[rows.token_role == "text"]
        assert got.llm_pos.tolist() == want_text.tolist()  # positions independent of batch padding
        n_img = len(tm.patches) + len(tm.special[tm.special.role == "cls"]) + (tm.llm_tokens.role == "newline").sum()
        assert len(rows) == n_img + len(want_text)
        for r in rows.itertuples():
            if r.token_role == "image":
                f = tm.patches[(tm.patches.image == r.image) & (tm.patches.tile == r.tile)
                               & (tm.patches.row == r.patch_row) & (tm.patches.col == r.patch_col)]
            elif r.token_role in ("cls", "register"):
                f = tm.special[(tm.special.role == r.token_role) & (tm.special.tile == r.tile)]
            else:
                f = pd.DataFrame({"llm_pos": [r.llm_pos]})
            assert len(f) == 1, r
            if "llm_pos" in f.columns and r.token_role != "text":
                assert r.llm_pos == int(f.llm_pos.iloc[0]), r
            for s in sites:
                want = expected_vector(tm, acts, s, f)
                got_v = vecs[s][r.row]
                if want is None:
                    assert np.isnan(got_v).all(), (s, r)
                else:
                    np.testing.assert_allclose(got_v, want, rtol=1e-4, atol=1e-4, err_msg=f"{s} {r}")


def test_planted_sinks_and_llm_classes(tmp_path):
    m = model("planted-llava")
    ds = planted_data(6, prompts=False)
    store = extract(m, ds, sites=["vit.out", "llm.blocks.1.hook_resid_post"], tokens=["image", "text"],
                    out=tmp_path / "s", batch_size=4,
                    sinks=SinkSpec.preset("llava-1.5"), llm_sink_layer=0, llm_sink_dims=[MASSIVE],
                    llm_sink_tau=5.0)
    idx = store.index
    img = idx[idx.token_role == "image"]
    planted = (img.patch_row * 6 + img.patch_col).isin(PLANTED_SINKS)
    assert img.is_sink.tolist() == planted.tolist()
    assert (img.norm[planted] > 250).all() and (img.norm[~planted] < 10).all()
    # the identity projector carries the massive dim into the LLM: ViT sinks are LLM sinks too
    assert (img.sink_class[planted] == "both").all() and (img.sink_class[~planted] == "none").all()
    assert (idx.sink_class[idx.token_role == "text"] != "both").all()
    assert (idx.planted_label == [ds[i].labels["planted_label"] for i in idx.sample_idx]).all()
    assert json.loads(idx.planted_sinks.iloc[0]) == list(PLANTED_SINKS)
    assert store.summary["rows_by_sink_class"]["both"] == 18
    assert store.config["params"]["sinks"]["params"] == {"tau": 100.0}
    # storage is float16 by default; the massive dim survives the rounding
    assert store.get("vit.out").dtype == np.float16


def test_resume_redoes_only_lost_samples(tmp_path):
    m = model("planted-llava")
    ds = planted_data(7)
    kw = dict(sites=["vit.out", "llm.blocks.0.hook_resid_post"], tokens=["image", "text"], store_dtype="float32",
              batch_size=2, shard_rows=80)
    full = extract(m, ds, out=tmp_path / "full", **kw)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    # what a kill before the last commits leaves: tensors without their parquet, no index
    last = sorted((part / "shards").glob("*.parquet"))[-2:]
    lost = {int(v) for p in last for v in pd.read_parquet(p).sample_idx.unique()}
    for p in last:
        p.unlink()
    (part / "index.parquet").unlink()
    calls = []   # batch size of every forward pass of the model
    hook = m.hf.register_forward_pre_hook(lambda mod, a, k: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        again = extract(m, ds, out=part, **kw)
        assert sum(calls) == len(lost) > 0
        calls.clear()
        extract(m, ds, out=part, **kw)  # finished: no forward pass at all
        assert calls == []
    finally:
        hook.remove()
    drop = ["shard", "shard_row"]
    pd.testing.assert_frame_equal(again.index.drop(columns=drop), full.index.drop(columns=drop))
    for s in kw["sites"]:
        np.testing.assert_allclose(again.get(s), full.get(s), rtol=1e-5, atol=1e-5)


def test_changed_settings_are_refused(tmp_path):
    m = model("planted-llava")
    ds = planted_data(2)
    extract(m, ds, sites=["vit.out"], out=tmp_path / "s", batch_size=2)
    for change in [dict(sites=["proj.out"]), dict(sites=["vit.out"], tokens=["image", "cls"]),
                   dict(sites=["vit.out"], sinks=SinkSpec.preset("neo")), dict(sites=["vit.out"], store_dtype="float32")]:
        with pytest.raises(StoreError, match="another config"):
            extract(m, ds, out=tmp_path / "s", batch_size=2, **change)
    with pytest.raises(StoreError, match="another config"):
        extract(m, planted_data(3), sites=["vit.out"], out=tmp_path / "s")  # other data


def test_token_selection_and_bad_arguments(tmp_path):
    m = model("planted-llava")
    ds = planted_data(3)
    store = extract(m, ds, sites="vit.out,llm.blocks.0.hook_resid_post", tokens="sinks", out=tmp_path / "s")
    assert len(store) == 9 and store.index.is_sink.all() and (store.index.token_role == "image").all()
    bad = [(dict(sites=["vit.out"], tokens=["text"]), "only in the LLM"),
           (dict(sites=["vit.blocks.0.attn.hook_pattern"]), "attention patterns"),
           (dict(sites=["vit.out"], tokens=["everything"]), "unknown token selection"),
           (dict(sites=["llm.blocks.9.hook_resid_post"]), "out of range"),
           (dict(sites=["vit.out"], llm_sink_layer=0), "llm_sink_dims"),
           (dict(sites=[]), "no sites")]
    for kw, msg in bad:
        with pytest.raises(StoreError, match=msg) as e:
            extract(m, ds, out=tmp_path / "bad", **kw)
        assert "\n" not in str(e.value)


def cache_command(m, *, images_dir, out, sites, tokens, rule, batch_size, dtype="float16"):
    """What `mechsink cache --images DIR` runs (the CLI body, with a model already open)."""
    from mechsink.data import ErrorLog, open_dataset
    log = ErrorLog()
    store = extract(m, open_dataset(images_dir, format="folder"), sites=sites.split(","), tokens=tokens.split(","),
                    out=out, store_dtype=dtype, sinks=SinkSpec.preset(rule), batch_size=batch_size, errors=log)
    return {"out": str(store.path), "id": store.id, "summary": store.summary, "errors": log.summary()}


def test_cache_command_with_an_unreadable_image(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for k in range(3):
        shutil.copy(EVAL_DIR / "images" / f"{k:04d}.png", src / f"{k:04d}.png")
    (src / "0003.png").write_bytes(b"not a png")
    out = tmp_path / "store"
    res = cache_command(model("planted-llava"), images_dir=src, out=out, sites="vit.out,proj.out",
                        tokens="image,cls", dtype="bfloat16", rule="llava-1.5", batch_size=2)
    assert res["summary"]["n_samples"] == 3 and res["errors"]["n_skipped"] == 1
    assert res["summary"]["rows_by_sink_class"] == {"none": 3 * 34, "vit": 9}
    assert (out / "errors.jsonl").exists() and "0003.png" in (out / "errors.jsonl").read_text()
    store = Store.open(out)
    assert store.dtype == "bfloat16" and store.get("proj.out", as_="torch").dtype == torch.bfloat16
    assert json.loads(json.dumps(res))["id"] == store.id
    from typer.testing import CliRunner

    from mechsink.cli import app
    r = CliRunner().invoke(app, ["cache", "-m", "planted-llava", "--data", str(src), "--images", str(src),
                                 "--out", str(out)])
    assert r.exit_code == 2 and "not both" in r.output


def test_resume_retries_a_fixed_image_and_refuses_a_changed_one(tmp_path):
    """The resume key is the configuration (and ids, prompts), not the image bytes: fixing an image
    that was skipped is accepted and computes exactly that sample; changing a cached one is refused."""
    src = tmp_path / "imgs"
    src.mkdir()
    for k in range(4):
        shutil.copy(EVAL_DIR / "images" / f"{k:04d}.png", src / f"{k:04d}.png")
    good = (src / "0002.png").read_bytes()
    (src / "0002.png").write_bytes(b"not a png")
    out = tmp_path / "store"
    kw = dict(images_dir=src, out=out, sites="vit.out", tokens="image", rule="llava-1.5", batch_size=2)
    m = model("planted-llava")
    res = cache_command(m, **kw)
    assert res["summary"]["n_samples"] == 3 and res["errors"]["n_skipped"] == 1
    assert "0002.png" in (out / "errors.jsonl").read_text()
    (src / "0002.png").write_bytes(good)                       # fixed
    calls = []
    hook = m.hf.register_forward_pre_hook(lambda mod, a, k: calls.append(k["pixel_values"].shape[0]), with_kwargs=True)
    try:
        res = cache_command(m, **kw)
    finally:
        hook.remove()
    assert calls == [1]                                        # only the fixed image ran
    assert res["summary"]["n_samples"] == 4 and res["errors"]["n_skipped"] == 0
    assert not (out / "errors.jsonl").exists()                 # no stale list of a skipped image
    fresh = cache_command(m, **{**kw, "out": tmp_path / "fresh"})
    a, b = Store.open(out), Store.open(tmp_path / "fresh")
    assert a.id == b.id
    pd.testing.assert_frame_equal(a.index.drop(columns=["shard", "shard_row"]),
                                  b.index.drop(columns=["shard", "shard_row"]))
    np.testing.assert_array_equal(a.get("vit.out"), b.get("vit.out"))
    assert fresh["summary"]["n_rows"] == res["summary"]["n_rows"]
    shutil.copy(src / "0000.png", src / "0001.png")             # a cached image changes
    with pytest.raises(StoreError, match="1 image\\(s\\) changed") as e:
        cache_command(m, **kw)
    assert "0001.png" in str(e.value) and "\n" not in str(e.value)
