"""Export of an activation store to Hugging Face datasets, and zero-copy shard views."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")

import mechsink
from mechsink.cache import extract
from mechsink.cache.export import export, shard_views
from mechsink.data import open_dataset
from mechsink.zoo.planted import EVAL_DIR

SITES = ["vit.out", "llm.blocks.0.hook_resid_post"]


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def store(request, tmp_path_factory):
    m = mechsink.load("planted-llava")
    ds = open_dataset(EVAL_DIR / "samples.jsonl", limit=4)
    return extract(m, ds, sites=SITES, tokens=["image", "text"], out=tmp_path_factory.mktemp("s") / "store",
                   store_dtype=request.param, batch_size=2, shard_rows=50)


def test_export_round_trips_through_datasets(store, tmp_path):
    out = tmp_path / "hf"
    export(store, out, batch_rows=37)
    ds = datasets.load_from_disk(str(out))
    idx = store.index
    assert len(ds) == len(store) and ds["row"] == list(range(len(store)))
    for site in SITES:
        want = store.get(site)
        got = np.asarray(ds.with_format("numpy")[site])
        assert got.shape == want.shape == (len(store), store.dims[site])
        want = want.astype(got.dtype)                            # datasets reads float16 as float32: exact
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))   # bit for bit (NaN = no value)
        stored = ds.data.column(site).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        assert stored.dtype == (np.float16 if store.dtype == "float16" else np.float32)
    assert ds["sample_id"] == idx["sample_id"].astype(str).tolist()
    assert ds["role"] == idx["token_role"].astype(str).tolist()
    assert ds["is_sink"] == idx["is_sink"].tolist() and sum(ds["is_sink"]) == 4 * 3   # three planted sinks per image
    assert ds["patch_row"] == idx["patch_row"].tolist() and ds["patch_col"] == idx["patch_col"].tolist()
    t = ds.with_format("torch")[:5]["vit.out"]
    assert torch.is_tensor(t) and t.shape == (5, store.dims["vit.out"])
    with pytest.raises(mechsink.cache.StoreError, match="overwrite"):
        export(store, out)
    stream = datasets.load_dataset("parquet", data_files=str(out / "parquet" / "data.parquet"), streaming=True,
                                   split="train")
    first = next(iter(stream))
    assert np.array_equal(np.asarray(first["vit.out"], dtype=np.float32), store.get("vit.out", [0])[0].astype(np.float32),
                          equal_nan=True)


def test_shard_views_are_zero_copy_and_complete(store):
    views = shard_views(store, "vit.out")
    assert len(views) == len(store.summary["shards"]) > 1
    rows = np.concatenate([v.rows for v in views])
    assert sorted(rows.tolist()) == list(range(len(store)))
    for v in views:
        assert isinstance(v.array, np.memmap)                   # a map of the shard file, not a copy
        got = v.torch()
        want = store.get("vit.out", v.rows, as_="torch")
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_export_command(store, tmp_path):
    import json

    from typer.testing import CliRunner

    from mechsink.cli import app
    if store.dtype != "float32":
        pytest.skip("one dtype is enough for the command")
    r = CliRunner().invoke(app, ["export", "--cache", str(store.path), "--out", str(tmp_path / "hf"),
                                 "--sites", "vit.out", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["rows"] == len(store) and "vit.out" in got["columns"] and "llm.blocks.0.hook_resid_post" not in got["columns"]
    assert len(datasets.load_from_disk(str(tmp_path / "hf"))) == len(store)
