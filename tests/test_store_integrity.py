"""Store integrity with known answers: flipped bytes in tensor data, headers and the index;
truncated and missing shards; two concurrent writers; stale locks; a full disk (the kernel's
ENOSPC from /dev/full); verify and repair; resume after fixing an image; changed images."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mechsink.cache import (
    Store,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreWriteError,
    StoreWriter,
    merge,
    verify,
)
from mechsink.cache.tensorfile import read_safetensors_header
from mechsink.errors import MechsinkError

sys.path.insert(0, str(Path(__file__).parent))
from _cache_worker import CONFIG, DIMS, SITES, make_sample, n_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "_cache_worker.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SAMPLES = list(range(15))


def write(path, samples, shard_rows=6, batch=3, **kw):
    with StoreWriter(path, CONFIG, shard_rows=shard_rows, **kw) as w:
        for k in range(0, len(samples), batch):
            chunk = samples[k : k + batch]
            parts = [make_sample(i) for i in chunk]
            rows = pd.concat([p[0] for p in parts], ignore_index=True)
            w.add(rows, {s: torch.cat([p[1][s] for p in parts]) for s in SITES}, samples=chunk)
    return w


def expected(samples):
    parts = [make_sample(i) for i in sorted(samples)]
    return {s: torch.cat([p[1][s] for p in parts]).to(torch.float16) for s in SITES}


def assert_holds(store: Store, samples) -> None:
    want = expected(samples)
    assert set(store.read_index(["sample_idx"]).sample_idx) == {i for i in samples if n_tokens(i)}
    for s in SITES:
        assert torch.equal(store.get(s, as_="torch"), want[s]), s


def flip(path: Path, offset: int) -> None:
    """Flip every bit of one byte (``offset`` may be negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, MechsinkError), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture
def store(tmp_path) -> Store:
    write(tmp_path / "s", SAMPLES)
    s = merge(tmp_path / "s")
    assert len(s.summary["shards"]) >= 3
    return s


def shard_file(store: Store, k: int, ext: str) -> Path:
    return store.path / "shards" / f"{store.summary['shards'][k]}.{ext}"


# ----------------------------------------------------------------------------- corruption


def test_clean_store_verifies(store):
    rep = verify(store.path)
    assert rep["ok"] and rep["merged"] and rep["problems"] == [] and rep["samples"] == len(SAMPLES)
    assert rep["rows"] == sum(n_tokens(i) for i in SAMPLES) == len(store)
    on_disk = sum(p.stat().st_size for p in (store.path / "shards").iterdir()) + (store.path / "index.parquet").stat().st_size
    assert rep["bytes_checked"] == on_disk
    files = store.summary["files"]
    assert set(files) == {"index.parquet"} | {f"shards/{p.name}" for p in (store.path / "shards").iterdir()}
    assert all(v["crc32"].startswith("crc32:") for v in files.values())


def test_flipped_byte_in_tensor_data(store):
    path = shard_file(store, 1, "safetensors")
    start, _ = read_safetensors_header(path)
    flip(path, start + 5)                   # a value of the second shard, as a disk might
    fresh = Store.open(store.path)          # sizes are intact: opening is cheap and succeeds
    in_first = np.array(fresh.index.row[fresh.index.shard == store.summary["shards"][0]])
    assert np.array_equal(fresh.get(SITES[0], rows=in_first),
                          expected(SAMPLES)[SITES[0]][in_first].numpy())   # other shards still read
    with pytest.raises(StoreCorrupt) as e:
        fresh.get(SITES[0])
    one_line(e, str(path), "crc32", "--repair")
    rep = verify(store.path)
    assert not rep["ok"] and [p["file"] for p in rep["problems"]] == [str(path)]
    # repair drops the shard; a rerun of the same writer recomputes exactly its samples
    lost = set(pd.read_parquet(shard_file(store, 1, "parquet")).sample_idx.tolist())
    rep = verify(store.path, repair=True)
    assert rep["repaired"] and "rerun" in rep["next"] and not path.exists()
    w = StoreWriter(store.path, CONFIG)
    todo = sorted(set(SAMPLES) - w.done_samples())
    assert lost and set(todo) >= lost and len(todo) <= len(lost) + 3     # that shard's samples (+ empty ones)
    for i in todo:
        w.add(*make_sample(i), samples=[i])
    assert_holds(w.finalize(), SAMPLES)
    assert verify(store.path)["ok"]


def test_flipped_byte_in_tensor_header(store):
    path = shard_file(store, 0, "safetensors")
    flip(path, 12)                          # inside the JSON header
    with pytest.raises(StoreCorrupt) as e:
        Store.open(store.path).get(SITES[1])
    one_line(e, str(path))
    assert not verify(store.path)["ok"]


def test_flipped_byte_in_index(store):
    before = store.index.copy()
    path = store.path / "index.parquet"
    flip(path, len(path.read_bytes()) // 3)
    with pytest.raises(StoreCorrupt) as e:
        Store.open(store.path).index
    one_line(e, str(path), "--repair")
    with pytest.raises(StoreCorrupt):
        Store.open(store.path).get(SITES[0])    # reads need the index's shard columns
    rep = verify(store.path, repair=True)
    assert [p["file"] for p in rep["problems"]] == [str(path)]
    assert rep["repaired"] == ["rebuilt index.parquet and summary.json from the shards"]
    pd.testing.assert_frame_equal(Store.open(store.path).index, before)


def test_flipped_byte_in_row_parquet(store):
    path = shard_file(store, 2, "parquet")
    flip(path, 60)                          # in the first data page
    rep = verify(store.path)
    assert not rep["ok"] and str(path) in {p["file"].replace(".safetensors", ".parquet") for p in rep["problems"]}
    with pytest.raises(StoreCorrupt) as e:
        merge(store.path)
    one_line(e, str(path))


def test_flipped_byte_in_json_files(store):
    for name in ("summary.json", "store.json"):
        path = store.path / name
        good = path.read_bytes()
        i = good.index(b'"sites"') + 12      # inside a value: still valid JSON, different content
        data = bytearray(good)
        data[i] = ord("x") if data[i] != ord("x") else ord("y")
        path.write_bytes(bytes(data))
        with pytest.raises(StoreCorrupt) as e:
            Store.open(store.path)
        one_line(e, str(path))
        path.write_bytes(good)
    Store.open(store.path)


def test_truncated_and_missing_shards(store):
    path = shard_file(store, 1, "safetensors")
    good = path.read_bytes()
    path.write_bytes(good[:-7])
    with pytest.raises(StoreCorrupt) as e:
        Store.open(store.path)
    one_line(e, str(path), "truncated")
    with pytest.raises(StoreCorrupt) as e:
        StoreWriter(store.path, CONFIG).finalize()     # a merge refuses it too
    one_line(e, str(path))
    path.unlink()
    with pytest.raises(StoreCorrupt) as e:
        Store.open(store.path)
    one_line(e, str(path), "missing")
    path.write_bytes(good)
    pq_path = shard_file(store, 2, "parquet")
    pq_path.unlink()
    with pytest.raises(StoreCorrupt) as e:
        Store.open(store.path)
    one_line(e, str(pq_path), "missing")


# ----------------------------------------------------------------------------- locks


def test_second_writer_in_process_is_refused(tmp_path):
    w = StoreWriter(tmp_path, CONFIG)
    with pytest.raises(StoreLocked) as e:
        StoreWriter(tmp_path, CONFIG)
    one_line(e, f"pid {os.getpid()}", "writer-r00.lock")
    other = StoreWriter(tmp_path, CONFIG, rank=1, world_size=2)     # another rank has its own lock
    other.close()
    with pytest.raises(StoreLocked):
        merge(tmp_path, clean=True)           # cleaning debris while a writer runs would eat its shards
    w.add(*make_sample(1))
    w.finalize()
    StoreWriter(tmp_path, CONFIG).close()   # released


def test_second_process_is_refused_and_dead_lock_is_taken_over(tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, str(WORKER), str(out), "--samples", "40", "--sleep", "0.2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready"), proc.stderr.read()
        with pytest.raises(StoreLocked) as e:
            StoreWriter(out, CONFIG)
        one_line(e, f"pid {proc.pid} ")
        r = subprocess.run([sys.executable, str(WORKER), str(out), "--samples", "40"], env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 and f"pid {proc.pid} " in r.stderr.strip().splitlines()[-1]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close(), proc.stderr.close()
    lock = out / "writer-r00.lock"
    assert lock.read_text().split()[0] == str(proc.pid)       # the dead writer's pid is still written there
    w = StoreWriter(out, CONFIG)                                # ... and its lock is taken over
    assert lock.read_text().split()[0] == str(os.getpid())
    w.close()


# ----------------------------------------------------------------------------- disk full


def test_disk_full_while_committing_a_shard(tmp_path):
    write(tmp_path, [1, 2, 3])
    before = sorted(p.name for p in (tmp_path / "shards").iterdir())
    w = StoreWriter(tmp_path, CONFIG, shard_rows=1000)
    name = f"r00-{len(before) // 2:06d}"
    (tmp_path / "shards" / f"{name}.safetensors.tmp").symlink_to("/dev/full")   # writes fail with ENOSPC
    for i in (4, 5, 6):
        w.add(*make_sample(i))
    with pytest.raises(StoreWriteError) as e:
        w.close()
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    one_line(e, "disk full", str(tmp_path), "rerun")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == before     # no .tmp, nothing half-made
    w = StoreWriter(tmp_path, CONFIG)                     # the lock was released; resume finishes the job
    assert w.done_samples() == {1, 2, 3}
    for i in (4, 5, 6):
        w.add(*make_sample(i))
    (tmp_path / ".index.parquet.tmp").symlink_to("/dev/full")
    with pytest.raises(StoreWriteError) as e:
        w.finalize()
    one_line(e, "disk full", "index.parquet")
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "index.parquet").exists()
    assert_holds(merge(tmp_path), [1, 2, 3, 4, 5, 6])


def test_unwritable_store_is_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError) as e:
        StoreWriter(tmp_path / "file", CONFIG)
    one_line(e, "file")


# ----------------------------------------------------------------------------- layout and lazy reads


def test_shards_are_cut_by_bytes(tmp_path):
    per_row = 2 * sum(DIMS.values())        # float16
    write(tmp_path, SAMPLES, shard_rows=10_000, batch=1, shard_bytes=5 * per_row)
    store = merge(tmp_path)
    sizes = [read_safetensors_header(p)[1][SITES[0]]["shape"][0]
             for p in sorted((tmp_path / "shards").glob("*.safetensors"))]
    # cut as soon as 5 rows are buffered, never inside a sample (at most 4 rows each)
    assert all(5 <= n <= 8 for n in sizes[:-1]) and sum(sizes) == len(store)
    assert_holds(store, SAMPLES)


def test_reads_do_not_load_the_index(store):
    fresh = Store.open(store.path)
    rows = np.array([3, 0, len(fresh) - 1])
    got = fresh.get(SITES[1], rows=rows)
    assert fresh._index is None                               # the index was read a column pair at a time
    assert np.array_equal(got, expected(SAMPLES)[SITES[1]][rows].numpy())
    blocks = list(fresh.iter_index(batch_rows=7, columns=["row", "sample_idx"]))
    assert [len(b) for b in blocks[:-1]] == [7] * (len(blocks) - 1)
    assert pd.concat(blocks, ignore_index=True).equals(fresh.read_index(["row", "sample_idx"]))
    assert fresh._index is None and fresh.index["row"].tolist() == list(range(len(fresh)))


def test_interleaved_ranks_and_retried_samples_merge_in_sample_order(tmp_path, monkeypatch):
    """Samples spread over shards of two ranks, one written last (a retry), shard rows in row groups
    of 3 (so samples straddle row groups): the streaming merge puts every row where a full sort would."""
    import pyarrow.parquet as pq

    import mechsink.cache.writer as writer_module
    monkeypatch.setattr(writer_module, "SHARD_ROW_GROUP", 3)
    ws = [StoreWriter(tmp_path, CONFIG, rank=r, world_size=2, shard_rows=9) for r in (0, 1)]
    order = [i for i in range(20) if i != 6] + [6]
    for i in order:
        ws[i % 2].add(*make_sample(i))
    for w in ws:
        w.close()
    store = merge(tmp_path, clean=True)
    assert max(pq.read_metadata(p).num_row_groups for p in (tmp_path / "shards").glob("*.parquet")) >= 3
    assert store.index.sample_idx.is_monotonic_increasing
    assert_holds(store, range(20))
    rows = pd.concat([make_sample(i)[0] for i in range(20)], ignore_index=True)
    for c in rows.columns:
        assert store.index[c].tolist() == rows[c].tolist(), c


# ----------------------------------------------------------------------------- the CLI


def test_verify_command(store):
    code = "from mechsink.cli import app; app()"
    run = lambda *a: subprocess.run([sys.executable, "-c", code, "verify", "--cache", str(store.path), *a],  # noqa: E731
                                    env=ENV, capture_output=True, text=True, timeout=120)
    r = run("--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    path = shard_file(store, 0, "safetensors")
    flip(path, -1)
    r = run()
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 damaged file(s)") and str(path) in err[0]
    r = run("--repair", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["repaired"]
    assert not path.exists()


def test_commit_without_copy_file_range(tmp_path, monkeypatch):
    """Where the kernel cannot copy between the files, the commit copies by hand: same bytes, same crc."""
    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    write(tmp_path, SAMPLES)
    store = merge(tmp_path)
    assert verify(tmp_path)["ok"]
    assert_holds(store, SAMPLES)
