"""Peak memory of one variant, measured in this (fresh) process; prints one JSON line.

    python -m benchmarks.rss cache VARIANT MODEL IMAGES_DIR N BATCH WORKDIR
    python -m benchmarks.rss stream MODEL IMAGES_DIR N BATCH WORKDIR [SITES [SHARD_MB]]
    python -m benchmarks.rss merge STORE_DIR
    python -m benchmarks.rss read STORE_DIR
    python -m benchmarks.rss probe STORE_DIR
    python -m benchmarks.rss tokens N TOKENS_PER_IMAGE WORKDIR
    python -m benchmarks.rss ablate MODEL IMAGES_DIR N BATCH DRAWS

The variant is set up (a TL bridge, an nnsight wrapper) and runs once on one image (lazy imports
and set-up), then the peak-RSS mark is reset and it runs on the whole set; ``run_peak_mb`` is
that run's peak minus the RSS it started from. (A full-size warm-up would leave freed memory
with the allocator, and the measured run would seem to need nothing.)
``stream`` caches N images with ``mechsink.cache.extract`` after a warm-up on a few of them and
leaves the store for ``merge``, which measures rebuilding its index alone (from a fresh process,
so memory a previous step freed but kept does not hide it), and for ``read``, which measures
reading the whole store back the way a probe over a large cache does (every site in blocks, the
index in blocks; ``read_peak_mb``), and what the checksums cost: the first read (which checks the
crc32 of every file it touches) against a second read of the same files (checked already), and
``verify`` of the whole store in MB/s. ``stream`` caches every block of the model (``SITES`` =
``all``) or only its ViT sites (``vit``: the forward stops after the last of them), in shards of
``SHARD_MB`` (default: the store's 256 MiB).
``probe`` runs the probe driver (``mechsink.probing.probe``, label ``label``, see ``PROBE``) over a
store made by ``stream`` of a labelled image set, after the same probe over a store of its first
``WARM_IMAGES`` images (so that neither its imports nor the library code it runs the first time,
file-backed pages of several MB, count as the run's memory: as in the other drivers' warm-ups);
``tokens`` writes a store of N synthetic images of TOKENS_PER_IMAGE image tokens (2 of them
sinks, width 32, float16, sites ``vit.out`` and ``llm.out``, an image-level label written weakly
in one dimension) and runs the same probe over it: at equal N, its peak must not depend on the tokens.
``ablate`` runs ``mechsink.ablation.ablate`` (zero at ``proj.out``, fixed patches, DRAWS random
draws) over N images read from disk, with ``out=`` a temporary directory (its rows stream to disk).
Both warm up on a small input first (lazy imports, first fit or forward), then the peak mark is reset.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)
    from .data import image_set, image_size
    from .harness import added_mb, peak_rss_kb, reset_peak
    from .models import build
    kind = argv[0]
    if kind == "merge":
        return merge_only(argv[1])
    if kind == "read":
        return read_only(argv[1])
    if kind == "probe":
        return probe_only(argv[1])
    if kind == "tokens":
        return tokens_only(int(argv[1]), int(argv[2]), Path(argv[3]))
    if kind == "ablate":
        return ablate_only(argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    if kind == "stream":
        return stream_only(argv[1], argv[2], int(argv[3]), int(argv[4]), Path(argv[5]),
                           argv[6] if len(argv) > 6 else "all", float(argv[7]) if len(argv) > 7 else None)
    if kind == "cache":
        variant, name, folder, n, bs, work = argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), Path(argv[6])
    else:
        raise SystemExit(f"unknown memory run {kind!r}; use cache, stream, merge, read, probe or ablate")
    device = os.environ.get("MECHSINK_BENCH_DEVICE", "cpu")
    model = build(name)
    model.hf.to(device)
    data = image_set(folder, n, image_size(model))
    work = work / f"{kind}-{variant}-{n}"
    shutil.rmtree(work, ignore_errors=True)
    from . import cache
    run, reset = cache.make(variant, model, data, bs, work)
    # a small warm-up does the lazy set-up without leaving a full run's memory with the allocator
    run(data[:1], 1)
    reset()
    gpu = device != "cpu"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_start = torch.cuda.memory_allocated()
    start = reset_peak()
    t = time.perf_counter()
    run()
    if gpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peak = peak_rss_kb()
    out = {"start_mb": start / 1024, "run_peak_mb": added_mb(peak, start), "peak_mb": peak / 1024,
           "rss_wall_s": wall, "rss_images": n}
    if gpu:
        out["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - gpu_start) / 2**20
    shutil.rmtree(work, ignore_errors=True)
    return out


def stream_only(name: str, folder: str, n: int, bs: int, work: Path, sites: str = "all",
                shard_mb: float | None = None) -> dict:
    """Peak memory of ``mechsink.cache.extract`` of n (labelled) images after a warm-up extract of
    ``bs`` of them; the store is left for the ``merge``, ``read`` and ``probe`` runs."""
    import torch

    from mechsink.cache.extract import extract

    from . import cache
    from .data import image_set, image_size
    from .harness import added_mb, peak_rss_kb, reset_peak
    from .models import build
    device = os.environ.get("MECHSINK_BENCH_DEVICE", "cpu")
    model = build(name)
    model.hf.to(device)
    data = image_set(folder, n, image_size(model), labels=True)
    chosen = cache.cache_sites(model)
    if sites == "vit":
        chosen = [s for s in chosen if s.startswith("vit")]
    work = work / f"stream-{name}-{n}"
    shutil.rmtree(work, ignore_errors=True)
    kw = {"shard_bytes": int(shard_mb * 2**20)} if shard_mb else {}

    def run(d, out):
        return extract(model, d, sites=chosen, tokens=("image",), out=out, store_dtype="float16", batch_size=bs, **kw)
    run(data[:bs], work / "warm")
    shutil.rmtree(work / "warm")
    start = reset_peak()
    t = time.perf_counter()
    run(data, work / "store")
    if device != "cpu":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peak = peak_rss_kb()
    return {"start_mb": start / 1024, "run_peak_mb": added_mb(peak, start), "peak_mb": peak / 1024,
            "rss_wall_s": wall, "rss_images": n, "sites": chosen, "store": str(work / "store")}


PROBE = dict(label="label", sites=("vit.out", "llm.blocks.1.hook_resid_post"), token_sets=("image", "nonsinks", "mean"),
             n_boot=200)
# probe(memory_mb=...): below one token set at 200 images (3,200 x 32 float32), so both runs stream
# their features as a large cache does (MECHSINK_PROBE_MEMORY_MB overrides it, e.g. 1024 to hold them)
PROBE_MEMORY_MB = 0.25
WARM_IMAGES = 20       # the probe's warm-up store: the first images of the store measured


def _head_store(store: str, out: Path, n: int):
    """A store of the first ``n`` samples of ``store`` (same config, rows and tensors), finalized in ``out``."""
    import pandas as pd

    from mechsink.cache import Store, StoreWriter
    from mechsink.cache.rows import RESERVED_COLUMNS
    src = Store.open(store)
    blocks = []
    for block in src.iter_index(batch_rows=4096):      # rows are in sample order: the first blocks only
        blocks.append(block[block["sample_idx"] < n])
        if block["sample_idx"].iloc[-1] >= n:
            break
    keep = pd.concat(blocks, ignore_index=True)
    rows = keep.drop(columns=[c for c in RESERVED_COLUMNS if c in keep.columns])
    cfg = {k: src.config[k] for k in ("sites", "tokens", "model", "model_hash", "data", "params")}
    with StoreWriter(out, cfg, dtype=src.dtype) as w:
        w.add(rows.reset_index(drop=True), {s: src.get(s, keep["row"].to_numpy()) for s in src.sites})
    return w.finalize()


def probe_only(store: str, **overrides) -> dict:
    """Peak memory of the probe driver over a whole store (fresh process), after a warm-up probe
    over its first images."""
    import tempfile

    import numpy as np

    from mechsink.cache import Store
    from mechsink.probing import ProbeConfig, fit_linear, probe

    from .harness import added_mb, peak_rss_kb, reset_peak
    cfg = ProbeConfig(**{**PROBE, **overrides})
    rng = np.random.default_rng(0)
    fit_linear(rng.normal(size=(64, 8)).astype(np.float32), np.arange(64) % 2, 2, cfg)   # imports, first fit
    importlib.import_module("sklearn.model_selection")   # the folds' import: not the run's memory
    with tempfile.TemporaryDirectory() as tmp:   # the whole path once (code pages, lazy imports), on a few images
        probe(_head_store(store, Path(tmp), WARM_IMAGES), cfg, memory_mb=0)
    start = reset_peak()
    t = time.perf_counter()
    res = probe(store, cfg, memory_mb=float(os.environ.get("MECHSINK_PROBE_MEMORY_MB", PROBE_MEMORY_MB)))
    wall = time.perf_counter() - t
    return {"probe_peak_mb": added_mb(peak_rss_kb(), start), "probe_s": wall, "probes": len(res.frame),
            "probe_rows": len(Store.open(store)),
            "probe_tokens": int(res.frame["n_tokens"].sum()) if len(res.frame) else 0}


def tokens_only(n: int, per: int, workdir: Path) -> dict:
    """``probe_only`` over a synthetic store of n images of ``per`` tokens each (see the module docstring)."""
    import numpy as np
    import pandas as pd
    import torch

    from mechsink.cache import StoreConfig, StoreWriter
    store = workdir / f"tokens-{n}x{per}"
    shutil.rmtree(store, ignore_errors=True)
    rng = np.random.default_rng(0)
    w = StoreWriter(store, StoreConfig(sites=("vit.out", "llm.out")), dtype="float16")
    step = max(1, 16384 // per)
    for first in range(0, n, step):
        img = np.repeat(np.arange(first, min(n, first + step)), per)
        x = rng.normal(size=(len(img), 32)).astype(np.float32)
        x[:, 0] += img % 2                                          # the label, weakly
        rows = pd.DataFrame({"sample_idx": img, "token_role": "image", "is_sink": np.arange(len(img)) % per < 2,
                             "image": 0, "label": img % 2, "image_path": [f"images/{i:07d}.png" for i in img]})
        w.add(rows, {"vit.out": torch.from_numpy(x), "llm.out": torch.from_numpy(2 * x)})
    w.finalize()
    try:
        return {**probe_only(str(store), sites=("vit.out", "llm.out")), "tokens_per_image": per, "images": n}
    finally:
        shutil.rmtree(store, ignore_errors=True)


ABLATE_SINKS = (0, 5, 10)


def ablate_only(name: str, folder: str, n: int, bs: int, draws: int) -> dict:
    """Peak memory of ``mechsink.ablation.ablate`` over n images from disk (fresh process) with
    ``out=`` a temporary directory, as a large run is run (its rows stream to disk and the result
    reads them back when asked), after a warm-up over ``bs`` of them; the peak includes the
    summary written at the end. Then, apart: the peak of that summary alone, from a fresh load."""
    import tempfile

    import pyarrow.parquet as pq

    from mechsink.ablation import ROWS, AblationConfig, AblationResult, ablate

    from .data import image_set, image_size
    from .harness import added_mb, peak_rss_kb, reset_peak
    from .models import build
    model = build(name)
    data = image_set(folder, n, image_size(model))
    cfg = AblationConfig(site="proj.out", mode="zero", metric="logit_diff", n_draws=draws, batch_size=bs)
    with tempfile.TemporaryDirectory() as tmp:
        ablate(model, data[:bs], cfg, sinks=list(ABLATE_SINKS), out=Path(tmp) / "warm")
        start = reset_peak()
        t, cpu = time.perf_counter(), time.process_time()
        res = ablate(model, data, cfg, sinks=list(ABLATE_SINKS), out=Path(tmp) / "run")
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        peak = peak_rss_kb()
        held = float(res.samples().memory_usage(deep=True).sum()) / 2**20
        parts = sorted((Path(tmp) / "run" / ROWS).glob("*.parquet"))
        start_stats = reset_peak()
        t = time.perf_counter()
        AblationResult.load(Path(tmp) / "run").summary()
        stats = {"summary_peak_mb": added_mb(peak_rss_kb(), start_stats), "summary_s": time.perf_counter() - t}
        return {"ablate_peak_mb": added_mb(peak, start), "ablate_s": wall, "ablate_cpu_s": cpu,
                "ablate_rows": sum(pq.ParquetFile(p).metadata.num_rows for p in parts), "ablate_parts": len(parts),
                "ablate_disk_mb": sum(p.stat().st_size for p in parts) / 2**20, "ablate_held_mb": held,
                "ablate_result_mb": float(res.frame.memory_usage(deep=True).sum()) / 2**20, **stats}


def merge_only(store: str) -> dict:
    """Peak memory of rebuilding a store's index (the last step of every extract) in this process,
    after a warm-up merge of a one-shard copy (lazy imports are not counted)."""
    from mechsink.cache import merge

    from .harness import added_mb, peak_rss_kb, reset_peak
    root = Path(store)
    warm = root.parent / "merge-warm"
    (warm / "shards").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "store.json", warm / "store.json")
    first = sorted((root / "shards").glob("*.parquet"))[0]
    for f in (first, first.with_suffix(".safetensors")):
        shutil.copy(f, warm / "shards" / f.name)
    merge(warm)
    shutil.rmtree(warm)
    start = reset_peak()
    rows = len(merge(root))
    return {"merge_peak_mb": added_mb(peak_rss_kb(), start), "rows": rows}


def read_only(store: str) -> dict:
    """Peak memory and time of reading a whole store (every site in 8192-row blocks, then the index
    in blocks of as many rows) from a fresh process; then the same read again (crc32 already checked) and verify()."""
    from mechsink.cache import Store, verify
    from mechsink.cache import store as store_mod

    from .harness import added_mb, peak_rss_kb, reset_peak

    def read_all() -> float:
        s = Store.open(store)
        t = time.perf_counter()
        total = 0.0
        for site in s.sites:
            for block in s.iter_batches(site, batch_rows=8192):
                total += float(block[:, 0].astype("float64").sum())
        for part in s.iter_index(batch_rows=8192, columns=["row", "sample_idx", "is_sink"]):
            total += float(part["is_sink"].sum())
        return time.perf_counter() - t

    s = Store.open(store)                          # warm-up: imports, one block of the first shard
    next(s.iter_batches(s.sites[0], batch_rows=16))
    store_mod._VERIFIED.clear()
    start = reset_peak()
    first = read_all()
    peak = peak_rss_kb()
    second = read_all()
    t = time.perf_counter()
    rep = verify(store)
    verify_s = time.perf_counter() - t
    return {"read_peak_mb": added_mb(peak, start), "read_first_s": first, "read_again_s": second,
            "checksum_read_ratio": first / second, "verify_mb_per_s": rep["bytes_checked"] / 2**20 / verify_s,
            "store_mb": rep["bytes_checked"] / 2**20, "read_rows": len(s)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
