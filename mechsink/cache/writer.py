"""Writing a store: :class:`StoreWriter` appends whole samples, journals their tensors on a
background thread and commits each shard (tensors renamed into place first, its rows last)."""

from __future__ import annotations

import json
import os
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mechsink.cache.index import merge
from mechsink.cache.layout import (
    DTYPES, StoreConfig, StoreError, _KEYS_KEY, _META_CRC_KEY, _SAMPLES_KEY, _SHARD_RE, _ShardMeta,
    _TENSORS_KEY, _canonical, _clean_debris, _fsync_dir, _fsync_file, _mechsink_version, _meta_crc,
    _read_config, _shard_keys, _shard_names, _unlink_quietly, _write_error, store_id,
)
from mechsink.cache.locks import _Lock
from mechsink.cache.rows import _batch_table, _normalise_rows, _rows_table
from mechsink.cache.samples import SampleSet
from mechsink.cache.store import Store
from mechsink.cache.tensorfile import _byte_view, _shard_dims, _write_from_journal
from mechsink.memory import trim as _trim


DEFAULT_SHARD_BYTES = 256 << 20     # tensor bytes per shard (a sample is never split, so one may exceed it)
SHARD_ROW_GROUP = 2048              # rows per row group of a shard's parquet (what a merge holds per rank)
_PENDING_BATCHES = 3                # batches that may wait in memory for the disk thread


def _dist():
    """torch.distributed when a process group is up, else None."""
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


@dataclass
class _Journal:
    """A shard being filled, as the disk thread has it: the journal file of its tensors and, batch by
    batch, their (site index, offset, nbytes, crc32), row tables, samples and keys."""
    file: Any
    records: list[tuple[int, int, int, int]] = field(default_factory=list)
    tables: list[pa.Table] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    keys: dict[int, str] = field(default_factory=dict)
    rows: int = 0


class StoreWriter:
    """Appends whole samples to a store; shards are written on a background thread.

    Args:
        path: store directory (created if missing; an existing store with the same config resumes).
        config: a StoreConfig or a mapping of its fields.
        rank, world_size: this writer's shard namespace; default to torch.distributed's when a
            process group is up, else 0 and 1. Which samples a rank writes is the caller's choice.
        shard_rows: a shard is cut once this many rows are buffered (never inside a sample) ...
        shard_bytes: ... or once this many tensor bytes are, whichever comes first.
        dtype: storage dtype of the tensors: "float16", "bfloat16" or "float32".
        pending_shards: shards allowed to wait for their commit while the next one fills.

    Memory does not grow with the shard: each batch's tensors are appended to the shard's journal
    file (``.journal.tmp``) on the background thread as soon as they are added (at most a few
    batches wait in memory), and the commit copies them, site by site, into the safetensors file
    in the kernel (``copy_file_range``), its crc32 combined from the batches'. Only the rows' labels (numpy
    columns, tens of bytes per row) are held until the commit.

    One live writer per rank and store directory: a second one fails with :class:`StoreLocked`
    naming the first one's pid (the lock is dropped by ``close()`` or when the process dies).

    Use: ``skip = w.done_samples()``; ``w.add(rows, tensors)`` per batch of whole samples;
    ``w.finalize()`` once at the end (all ranks, when distributed). A ``with`` block commits the
    buffered samples on exit, also on error.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: StoreConfig | Mapping[str, Any],
        rank: int | None = None,
        world_size: int | None = None,
        shard_rows: int = 8192,
        dtype: str = "float16",
        pending_shards: int = 1,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        if dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if shard_rows < 1 or pending_shards < 1 or shard_bytes < 1:
            raise StoreError(f"shard_rows, shard_bytes and pending_shards must be >= 1, "
                             f"got {shard_rows}, {shard_bytes}, {pending_shards}")
        d = _dist()
        self.rank = rank if rank is not None else (d.get_rank() if d else 0)
        self.world_size = world_size if world_size is not None else (d.get_world_size() if d else 1)
        if not 0 <= self.rank < self.world_size:
            raise StoreError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.config = StoreConfig.coerce(config)
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.path = Path(path)
        self.shards = self.path / "shards"
        self._closed = True
        try:
            self.shards.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StoreError(f"cannot create the store {self.path}: a file is in the way") from None
        except OSError as e:
            raise StoreError(f"cannot create the store {self.path}: {e.strerror}") from None
        self._lock = _Lock(self.path, self.rank)
        try:
            self.id = self._claim_config()
            self._prefix = f"r{self.rank:02d}-"
            _clean_debris(self.shards, self._prefix)
            self._done = SampleSet()
            self._keys: dict[int, str] = {}
            self._dims: dict[str, int] = {}
            seq = -1
            for name in _shard_names(self.shards):
                meta = _ShardMeta(self.path, name, keys=True)
                self._done.update(meta.samples)
                self._keys.update({int(k): v for k, v in _shard_keys(meta).items()})
                if name.startswith(self._prefix):
                    seq = max(seq, int(_SHARD_RE.match(name).group(2)))
                if not self._dims:
                    self._dims = _shard_dims(meta.tensors, self.config.sites, self.dtype)
        except BaseException:
            self._lock.release()
            raise
        self._seq = seq + 1
        self._reset_buffer()
        self._added = SampleSet()      # every sample handed to this writer, buffered or written
        self._columns: list[str] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mechsink-store")
        self._pending: deque[Future] = deque()
        self._max_pending = pending_shards + _PENDING_BATCHES
        self._streams: dict[Any, Any] = {}
        self._journals: dict[str, _Journal] = {}     # disk thread only: the shards being filled
        self._error: BaseException | None = None
        self._closed = False

    def _reset_buffer(self) -> None:
        self._name: str | None = None         # the shard being filled, named at its first add()
        self._n_buffered = 0
        self._bytes_buffered = 0

    def _claim_config(self) -> str:
        sid = store_id(self.config, self.dtype)
        doc = {"id": sid, **self.config.hashed(self.dtype), "mechsink_version": _mechsink_version()}
        target = self.path / "store.json"
        if not target.exists():
            # exclusive create: ranks starting together agree on one store.json
            tmp = self.path / f".store.json.r{self.rank:02d}.{os.getpid()}.tmp"
            try:
                tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
                _fsync_file(tmp)
                os.link(tmp, target)
                _fsync_dir(self.path)
            except FileExistsError:
                pass
            except OSError as e:
                raise _write_error(e, "store.json", self.path) from None
            finally:
                _unlink_quietly(tmp)
        have = _read_config(self.path)["id"]
        if have != sid:
            raise StoreError(
                f"{self.path} holds a store with another config (id {str(have)[:12]} != {sid[:12]}); "
                "use a new directory or the same config"
            )
        return sid

    # -- writing

    def done_samples(self) -> SampleSet:
        """sample_idx committed by any rank before this writer opened, plus those added to it (skip these)."""
        return self._done | self._added

    def sample_keys(self) -> dict[int, str]:
        """{sample_idx: key} recorded with the committed samples (``keys=`` of add), e.g. image digests."""
        return dict(self._keys)

    def add(
        self,
        rows: pd.DataFrame | Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor | np.ndarray],
        samples: Iterable[int] | None = None,
        keys: Mapping[int, str] | None = None,
    ) -> None:
        """Buffer whole samples.

        rows: one row per token, a DataFrame or a dict of columns (see ROW_COLUMNS; ``sample_idx`` and ``token_role`` required,
            other standard columns default, extra columns kept). Every call must carry the same columns.
        tensors: {site: [n_rows, d_site]}, row i of each belongs to row i of ``rows``; CPU or CUDA
            (a CUDA tensor is cast on the device and copied to a pinned buffer asynchronously).
        samples: the sample_idx this call completes; defaults to those in ``rows``. Pass it to
            record samples that yield no rows, so a resume does not redo them.
        keys: optional {sample_idx: str} kept with the samples (e.g. a digest of the image), read
            back by ``sample_keys()`` on resume to detect inputs that changed since they were cached.
        """
        self._check_open()
        self._raise_failed()
        cols = _normalise_rows(rows)
        n = len(cols["sample_idx"])
        if self._columns is None:
            self._columns = list(cols)
        elif list(cols) != self._columns:
            raise StoreError(f"row columns changed between add() calls: {self._columns} -> {list(cols)}")
        in_rows = set(np.unique(cols["sample_idx"]).tolist())
        samples = sorted(in_rows if samples is None else {int(s) for s in samples})
        if not in_rows <= set(samples):
            raise StoreError(f"rows hold samples {sorted(in_rows - set(samples))} not listed in samples")
        again = [s for s in samples if s in self._done or s in self._added]
        if again:
            raise StoreError(f"samples {again[:5]} are already in the store; skip done_samples()")
        if set(tensors) != set(self.config.sites):
            raise StoreError(f"tensors are for sites {sorted(tensors)}, the store caches {list(self.config.sites)}")
        keys = {int(k): str(v) for k, v in (keys or {}).items()}
        if not set(keys) <= set(samples):
            raise StoreError(f"keys given for samples {sorted(set(keys) - set(samples))[:5]} not in this call")
        checked = []
        for site in self.config.sites:
            t = torch.as_tensor(tensors[site]).detach()
            if t.ndim != 2 or t.shape[0] != n:
                raise StoreError(f"tensor for {site} has shape {tuple(t.shape)}, expected [{n}, d]")
            d = self._dims.get(site, int(t.shape[1]))
            if t.shape[1] != d:
                raise StoreError(f"tensor for {site} has width {t.shape[1]}, the store holds width {d}")
            checked.append((site, t))
        item = DTYPES[self.dtype].itemsize
        events: list[Any] = []
        host = []
        for site, t in checked:
            self._dims.setdefault(site, int(t.shape[1]))
            host.append(self._to_host(t, events))
            self._bytes_buffered += t.numel() * item
        if self._name is None:
            self._name = f"{self._prefix}{self._seq:06d}"
            self._seq += 1
        # the disk thread records the samples with their rows: an interrupt after this line cannot
        # leave a batch journalled but not committed with its samples, or the other way round
        self._submit(self._append, self._name, host, events, cols, samples, keys)
        self._added.update(samples)
        self._n_buffered += n
        if self._n_buffered >= self.shard_rows or self._bytes_buffered >= self.shard_bytes:
            self.flush()

    def _to_host(self, t: torch.Tensor, events: list) -> torch.Tensor:
        """The tensor in the storage dtype on the CPU. A CUDA tensor is cast on its device and copied
        into a pinned buffer on a side stream; the disk thread waits for the copy's event."""
        dt = DTYPES[self.dtype]
        if t.is_cuda and torch.cuda.is_available():
            t = t.to(dt)
            stream = self._streams.get(t.device)
            if stream is None:
                stream = self._streams[t.device] = torch.cuda.Stream(device=t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            host = torch.empty(t.shape, dtype=dt, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)      # the caching allocator keeps t's memory until the copy ran
            event = torch.cuda.Event()
            event.record(stream)
            events.append(event)
            return host
        return t.to(device="cpu", dtype=dt).contiguous()

    def _submit(self, fn, *args) -> None:
        """Queue a job for the disk thread, first waiting while too many are queued (backpressure)."""
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()  # re-raises a failed write here
        self._pending.append(self._pool.submit(self._guarded, fn, *args))

    def _guarded(self, fn, *args) -> None:
        if self._error is not None:     # an earlier job failed: later ones of this writer do nothing
            return
        try:
            fn(*args)
        except BaseException as e:
            self._error = e
            for name in list(self._journals):
                self._drop_journal(name)
            raise

    def flush(self) -> None:
        """Commit the samples added since the last commit as one shard, on the disk thread."""
        self._check_open()
        self._raise_failed()
        if self._name is None:
            return
        name = self._name
        self._reset_buffer()
        self._submit(self._commit, name)

    def _journal(self, name: str) -> Path:
        return self.shards / f"{name}.journal.tmp"

    def _drop_journal(self, name: str) -> None:
        j = self._journals.pop(name, None)
        if j is not None:
            try:
                j.file.close()
            except OSError:
                pass
        _unlink_quietly(self._journal(name))

    def _append(self, name: str, tensors: list[torch.Tensor], events: list[Any], cols: dict[str, np.ndarray],
                samples: list[int], keys: dict[int, str]) -> None:
        """Append one batch's tensors (in site order) to the shard's journal, keep its rows as a
        compact arrow table and its samples and keys with them (disk thread)."""
        for e in events:
            e.synchronize()
        try:
            j = self._journals.get(name)
            if j is None:
                j = self._journals[name] = _Journal(open(self._journal(name), "w+b"))
            table = _batch_table(cols)
            for k, t in enumerate(tensors):
                if t.numel():
                    view = _byte_view(t)
                    j.records.append((k, j.file.tell(), view.nbytes, zlib.crc32(view)))
                    j.file.write(view)
            j.tables.append(table)
            j.samples.extend(samples)
            j.keys.update(keys)
            j.rows += table.num_rows
        except OSError as e:
            self._drop_journal(name)
            raise _write_error(e, f"shard {name}", self.path) from None

    def _commit(self, name: str) -> None:
        """Write one shard: the tensors from the journal into a tmp safetensors file, the rows into a
        tmp parquet, fsync, rename the tensors, then the parquet (the commit point). Disk thread."""
        st, pqt = self.shards / f"{name}.safetensors", self.shards / f"{name}.parquet"
        st_tmp, pq_tmp = st.with_name(st.name + ".tmp"), pqt.with_name(pqt.name + ".tmp")
        j = self._journals.pop(name, None)
        if j is None:      # its first batch never reached the disk thread (an interrupt in between)
            return
        n = j.rows
        try:
            try:
                j.file.flush()
                crc, size = _write_from_journal(st_tmp, j.file, j.records, self.config.sites, self._dims, n,
                                                self.dtype, metadata={"store_id": self.id, "rows": str(n)})
            finally:
                j.file.close()
                _unlink_quietly(self._journal(name))
            table = _rows_table(j.tables)
            j.tables.clear()                # the batches' dictionary-encoded tables
            raw = (json.dumps(sorted(j.samples)).encode(), _canonical({str(k): v for k, v in sorted(j.keys.items())}),
                   _canonical({"crc32": crc, "bytes": size}))
            meta = {_SAMPLES_KEY: raw[0], _KEYS_KEY: raw[1], _TENSORS_KEY: raw[2], _META_CRC_KEY: _meta_crc(*raw)}
            pq.write_table(table.replace_schema_metadata(meta), pq_tmp, row_group_size=SHARD_ROW_GROUP,
                           write_page_checksum=True)
            del table
            _fsync_file(pq_tmp)
            os.replace(st_tmp, st)
            _fsync_dir(self.shards)
            os.replace(pq_tmp, pqt)
            _fsync_dir(self.shards)
        except OSError as e:
            _unlink_quietly(st_tmp, pq_tmp)
            if not pqt.exists():
                _unlink_quietly(st)
            raise _write_error(e, f"shard {name}", self.path) from None
        finally:
            _trim()

    def _raise_failed(self) -> None:
        for f in [f for f in self._pending if f.done()]:
            self._pending.remove(f)
            f.result()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"writer for {self.path} is closed")
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Commit what is buffered, wait for the disk thread and drop the lock."""
        if self._closed:
            return
        try:
            self.flush()
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._lock.release()

    def finalize(self) -> "Store | None":
        """Close, then merge every rank's shards into index.parquet and summary.json; return the Store.

        Under torch.distributed every rank must call it: rank 0 merges between two barriers and every
        rank gets the Store. Without a process group, rank 0 merges what is committed now and other
        ranks only close (and get None): run ``merge(path)`` once all ranks are done.
        """
        self.close()
        d = _dist()
        if d:
            d.barrier()
        store = None
        if self.rank == 0:
            store = merge(self.path, clean=d is not None or self.world_size == 1)
        if d:
            d.barrier()
            return store if store is not None else Store.open(self.path)
        return store

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
