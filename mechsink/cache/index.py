"""Merging every committed shard into ``index.parquet`` (all rows in sample order, with their
global ``row``) and ``summary.json``, in row groups, so memory does not grow with the store."""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mechsink.cache.layout import (
    INDEX_ROW_GROUP, StoreCorrupt, StoreError, _NP_OF_ST, _ST_DTYPES, _ShardMeta, _canonical, _clean_debris,
    _crc_hex, _first_line, _fsync_dir, _fsync_file, _read_config, _repair_shard, _shard_names,
    _unlink_quietly, _write_error, _write_json_atomic, file_crc32,
)
from mechsink.cache.locks import _hold_all_locks
from mechsink.cache.rows import _batch_table, _normalise_rows, _rows_table
from mechsink.cache.store import Store
from mechsink.cache.tensorfile import _shard_dims, read_safetensors_header
from mechsink.memory import trim as _trim


INDEX_GROUPS = 64                   # row groups the index aims at: a parquet writer holds ~15 kB per group until it closes
INDEX_MIN_ROWS = 2048               # fewest rows per index row group (but the last)


def _shard_runs(table_path: Path, code: int, samples: np.ndarray) -> tuple[np.ndarray, ...]:
    """(sample, code, shard_row, length, samples with rows) of the runs of one shard's rows in
    (sample, writing) order. ``samples``: every sample of the store, sorted; runs of samples that
    are next to each other there and to each other in the shard are one run, so a merge holds a
    few runs per shard, not one per sample."""
    try:
        # ParquetFile.read, not pq.read_table: the dataset reader keeps ~600 kB per file it opened
        s = pq.ParquetFile(table_path, page_checksum_verification=True).read(
            columns=["sample_idx"], use_threads=False)["sample_idx"]
    except (pa.ArrowException, OSError) as e:
        raise StoreCorrupt(f"{table_path} is corrupt ({_first_line(e)}); {_repair_shard(table_path)}") from None
    s = s.to_numpy()
    if not len(s):
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z, 0
    order = np.argsort(s, kind="stable")
    ss = s[order]
    starts = np.r_[0, np.flatnonzero((np.diff(ss) != 0) | (np.diff(order) != 1)) + 1]
    lengths = np.diff(np.r_[starts, len(s)])
    first, srow = ss[starts].astype(np.int64), order[starts].astype(np.int64)
    rank = np.searchsorted(samples, first)
    joins = (np.diff(rank) <= 1) & (srow[:-1] + lengths[:-1] == srow[1:])
    keep = np.r_[0, np.flatnonzero(~joins) + 1]
    n_with_rows = int(np.count_nonzero(np.diff(ss)) + 1)
    return (first[keep], np.full(len(keep), code, dtype=np.int64), srow[keep],
            np.add.reduceat(lengths, keep).astype(np.int64), n_with_rows)


def _coalesce(code: np.ndarray, srow: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, ...]:
    """Merge runs that continue each other in the same shard: (out_start, code, shard_row, length)."""
    if not len(code):
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z
    cont = (code[1:] == code[:-1]) & (srow[:-1] + length[:-1] == srow[1:])
    first = np.r_[0, np.flatnonzero(~cont) + 1]
    length = np.add.reduceat(length, first)
    out_start = np.r_[0, np.cumsum(length)[:-1]].astype(np.int64)
    return out_start, code[first], srow[first], length.astype(np.int64)


class _TableCache:
    """The last few row groups read from shard parquets. A merge visits the rows in sample order,
    which walks each rank's shards forwards: one cached row group per rank suffices."""

    def __init__(self, metas: list["_ShardMeta"], schema: pa.Schema, size: int) -> None:
        self.metas, self.schema, self.size = metas, schema, size
        self.tables: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self.files: OrderedDict[int, pq.ParquetFile] = OrderedDict()

    def _file(self, code: int) -> pq.ParquetFile:
        f = self.files.get(code)
        if f is None:
            f = self.files[code] = pq.ParquetFile(self.metas[code].parquet, page_checksum_verification=True)
            while len(self.files) > self.size:
                self.files.popitem(last=False)
        else:
            self.files.move_to_end(code)
        return f

    def pieces(self, code: int, row: int, n: int) -> Iterator[pa.Table]:
        """Rows [row, row + n) of shard ``code``, as slices of its row groups."""
        starts = self.metas[code].group_starts
        while n > 0:
            k = int(np.searchsorted(starts, row, side="right")) - 1
            t = self.get(code, k)
            take = min(n, int(starts[k]) + t.num_rows - row)
            yield t.slice(row - int(starts[k]), take)
            row, n = row + take, n - take

    def get(self, code: int, group: int) -> pa.Table:
        key = (code, group)
        t = self.tables.get(key)
        if t is None:
            path = self.metas[code].parquet
            try:
                t = self._file(code).read_row_group(group, use_threads=False).replace_schema_metadata(None)
            except (pa.ArrowException, OSError) as e:
                raise StoreCorrupt(f"{path} is corrupt ({_first_line(e)}); {_repair_shard(path)}") from None
            if t.schema != self.schema:
                t = t.cast(self.schema)
            self.tables[key] = t
            while len(self.tables) > self.size:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(key)
        return t


def merge(path: str | os.PathLike, clean: bool = False) -> "Store":
    """Build index.parquet and summary.json from every committed shard; return the opened store.

    Rows are sorted by (sample_idx, order of writing); ``row`` is the global position. The index
    is written in row groups from a few shard tables at a time, so memory does not grow with the
    store. ``clean`` also deletes every rank's tmp files and uncommitted tensors, and refuses to
    run while a writer holds a lock on the store.
    """
    root = Path(path)
    cfg = _read_config(root)
    shards = root / "shards"
    locks = _hold_all_locks(root) if clean else []
    try:
        if clean:
            _clean_debris(shards, "r")
        return _merge(root, cfg, _shard_names(shards))
    finally:
        for lock in locks:
            lock.release()


def _merge(root: Path, cfg: dict, names: list[str]) -> "Store":
    _trim()                            # what the extraction loop freed, before the merge adds its own
    sites, dtype = tuple(cfg["sites"]), cfg["dtype"]
    metas: list[_ShardMeta] = []
    schemas: list[pa.Schema] = []      # the distinct ones (one, unless a column's type changed)
    dims: dict[str, int] = {}
    for name in names:
        m = _ShardMeta(root, name)
        sd = _shard_dims(m.tensors, sites, dtype)
        n_t = {read_safetensors_header(m.tensors)[1][s]["shape"][0] for s in sites}
        if n_t != {m.num_rows}:
            raise StoreCorrupt(f"{m.name} has {m.num_rows} rows but tensors of {sorted(n_t)} rows; {_repair_shard(m.parquet)}")
        if dims and sd != dims:
            raise StoreError(f"{m.name} has site widths {sd}, other shards {dims}")
        dims = sd
        if schemas and m.schema.names != schemas[0].names:
            raise StoreError(f"{m.name} has columns {m.schema.names}, other shards {schemas[0].names}")
        if not schemas or not m.schema.equals(schemas[-1]):
            schemas.append(m.schema)
        m.schema = None                # a schema per shard would pin memory in a store of thousands
        size = m.tensors.stat().st_size
        if size != m.tensor_bytes:
            raise StoreCorrupt(f"{m.tensors} has {size} bytes, {m.tensor_bytes} were written (truncated or "
                               f"altered); {_repair_shard(m.tensors)}")
        metas.append(m)
    all_samples = np.concatenate([m.samples for m in metas]) if metas else np.zeros(0, dtype=np.int64)
    uniq, counts = np.unique(all_samples, return_counts=True)
    if (counts > 1).any():
        s = int(uniq[np.argmax(counts > 1)])
        two = [m.name for m in metas if s in m.samples][:2]
        raise StoreError(f"sample {s} is in both shards {two[0]} and {two[1]}; remove one of them")
    del counts, all_samples
    if schemas:
        try:
            schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise StoreError(f"shards disagree on column types: {_first_line(e)}") from None
    else:
        schema = _rows_table([_batch_table(_normalise_rows(pd.DataFrame({"sample_idx": [], "token_role": []})))]).schema
    _trim()
    runs = [_shard_runs(m.parquet, code, uniq) for code, m in enumerate(metas)]
    sample, code, srow, length = (np.concatenate([r[i] for r in runs]) if runs else np.zeros(0, dtype=np.int64)
                                  for i in range(4))
    n_with_rows = sum(r[4] for r in runs)            # shards hold disjoint samples
    order = np.lexsort((srow, sample))
    out_start, code, srow, length = _coalesce(code[order], srow[order], length[order])
    n_rows = int(length.sum())

    out_schema = pa.schema([pa.field("row", pa.int64()), *schema, pa.field("shard", pa.string()),
                            pa.field("shard_row", pa.int64())])
    tmp = root / ".index.parquet.tmp"
    roles: dict[str, int] = {}
    classes: dict[str, int] = {}
    # one shard table per rank at a time suffices (runs interleave by rank). Row groups: about
    # INDEX_GROUPS of them (the writer's metadata grows per group, the group's table with its rows),
    # at least INDEX_MIN_ROWS and at most INDEX_ROW_GROUP rows, so that neither grows with the store for long
    cache = _TableCache(metas, schema, size=len({n.split("-")[0] for n in names}) + 1)
    group = int(min(INDEX_ROW_GROUP, max(INDEX_MIN_ROWS, -(-n_rows // INDEX_GROUPS))))
    try:
        with pq.ParquetWriter(tmp, out_schema, write_page_checksum=True) as writer:
            pieces: list[tuple[int, int, int]] = []
            buffered = 0
            written = 0
            n_groups = 0

            def flush_group() -> None:
                nonlocal pieces, buffered, written, n_groups
                if not pieces:
                    return
                parts = [part for c, r, n in pieces for part in cache.pieces(c, r, n)]
                t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
                shard_col = pa.DictionaryArray.from_arrays(
                    pa.array(np.repeat([c for c, _, _ in pieces], [n for _, _, n in pieces]).astype(np.int32)),
                    pa.array(names, type=pa.string())).cast(pa.string())
                shard_row = np.concatenate([np.arange(r, r + n, dtype=np.int64) for _, r, n in pieces])
                t = t.add_column(0, "row", pa.array(np.arange(written, written + t.num_rows, dtype=np.int64)))
                t = t.append_column("shard", shard_col).append_column("shard_row", pa.array(shard_row))
                for counter, col in ((roles, "token_role"), (classes, "sink_class")):
                    for item in pc.value_counts(t[col]).to_pylist():
                        counter[item["values"]] = counter.get(item["values"], 0) + item["counts"]
                writer.write_table(t, row_group_size=group)
                written += t.num_rows
                del t, parts
                n_groups += 1
                if n_groups % 16 == 0:
                    _trim()
                pieces, buffered = [], 0

            for c, r, n in zip(code.tolist(), srow.tolist(), length.tolist()):
                while n > 0:
                    take = min(n, group - buffered)
                    pieces.append((c, r, take))
                    buffered += take
                    r, n = r + take, n - take
                    if buffered >= group:
                        flush_group()
            flush_group()
        _fsync_file(tmp)
        index_crc, index_size = file_crc32(tmp)
        os.replace(tmp, root / "index.parquet")
        _fsync_dir(root)
    except OSError as e:
        _unlink_quietly(tmp)
        raise _write_error(e, "index.parquet", root) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    finally:
        cache.tables.clear()
        cache.files.clear()
        _trim()
    item = np.dtype(_NP_OF_ST[_ST_DTYPES[dtype]]).itemsize
    files = {"index.parquet": {"crc32": index_crc, "bytes": index_size}}
    for m in metas:
        crc, size = file_crc32(m.parquet)
        files[f"shards/{m.name}.parquet"] = {"crc32": crc, "bytes": size}
        files[f"shards/{m.name}.safetensors"] = {"crc32": m.tensor_crc, "bytes": m.tensor_bytes}
    summary = {
        "id": cfg["id"],
        "n_rows": n_rows,
        "n_samples": int(len(uniq)),
        "n_samples_with_rows": n_with_rows,
        "sites": {s: int(dims.get(s, 0)) for s in sites},
        "dtype": dtype,
        "tensor_bytes": int(n_rows * item * sum(dims.values())),
        "rows_by_role": {str(k): int(v) for k, v in sorted(roles.items())},
        "rows_by_sink_class": {str(k): int(v) for k, v in sorted(classes.items())},
        "shards": names,
        "files": files,
    }
    summary["crc32"] = _crc_hex(zlib.crc32(_canonical(summary)))
    _write_json_atomic(root / "summary.json", summary)
    return Store(root, cfg, summary)
