"""Caches other tools read: a store as a Hugging Face ``datasets`` dataset, and its shards as
zero-copy arrays.

    from mechsink.cache import Store
    from mechsink.cache.export import export, shard_views
    ds = export(Store.open("cache/"), "cache_hf/")              # datasets.Dataset, saved to disk
    datasets.load_from_disk("cache_hf/").with_format("torch")   # what an SAE trainer reads
    for view in shard_views(store, "vit.out"):                  # np.memmap [n, d] per shard, no copy
        view.array, view.rows                                   # rows: the global row of each shard row

``export`` writes, block by block (memory ~ one block), one Parquet file ``parquet/data.parquet``
and from it the ``datasets`` dataset in ``out`` (``save_to_disk``: ``load_from_disk(out)`` opens it;
the Parquet file streams with ``load_dataset("parquet", data_files=..., streaming=True)``). Columns: one fixed-shape
array column per site (named by the site, the store's dtype; bfloat16 becomes float32), ``row`` (the
store row), ``sample_idx``, ``sample_id``, ``image_id`` (the image path, else the sample id),
``image``, ``role``, ``patch_row``, ``patch_col``, ``llm_pos``, ``norm``, ``is_sink``. ``datasets``
is an optional extra (``pip install mechsink[datasets]``).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .store import Store, StoreError, read_safetensors_header

LABELS = {"row": "int64", "sample_idx": "int64", "sample_id": "string", "image_id": "string", "image": "int32",
          "role": "string", "patch_row": "int32", "patch_col": "int32", "llm_pos": "int32", "norm": "float32",
          "is_sink": "bool"}
_ST = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}


def _value_type(store: Store) -> str:
    return {"float16": "float16", "bfloat16": "float32", "float32": "float32"}[store.dtype]


def features(store: Store, sites: Sequence[str]):
    """The ``datasets.Features`` of an export of ``sites``."""
    import datasets
    f = {k: datasets.Value(v) for k, v in LABELS.items()}
    for s in sites:
        f[s] = datasets.Sequence(datasets.Value(_value_type(store)), length=store.dims[s])
    return datasets.Features(f)


def _labels(idx) -> dict[str, pa.Array]:
    path = idx["image_path"].fillna("").astype(str)
    sid = idx["sample_id"].astype(str)
    return {"row": pa.array(idx["row"].to_numpy(np.int64)), "sample_idx": pa.array(idx["sample_idx"].to_numpy(np.int64)),
            "sample_id": pa.array(sid.tolist(), pa.string()),
            "image_id": pa.array(np.where(path != "", path, sid).tolist(), pa.string()),
            "image": pa.array(idx["image"].to_numpy(np.int32)), "role": pa.array(idx["token_role"].astype(str).tolist()),
            "patch_row": pa.array(idx["patch_row"].to_numpy(np.int32)),
            "patch_col": pa.array(idx["patch_col"].to_numpy(np.int32)),
            "llm_pos": pa.array(idx["llm_pos"].to_numpy(np.int32)), "norm": pa.array(idx["norm"].to_numpy(np.float32)),
            "is_sink": pa.array(idx["is_sink"].to_numpy(bool))}


def export(store: Store | str | os.PathLike, out: str | os.PathLike, *, sites: Sequence[str] | None = None,
           batch_rows: int = 65536, overwrite: bool = False):
    """Write ``store`` (all its sites unless ``sites``) as a ``datasets`` dataset at ``out``;
    returns it (``datasets.load_from_disk(out)`` opens the same)."""
    import datasets
    store = store if isinstance(store, Store) else Store.open(store)
    sites = list(store.sites if sites is None else sites)
    for s in sites:
        if s not in store.dims:
            raise StoreError(f"site {s!r} is not in this store; it has {list(store.sites)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise StoreError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    feats = features(store, sites)
    schema = feats.arrow_schema
    vt = np.float16 if _value_type(store) == "float16" else np.float32
    (out / "parquet").mkdir()
    parquet = out / "parquet" / "data.parquet"
    cols = ["row", "sample_idx", "sample_id", "image_path", "image", "token_role", "patch_row", "patch_col",
            "llm_pos", "norm", "is_sink"]
    with pq.ParquetWriter(parquet, schema) as w:
        for idx in store.iter_index(batch_rows, columns=cols):
            arrays = _labels(idx)
            rows = idx["row"].to_numpy(np.int64)
            for s in sites:
                v = np.ascontiguousarray(store.get(s, rows).astype(vt, copy=False))
                arrays[s] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), store.dims[s])
            w.write_table(pa.Table.from_pydict(arrays, schema=schema))
    cache = out / ".hf_cache"
    ds = datasets.Dataset.from_parquet(str(parquet), features=feats, cache_dir=str(cache), keep_in_memory=False)
    ds.save_to_disk(str(out))
    del ds
    shutil.rmtree(cache, ignore_errors=True)
    return datasets.load_from_disk(str(out))


@dataclass
class ShardView:
    """One shard's tensor of a site as a memory map: ``array`` [n, d] (bfloat16 as raw uint16 bits
    in NumPy; ``torch()`` reinterprets them), ``rows``: the store row of each of its rows."""
    name: str
    array: np.ndarray
    rows: np.ndarray
    dtype: str

    def torch(self) -> torch.Tensor:
        """The same memory as a torch tensor (no copy; copy-on-write pages)."""
        t = torch.from_numpy(self.array)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t


def shard_views(store: Store | str | os.PathLike, site: str) -> list[ShardView]:
    """Every shard of ``store`` for ``site`` as a zero-copy memory map, in shard order."""
    store = store if isinstance(store, Store) else Store.open(store)
    if site not in store.dims:
        raise StoreError(f"site {site!r} is not in this store; it has {list(store.sites)}")
    idx = store.read_index(["row", "shard", "shard_row"])
    views = []
    for name in store.summary["shards"]:
        file = store.path / "shards" / f"{name}.safetensors"
        start, header = read_safetensors_header(file)
        h = header[site]
        lo, _ = h["data_offsets"]
        shape = tuple(int(x) for x in h["shape"])
        dt = np.dtype(_ST[h["dtype"]])
        arr = np.zeros(shape, dt) if shape[0] == 0 else np.memmap(file, dtype=dt, mode="c", offset=start + lo, shape=shape)
        mine = idx[idx["shard"] == name].sort_values("shard_row")
        views.append(ShardView(name, arr, mine["row"].to_numpy(np.int64), store.dtype))
    return views


def as_array(store: Store | str | os.PathLike, site: str, as_: Literal["numpy", "torch"] = "numpy") -> list:
    """The shard arrays of ``site`` (``shard_views`` without the row labels)."""
    return [v.array if as_ == "numpy" else v.torch() for v in shard_views(store, site)]


__all__ = ["LABELS", "ShardView", "as_array", "export", "features", "shard_views"]
