"""The activation store: round trips per dtype, disk layout, resume, crash safety under kill -9, torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from mechsink.cache import Store, StoreConfig, StoreError, StoreWriter, merge, store_id
from mechsink.cache.tensorfile import read_safetensors_header
from mechsink.errors import MechsinkError

sys.path.insert(0, str(Path(__file__).parent))
from _cache_worker import CONFIG, DIMS, SITES, make_sample, n_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "_cache_worker.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
N = 40  # samples in the subprocess runs


def write(path, samples, dtype="float16", shard_rows=8, batch=3, config=CONFIG):
    """In-process twin of the worker: add ``samples`` in batches, close (no finalize)."""
    with StoreWriter(path, config, shard_rows=shard_rows, dtype=dtype) as w:
        for k in range(0, len(samples), batch):
            chunk = samples[k : k + batch]
            parts = [make_sample(i) for i in chunk]
            rows = pd.concat([p[0] for p in parts], ignore_index=True)
            w.add(rows, {s: torch.cat([p[1][s] for p in parts]) for s in SITES}, samples=chunk)
    return w


def expected(samples, dtype):
    """What the store must hold for ``samples``: rows in sample order and tensors rounded to ``dtype``."""
    parts = [make_sample(i) for i in sorted(samples)]
    rows = pd.concat([p[0] for p in parts], ignore_index=True)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    return rows, {s: torch.cat([p[1][s] for p in parts]).to(tdt) for s in SITES}


def committed(path) -> list[int]:
    """sample_idx recorded in committed shard parquet files (read-only; leaves debris alone)."""
    out = []
    for p in (Path(path) / "shards").glob("*.parquet"):
        out += json.loads(pq.read_schema(p).metadata[b"mechsink.samples"])
    return out


def assert_same_store(a: Store, b: Store) -> None:
    drop = ["shard", "shard_row"]
    pd.testing.assert_frame_equal(a.index.drop(columns=drop), b.index.drop(columns=drop))
    assert a.summary["n_samples"] == b.summary["n_samples"]
    for s in SITES:
        assert torch.equal(a.get(s, as_="torch"), b.get(s, as_="torch")), s


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_read_equals_written(tmp_path, dtype):
    samples = list(range(23))
    write(tmp_path, samples[::-1], dtype=dtype)  # written out of order, read in sample order
    store = merge(tmp_path)
    rows, tensors = expected(samples, dtype)
    assert len(store) == sum(n_tokens(i) for i in samples) == len(rows)
    idx = store.index
    assert idx["row"].tolist() == list(range(len(rows)))
    for c in rows.columns:
        assert idx[c].tolist() == rows[c].tolist(), c
    assert idx["planted_label"].str.startswith("class").all()
    assert store.dims == DIMS and store.dtype == dtype
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(store))[:17]
    for s in SITES:
        t = store.get(s, as_="torch")
        assert t.dtype == tensors[s].dtype and torch.equal(t, tensors[s])
        a = store.get(s)
        want_np = np.float32 if dtype == "bfloat16" else np.dtype(dtype)
        assert a.dtype == want_np and np.array_equal(a, tensors[s].float().numpy())
        assert np.array_equal(store.get(s, rows=pick), a[pick])  # arbitrary order
        mask = (idx["token_role"] == "image").to_numpy()
        assert np.array_equal(store.get(s, rows=mask), a[mask])
        assert np.array_equal(store.get(s, rows=idx.row[idx.sample_idx == 7]), a[idx.sample_idx == 7])
        blocks = list(store.iter_batches(s, batch_rows=5))
        assert [len(b) for b in blocks[:-1]] == [5] * (len(blocks) - 1)
        assert np.array_equal(np.concatenate(blocks), a)
        assert store.get(s, rows=[]).shape == (0, DIMS[s])


def test_disk_layout(tmp_path):
    write(tmp_path, list(range(12)), shard_rows=6)
    store = StoreWriter(tmp_path, CONFIG).finalize()
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names and all(re.fullmatch(r"r00-\d{6}\.(safetensors|parquet)", n) for n in names)
    stems = sorted({n.split(".")[0] for n in names})
    assert names == sorted([f"{s}.safetensors" for s in stems] + [f"{s}.parquet" for s in stems])
    assert stems == [f"r00-{k:06d}" for k in range(len(stems))]
    for stem in stems:
        tensors = load_file(tmp_path / "shards" / f"{stem}.safetensors")  # the reference reader agrees
        start, _ = read_safetensors_header(tmp_path / "shards" / f"{stem}.safetensors")
        assert start % 8 == 0  # data section aligned, as the format asks
        n = pq.read_metadata(tmp_path / "shards" / f"{stem}.parquet").num_rows
        assert set(tensors) == set(SITES)
        assert {s: tuple(t.shape) for s, t in tensors.items()} == {s: (n, DIMS[s]) for s in SITES}
        assert n >= 6 or stem == stems[-1]  # cut at shard_rows, whole samples only
    cfg = json.loads((tmp_path / "store.json").read_text())
    hashed = {k: v for k, v in cfg.items() if k not in ("id", "mechsink_version")}
    canon = json.dumps(hashed, sort_keys=True, separators=(",", ":")).encode()
    assert cfg["id"] == hashlib.sha256(canon).hexdigest() == store_id(CONFIG, "float16") == store.id
    assert cfg["sites"] == list(SITES) and cfg["dtype"] == "float16" and cfg["mechsink_version"]
    index = pq.read_table(tmp_path / "index.parquet").to_pandas()
    assert index["row"].tolist() == list(range(len(index)))
    assert index["sample_idx"].is_monotonic_increasing
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_rows"] == sum(n_tokens(i) for i in range(12)) == len(index)
    assert summary["n_samples"] == 12 and summary["shards"] == stems and summary["sites"] == DIMS


def test_config_mismatch_is_one_line_error(tmp_path):
    write(tmp_path, [0, 1, 2])
    other = StoreConfig(sites=SITES, model="another-model")
    for cfg, dtype in [(other, "float16"), (CONFIG, "bfloat16")]:
        with pytest.raises(StoreError, match="another config") as e:
            StoreWriter(tmp_path, cfg, dtype=dtype)
        assert "\n" not in str(e.value) and isinstance(e.value, MechsinkError)
    assert StoreWriter(tmp_path, dict(sites=list(SITES), tokens=list(CONFIG.tokens), model="synthetic",
                                      data="worker-v1")).done_samples() == {0, 1, 2}


def test_resume_skips_done_and_refuses_duplicates(tmp_path):
    write(tmp_path, [0, 1, 2, 3, 4])  # sample 0 has no rows but counts as done
    w = StoreWriter(tmp_path, CONFIG)
    assert w.done_samples() == {0, 1, 2, 3, 4}
    rows, tensors = make_sample(3)
    with pytest.raises(StoreError, match="already in the store"):
        w.add(rows, tensors)
    rows, tensors = make_sample(6)
    w.add(rows, tensors)
    assert 6 in w.done_samples()
    store = w.finalize()
    assert sorted(store.index.sample_idx.unique()) == [1, 2, 3, 4, 6]
    assert store.summary["n_samples"] == 6


def test_debris_is_cleaned_and_ignored(tmp_path):
    write(tmp_path, list(range(6)), shard_rows=4)
    shards = tmp_path / "shards"
    good = sorted(p.stem for p in shards.glob("*.parquet"))
    # what a kill leaves behind: tmp files, tensors renamed but parquet not yet
    (shards / "r00-000050.safetensors.tmp").write_bytes(b"partial")
    (shards / "r00-000050.parquet.tmp").write_bytes(b"partial")
    (shards / "r00-000051.safetensors").write_bytes((shards / f"{good[0]}.safetensors").read_bytes())
    (shards / "r01-000000.safetensors.tmp").write_bytes(b"another rank, maybe still writing")
    w = StoreWriter(tmp_path, CONFIG)
    left = sorted(p.name for p in shards.iterdir())
    kept = [f"{g}.{x}" for g in good for x in ("parquet", "safetensors")]
    assert left == sorted(kept + ["r01-000000.safetensors.tmp"])
    rows, tensors = make_sample(6)
    w.add(rows, tensors)
    store = w.finalize()  # world_size 1: nobody else writes, so all debris goes
    assert not list(shards.glob("*.tmp"))
    assert f"r00-{len(good):06d}" in store.summary["shards"]  # numbering continues after the last shard
    assert sorted(store.index.sample_idx.unique()) == [i for i in range(7) if n_tokens(i)]


def test_stale_or_missing_index_is_an_error(tmp_path):
    with pytest.raises(StoreError, match="not a store"):
        Store.open(tmp_path)
    write(tmp_path, [1, 2])
    with pytest.raises(StoreError, match="finalize"):
        Store.open(tmp_path)
    merge(tmp_path)
    write(tmp_path, [3])
    with pytest.raises(StoreError, match="out of date"):
        Store.open(tmp_path)
    assert len(merge(tmp_path)) == sum(n_tokens(i) for i in [1, 2, 3])


def test_bad_input_is_one_line_error(tmp_path):
    w = StoreWriter(tmp_path, CONFIG)
    rows, tensors = make_sample(3)
    bad = [
        (rows.drop(columns="sample_idx"), tensors, "sample_idx"),
        (rows.assign(row=0), tensors, "reserved"),
        (rows.assign(sink_class="maybe"), tensors, "sink_class"),
        (rows, {SITES[0]: tensors[SITES[0]]}, "sites"),
        (rows, {**tensors, SITES[0]: tensors[SITES[0]][:-1]}, "shape"),
        (rows.assign(llm_pos="x"), tensors, "llm_pos"),
    ]
    for r, t, msg in bad:
        with pytest.raises(StoreError, match=msg) as e:
            w.add(r, t)
        assert "\n" not in str(e.value)
    w.add(rows, tensors)
    rows4, tensors4 = make_sample(4)
    with pytest.raises(StoreError, match="width"):
        w.add(rows4, {**tensors4, SITES[1]: torch.zeros(len(rows4), 3)})
    with pytest.raises(StoreError, match="columns changed"):
        w.add(rows4.drop(columns="planted_label"), tensors4)
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter(tmp_path / "x", CONFIG, dtype="int8")
    store = w.finalize()
    with pytest.raises(StoreError, match="not in this store"):
        store.get("vit.blocks.0.hook_resid_post")
    with pytest.raises(StoreError, match="row numbers"):
        store.get(SITES[0], rows=[len(store)])


def test_ranks_without_a_process_group(tmp_path):
    ws = [StoreWriter(tmp_path, CONFIG, rank=r, world_size=2, shard_rows=4) for r in (0, 1)]
    for i in range(10):
        ws[i % 2].add(*make_sample(i), samples=[i])
    ws[0].finalize()  # rank 1 still holds samples: the index misses them
    assert ws[1].finalize() is None
    with pytest.raises(StoreError, match="out of date"):
        Store.open(tmp_path)
    store = merge(tmp_path)
    rows, tensors = expected(range(10), "float16")
    assert store.index["sample_idx"].tolist() == rows["sample_idx"].tolist()
    assert {n[:3] for n in store.summary["shards"]} == {"r00", "r01"} and store.summary["n_samples"] == 10
    for s in SITES:
        assert torch.equal(store.get(s, as_="torch"), tensors[s])


def test_write_failure_surfaces(tmp_path):
    w = StoreWriter(tmp_path, CONFIG, shard_rows=1)
    rows, tensors = make_sample(1)
    w.add(rows, tensors)
    w.close()
    w = StoreWriter(tmp_path, CONFIG, shard_rows=1)
    (tmp_path / "shards").rename(tmp_path / "gone")  # the disk thread's next write fails
    with pytest.raises(OSError):
        for i in range(2, 6):
            w.add(*make_sample(i))
        w.close()


def test_reader_memory_does_not_grow_with_store(tmp_path):
    cfg = StoreConfig(sites=("x",))
    peaks = {}
    for n_rows in (2_000, 16_000):
        path = tmp_path / str(n_rows)
        with StoreWriter(path, cfg, shard_rows=1_500, dtype="float32") as w:
            for i in range(0, n_rows, 500):
                rows = pd.DataFrame({"sample_idx": i, "token_role": "image"}, index=range(500))
                w.add(rows, {"x": torch.arange(i, i + 500, dtype=torch.float32)[:, None].expand(500, 256)})
        store = w.finalize()
        tracemalloc.start()
        total = 0.0
        for block in store.iter_batches("x", batch_rows=256):
            total += float(block[:, 0].sum())
        peaks[n_rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert total == n_rows * (n_rows - 1) / 2
    # a few 256 KB blocks plus int64 row arrays; the 16 MB store itself is never resident
    assert peaks[16_000] < 4 * (256 * 256 * 4) + 16_000 * 16, peaks
    assert peaks[16_000] - peaks[2_000] < 14_000 * 16, peaks  # only the index-sized arrays grow


# ----------------------------------------------------------------------------- real processes


def run_worker(out, *extra, torchrun=False):
    cmd = [sys.executable, str(WORKER), str(out), "--samples", str(N), *extra]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:]]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_worker(out)
    return Store.open(out)


def test_reference_run_holds_the_known_data(reference):
    rows, tensors = expected(range(N), "float16")
    assert reference.index["sample_idx"].tolist() == rows["sample_idx"].tolist()
    assert len(reference.summary["shards"]) > 3  # many shards, so resume points exist between them
    for s in SITES:
        assert torch.equal(reference.get(s, as_="torch"), tensors[s])


def read_line(proc, timeout=60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "worker is silent"
    return proc.stdout.readline()


def test_kill_9_and_resume_equals_uninterrupted(tmp_path, reference):
    """Kill -9 after a random number of batches plus a random delay (mid-compute, mid-write or mid-commit)."""
    rnd = random.Random(20240611)
    out = tmp_path / "store"
    cmd = [sys.executable, str(WORKER), str(out), "--samples", str(N), "--sleep", "0.01"]
    progress = []
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert read_line(proc).startswith("ready"), proc.stderr.read()
        for _ in range(rnd.randint(1, 3)):  # at most 9 of the 14 batches: no run can finish
            assert read_line(proc).startswith("added"), proc.stderr.read()
        time.sleep(rnd.uniform(0.0, 0.04))
        assert proc.poll() is None, "worker finished before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close(), proc.stderr.close()
        done = committed(out)
        assert len(done) == len(set(done))  # never a sample in two shards
        progress.append(len(done))
    assert 0 < progress[-1] < N and progress == sorted(progress), progress
    assert not (out / "index.parquet").exists()
    run_worker(out)
    assert not list((out / "shards").glob("*.tmp"))
    assert_same_store(Store.open(out), reference)


def test_torchrun_two_ranks_equals_one_process(tmp_path, reference):
    out = tmp_path / "store"
    r = run_worker(out, torchrun=True)
    assert "done rank=0" in r.stdout and "done rank=1" in r.stdout
    stems = Store.open(out).summary["shards"]
    assert {s[:3] for s in stems} == {"r00", "r01"}
    assert_same_store(Store.open(out), reference)


def test_sample_set_behaves_like_a_set_of_indices():
    from mechsink.cache import SampleSet
    rng = np.random.default_rng(0)
    ref: set[int] = set()
    s = SampleSet()
    for _ in range(50):                                        # random updates, duplicates included
        add = rng.integers(0, 3000, rng.integers(0, 40)).tolist()
        s.update(add)
        ref.update(add)
        assert len(s) == len(ref) and s == ref
    assert list(s) == sorted(ref)
    probe = np.arange(-2, 3100)
    assert np.array_equal(s.contains(probe), np.array([int(i) in ref for i in probe]))
    assert (s | [5000, 1]) == ref | {5000, 1} and s == ref    # | copies
    assert set(range(100)) - s == set(range(100)) - ref
    assert "x" not in s and -1 not in s
    with pytest.raises(StoreError):
        s.update([-3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_orders_any_interleaving_of_ranks_batches_and_shards(tmp_path, seed):
    """3 ranks, samples dealt at random, added in random order and batch sizes (some batches list a
    sample without rows), small shards: the merged store is the samples in order, row for row, and
    the index points every row at its tensors (the runs a merge coalesces never skip a sample)."""
    rng = np.random.default_rng(seed)
    n = 30
    owner = rng.integers(0, 3, n)
    ws = [StoreWriter(tmp_path, CONFIG, rank=r, world_size=3, shard_rows=int(rng.integers(3, 12))) for r in range(3)]
    rowless = set(rng.choice(n, 4, replace=False).tolist())
    for r in range(3):
        mine = rng.permutation(np.flatnonzero(owner == r)).tolist()
        while mine:
            k = int(rng.integers(1, 4))
            chunk, mine = mine[:k], mine[k:]
            parts = [make_sample(i) for i in chunk if i not in rowless]
            if not parts:
                empty = make_sample(chunk[0])[0].iloc[:0]
                ws[r].add(empty, {s: torch.zeros(0, DIMS[s]) for s in SITES}, samples=chunk)
                continue
            rows = pd.concat([p[0] for p in parts], ignore_index=True)
            ws[r].add(rows, {s: torch.cat([p[1][s] for p in parts]) for s in SITES}, samples=chunk)
    for w in ws:
        w.close()
    store = merge(tmp_path)
    with_rows = [i for i in range(n) if i not in rowless and n_tokens(i) > 0]
    rows, tensors = expected(with_rows, "float16")
    assert store.summary["n_samples"] == n and store.summary["n_samples_with_rows"] == len(with_rows)
    for c in rows.columns:
        assert store.index[c].tolist() == rows[c].tolist(), c
    for s in SITES:
        assert torch.equal(store.get(s, as_="torch"), tensors[s])


@pytest.mark.parametrize("groups, least, most", [(3, 1, 1 << 16), (1000, 1, 5), (64, 1 << 16, 1 << 16)])
def test_index_row_groups_are_bounded_in_number_and_size(tmp_path, monkeypatch, groups, least, most):
    """The index is written in about INDEX_GROUPS row groups (a parquet writer holds metadata per
    group until it closes) of INDEX_MIN_ROWS to INDEX_ROW_GROUP rows, and reads back row for row."""
    import mechsink.cache.index as index_mod
    monkeypatch.setattr(index_mod, "INDEX_GROUPS", groups)
    monkeypatch.setattr(index_mod, "INDEX_MIN_ROWS", least)
    monkeypatch.setattr(index_mod, "INDEX_ROW_GROUP", most)
    write(tmp_path, list(range(N)))
    store = merge(tmp_path)
    n_rows = store.summary["n_rows"]
    size = min(most, max(least, -(-n_rows // groups)))
    md = pq.read_metadata(tmp_path / "index.parquet")
    assert n_rows > 3 * 5 and md.num_row_groups == -(-n_rows // size)
    assert [md.row_group(k).num_rows for k in range(md.num_row_groups - 1)] == [size] * (md.num_row_groups - 1)
    rows, _ = expected(range(N), "float16")
    assert store.index["sample_idx"].tolist() == rows["sample_idx"].tolist()
    assert store.index["row"].tolist() == list(range(n_rows))


@pytest.mark.parametrize("where", ["after", "before"])
def test_an_interrupt_inside_add_leaves_a_consistent_store(tmp_path, monkeypatch, where):
    """Ctrl-C inside ``add()`` right after the batch went to the disk thread (``after``: it is
    committed with its samples) or right before (``before``: it is not, nor is its empty shard):
    closing commits what the disk thread holds, and the store is exactly those samples."""
    real = StoreWriter._submit
    seen = []

    def submit(self, fn, *args):
        if fn.__name__ == "_append":
            seen.append(1)
            if len(seen) == 4 and where == "before":
                raise KeyboardInterrupt
            real(self, fn, *args)
            if len(seen) == 4:
                raise KeyboardInterrupt
            return
        real(self, fn, *args)
    monkeypatch.setattr(StoreWriter, "_submit", submit)
    for shard_rows in (10 ** 6, 1):          # one shard; or one per batch (the 4th then has no journal)
        seen.clear()
        path = tmp_path / str(shard_rows)
        with pytest.raises(KeyboardInterrupt):
            write(path, list(range(N)), shard_rows=shard_rows, batch=3)
        assert_holds(merge(path), list(range(12 if where == "after" else 9)))   # 4 batches of 3, or the first 3


def assert_holds(store, kept):
    """The store holds exactly the samples `kept`, row for row and tensor for tensor."""
    rows, tensors = expected(kept, "float16")
    assert store.summary["n_samples"] == len(kept) and store.index["sample_idx"].tolist() == rows["sample_idx"].tolist()
    for s in SITES:
        assert torch.equal(store.get(s, as_="torch"), tensors[s])
