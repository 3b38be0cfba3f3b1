"""The activation store: sharded, resumable, crash-safe and checksummed on write, memory-mapped
and verified on read, with memory that does not grow with the dataset on either side.

A store is a directory::

    store.json                      config; its sha256 content hash is the store id
    writer-r{rank:02d}.lock         held (flock) by the one live writer of that rank; holds its pid
    shards/r{rank:02d}-{seq:06d}.safetensors   one tensor per site, name = site, shape [n_rows, d_site]
    shards/r{rank:02d}-{seq:06d}.parquet       the rows of that shard (one row per cached token), with
                                    the shard's samples, image keys and the crc32 of its tensor file
    index.parquet                   all committed rows, sorted by (sample_idx, order of writing),
                                    with a global ``row`` column (= position) and ``shard``/``shard_row``;
                                    written in row groups, read lazily
    summary.json                    counts, site widths, the merged shards, size and crc32 of every file

A shard counts only once its parquet file exists: tensors are renamed into place first, the
parquet last, so a process killed at any moment leaves either a whole shard or debris that the
next writer of that rank deletes. Samples are never split across shards, which is what makes
``done_samples()`` an exact resume point. Shards are cut by bytes (``shard_bytes``) or rows
(``shard_rows``), whichever comes first, and written from the buffered batches without
concatenating them; on CUDA, device-to-host copies go through pinned buffers on a side stream.

Integrity: every file's crc32 is recorded at commit (tensor files in their shard's parquet
metadata, everything in summary.json at merge); ``Store.open`` checks structure and sizes, the
first read of a shard or of the index in a process checks its crc32, and ``verify`` checks all.
Every defect is a one-line :class:`StoreCorrupt` naming the file and the repair.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import socket
import struct
import zlib
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mechsink.errors import MechsinkError
from mechsink.memory import trim as _trim
from mechsink.config import Config

log = logging.getLogger("mechsink")


class StoreError(MechsinkError):
    """A store cannot be opened, written or read as asked (one-line message)."""


class StoreCorrupt(StoreError):
    """A store file is damaged or missing; the message names the file and how to repair it."""


class StoreLocked(StoreError):
    """Another live process is writing this store (the message names its pid)."""


class StoreWriteError(StoreError, OSError):
    """Writing failed (disk full, no permission, ...); the temporary files were removed, every
    committed shard is intact and a rerun resumes. ``errno`` is the underlying error's."""


FORMAT_VERSION = 2
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_NP_DTYPES = {"float16": np.float16, "float32": np.float32}
# np.memmap dtype per safetensors dtype; bf16 has no numpy type and is read as its raw bits
_NP_OF_ST = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}
SINK_CLASSES = ("vit", "llm", "both", "none")
DEFAULT_SHARD_BYTES = 256 << 20     # tensor bytes per shard (a sample is never split, so one may exceed it)
INDEX_ROW_GROUP = 1 << 16           # most rows per row group of index.parquet (fewer in small stores)
INDEX_GROUPS = 64                   # row groups the index aims at: a parquet writer holds ~15 kB per group until it closes
INDEX_MIN_ROWS = 2048               # fewest rows per index row group (but the last)
SHARD_ROW_GROUP = 2048              # rows per row group of a shard's parquet (what a merge holds per rank)
_PENDING_BATCHES = 3                # batches that may wait in memory for the disk thread

# Standard row columns: dtype and the value used when a writer leaves the column out.
# ``sample_idx`` and ``token_role`` have no default: every row must say which sample and role it is.
ROW_COLUMNS: dict[str, tuple[str, Any]] = {
    "sample_idx": ("int64", None),
    "sample_id": ("str", ""),
    "image_path": ("str", ""),
    "token_role": ("str", None),
    "image": ("int32", -1),
    "tile": ("int32", -1),
    "patch_row": ("int32", -1),
    "patch_col": ("int32", -1),
    "llm_pos": ("int32", -1),
    "norm": ("float32", float("nan")),
    "is_sink": ("bool", False),
    "sink_class": ("str", "none"),
}
# Written by the store itself; a writer may not pass them.
RESERVED_COLUMNS = ("row", "shard", "shard_row")

_SHARD_RE = re.compile(r"^r(\d{2,})-(\d{6,})$")
_LOCK_RE = re.compile(r"^writer-r(\d{2,})\.lock$")
_SAMPLES_KEY = b"mechsink.samples"
_KEYS_KEY = b"mechsink.keys"          # {sample_idx: key} (e.g. the image digest) of the shard's samples
_TENSORS_KEY = b"mechsink.tensors"    # {"crc32": ..., "bytes": ...} of the shard's safetensors file
_META_CRC_KEY = b"mechsink.meta_crc"  # crc32 over the three values above


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StoreConfig(Config):
    """What determines a store's content; its hash (with the dtype) is the store id.

    sites: site names cached, e.g. ``("vit.out", "llm.blocks.2.hook_resid_post")``.
    tokens: the token selection cached, e.g. ``("image", "cls")``.
    model / model_hash: model id and a hash of its weights or config.
    data: fingerprint of the dataset (ids, paths, prompts, order).
    params: anything else that changes the content (sink rule, prompt template, ...); JSON-able.
    """

    sites: tuple[str, ...] = ("vit.out",)
    tokens: tuple[str, ...] = ("image",)
    model: str = ""
    model_hash: str = ""
    data: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        tokens = (self.tokens,) if isinstance(self.tokens, str) else tuple(self.tokens)
        if not sites or len(set(sites)) != len(sites) or not all(isinstance(s, str) and s for s in sites):
            raise StoreError(f"store sites must be distinct non-empty names, got {list(sites)}")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "tokens", tokens)
        try:  # a JSON round trip, so the hash sees exactly what store.json will hold
            params = json.loads(json.dumps(dict(self.params), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise StoreError(f"store config params must be JSON-serialisable: {e}") from None
        object.__setattr__(self, "params", params)

    @classmethod
    def coerce(cls, config: "StoreConfig | Mapping[str, Any]") -> "StoreConfig":
        if isinstance(config, StoreConfig):
            return config
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise StoreError(f"unknown store config keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**config)

    def hashed(self, dtype: str) -> dict[str, Any]:
        """The dict whose hash is the store id (the mechsink version is recorded, not hashed)."""
        d = asdict(self)
        d.update(sites=list(self.sites), tokens=list(self.tokens), dtype=dtype, format=FORMAT_VERSION)
        return d


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def store_id(config: StoreConfig | Mapping[str, Any], dtype: str) -> str:
    """sha256 of the canonical JSON of the config plus dtype and store format."""
    return hashlib.sha256(_canonical(StoreConfig.coerce(config).hashed(dtype))).hexdigest()


def _mechsink_version() -> str:
    from mechsink import __version__  # late: mechsink/__init__ may import this package

    return __version__


# ----------------------------------------------------------------------------- small file helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any, tmp_suffix: str = "") -> None:
    tmp = path.with_name(f".{path.name}{tmp_suffix}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _unlink_quietly(tmp)
        raise _write_error(e, path.name, path.parent) from None


def _unlink_quietly(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _write_error(e: OSError, what: str, root: Path) -> StoreWriteError:
    """One-line error for a failed write (the caller has removed its temporary files)."""
    if isinstance(e, StoreWriteError):
        return e
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (f"disk full while writing {what} in {root}; its temporary files were removed and every "
               "committed shard is intact: free some space, then rerun the same command to resume")
    else:
        msg = (f"cannot write {what} in {root}: {e.strerror or e}; its temporary files were removed and every "
               "committed shard is intact: fix the location, then rerun the same command to resume")
    err = StoreWriteError(msg)
    err.errno = e.errno
    return err


def _read_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path.parent} is not a store: {what} {path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreCorrupt(f"{path} is corrupt (not valid JSON: {getattr(e, 'msg', e)}); {_REPAIR[path.name]}") from None
    if not isinstance(doc, dict):
        raise StoreCorrupt(f"{path} is corrupt (not a JSON object); {_REPAIR[path.name]}")
    return doc


def _crc_hex(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


_WINDOW = 1 << 20    # bytes of a file mapped at once while checksumming (bounds resident memory)


def file_crc32(path: str | os.PathLike) -> tuple[str, int]:
    """("crc32:xxxxxxxx", size) of a file, read through 1 MiB memory maps (no copy, flat memory)."""
    crc = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for off in range(0, size, _WINDOW):
            with mmap.mmap(f.fileno(), min(_WINDOW, size - off), offset=off, access=mmap.ACCESS_READ) as m:
                crc = zlib.crc32(m, crc)
    return _crc_hex(crc), size


_ST_OF_TORCH = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def _byte_view(t: torch.Tensor) -> memoryview:
    raw = t.detach().cpu().contiguous().view(-1)
    raw = raw.view(torch.int16) if t.dtype == torch.bfloat16 else raw  # numpy has no bfloat16
    return memoryview(raw.numpy().view(np.uint8))


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | list[torch.Tensor]],
                      metadata: Mapping[str, str]) -> tuple[str, int]:
    """Write a safetensors file straight from the tensors' memory, fsync it; return (crc32, size).

    A site's tensor may be given as a list of row blocks, written one after the other (never
    concatenated in memory). Written here rather than with safetensors.save_file, which stages
    through its own temporary file (whose name a killed process would leave behind) or through
    one more copy in memory.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    blocks: list[list[torch.Tensor]] = []
    pos = 0
    for name, t in tensors.items():
        parts = [t] if torch.is_tensor(t) else list(t)
        if not parts:
            raise StoreError(f"no tensor blocks for {name}")
        dt, width = parts[0].dtype, tuple(parts[0].shape[1:])
        if any(p.dtype != dt or tuple(p.shape[1:]) != width for p in parts):
            raise StoreError(f"row blocks of {name} differ in dtype or width")
        n = sum(int(p.shape[0]) for p in parts)
        nbytes = n * int(np.prod(width, dtype=np.int64)) * parts[0].element_size()
        header[name] = {"dtype": _ST_OF_TORCH[dt], "shape": [n, *width], "data_offsets": [pos, pos + nbytes]}
        blocks.append(parts)
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data starts 8-aligned
    head = struct.pack("<Q", len(blob)) + blob
    crc = zlib.crc32(head)
    size = len(head)
    with open(path, "wb") as f:
        f.write(head)
        for parts in blocks:
            for p in parts:
                if p.numel() == 0:
                    continue
                view = _byte_view(p)
                f.write(view)
                crc = zlib.crc32(view, crc)
                size += view.nbytes
        f.flush()
        os.fsync(f.fileno())
    return _crc_hex(crc), size


_COPY_BUFFER = 1 << 20
_CRC_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the crc32 polynomial (reflected bit order), as in zlib."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]                    # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine)."""
    p, k = 1 << 31, 3
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def _write_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src: int, dst: int, n: int, src_off: int, dst_off: int, buf: list) -> None:
    """Copy n bytes between files: in the kernel (copy_file_range: no user-space copy, a reflink on
    file systems that have them), else through a 1 MiB buffer."""
    while n:
        try:
            got = os.copy_file_range(src, dst, n, src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
            got = 0
        if got <= 0:       # not supported here (or a special file): copy by hand
            if not buf:
                buf.append(memoryview(bytearray(_COPY_BUFFER)))
            chunk = buf[0][: min(n, _COPY_BUFFER)]
            got = os.preadv(src, [chunk], src_off)
            if got <= 0:
                raise OSError(errno.EIO, "journal is shorter than written")
            _write_all(dst, chunk[:got], dst_off)
        n, src_off, dst_off = n - got, src_off + got, dst_off + got


def _write_from_journal(path: Path, journal, records: list[tuple[int, int, int, int]], sites: tuple[str, ...],
                        dims: Mapping[str, int], n: int, dtype: str, metadata: Mapping[str, str]) -> tuple[str, int]:
    """A safetensors file of ``n`` rows per site whose data are the journal's byte ranges
    ``records`` [(site index, offset, nbytes, crc32)], copied site by site; fsync'd; returns
    (crc32, size). The crc32 of the file is combined from the ranges' (no second pass over the data)."""
    item = DTYPES[dtype].itemsize
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pos = 0
    for site in sites:
        nbytes = n * dims[site] * item
        header[site] = {"dtype": _ST_DTYPES[dtype], "shape": [n, dims[site]], "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    head = struct.pack("<Q", len(blob)) + blob
    crc, size = zlib.crc32(head), len(head)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    buf: list = []
    try:
        _write_all(fd, head, 0)
        for k in range(len(sites)):
            for site_k, off, nbytes, chunk_crc in records:
                if site_k == k:
                    _copy_range(journal.fileno(), fd, nbytes, off, size, buf)
                    crc = crc32_combine(crc, chunk_crc, nbytes)
                    size += nbytes
        os.fsync(fd)
    finally:
        os.close(fd)
    if size != len(head) + pos:
        raise StoreError(f"{path.name}: {size - len(head)} tensor bytes journalled, {pos} expected")
    return _crc_hex(crc), size


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, header dict) of a safetensors file, read without loading it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise StoreCorrupt(f"{path} is truncated (no safetensors header); {_repair_shard(path)}")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise StoreCorrupt(f"{path} has a corrupt safetensors header (length {n}); {_repair_shard(path)}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StoreCorrupt(f"{path} is missing; {_repair_shard(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreCorrupt(f"{path} has a corrupt safetensors header; {_repair_shard(path)}") from None
    if not isinstance(header, dict):
        raise StoreCorrupt(f"{path} has a corrupt safetensors header; {_repair_shard(path)}")
    header.pop("__metadata__", None)
    return 8 + n, header


def _repair_shard(path: Path) -> str:
    root = path.parent.parent
    return (f"run `mechsink verify --cache {root} --repair` (drops the damaged shard), then rerun the same "
            "`mechsink cache` command to recompute its samples")


_REPAIR = {
    "store.json": "restore it from a copy, or start a new store in another directory",
    "summary.json": "rebuild it from the shards with `mechsink verify --cache DIR --repair` (or mechsink.cache.merge)",
    "index.parquet": "rebuild it from the shards with `mechsink verify --cache DIR --repair` (or mechsink.cache.merge)",
}


def _shard_names(shards: Path) -> list[str]:
    """Committed shards (their parquet exists), in (rank, seq) order."""
    names = [p.stem for p in shards.glob("r*-*.parquet") if _SHARD_RE.match(p.stem)]
    return sorted(names, key=lambda s: tuple(int(x) for x in _SHARD_RE.match(s).groups()))


def _clean_debris(shards: Path, prefix: str) -> list[Path]:
    """Delete tmp files and tensors without a committed parquet (a commit cut short) for ``prefix*``."""
    removed = [p for p in shards.glob(f"{prefix}*.tmp")]
    removed += [p for p in shards.glob(f"{prefix}*.safetensors") if not p.with_suffix(".parquet").exists()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _dist():
    """torch.distributed when a process group is up, else None."""
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


# ----------------------------------------------------------------------------- locks


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        return "?"
    return text[0] if text else "?"


class _Lock:
    """An exclusive flock on ``root/writer-r{rank}.lock``, released when the holder closes or dies.

    The file holds the holder's pid and host. A lock left by a dead process is not held (the kernel
    drops a flock with its process), so the next writer takes it over and says so in the log.
    """

    def __init__(self, root: Path, rank: int) -> None:
        self.path = root / f"writer-r{rank:02d}.lock"
        self.fd: int | None = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise StoreLocked(
                f"{root} is being written by pid {holder} (lock {self.path.name}); one writer per store: wait "
                "for it to finish or stop it, then rerun to resume") from None
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path} ({e.strerror}); write the store on a local disk") from None
        previous = _lock_holder(fd)
        if previous not in ("?", str(os.getpid())):
            log.warning("%s: took over the lock of pid %s, which is no longer running", root, previous)
        self.taken_over = None if previous == "?" else previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)   # drops the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()


def _hold_all_locks(root: Path) -> list[_Lock]:
    """Every rank's lock of ``root`` (raises StoreLocked if a writer is alive); release them after."""
    held: list[_Lock] = []
    try:
        for p in sorted(root.glob("writer-r*.lock")):
            m = _LOCK_RE.match(p.name)
            if m:
                held.append(_Lock(root, int(m.group(1))))
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


# ----------------------------------------------------------------------------- rows


def _normalise_rows(rows: pd.DataFrame | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Standard columns in order (defaults filled), then the extra columns as given, as numpy arrays.

    ``rows``: a DataFrame, or a dict of equal-length columns (what the extractor hands over: no
    DataFrame per batch). Checks are vectorised; string columns stay object arrays (converted when
    the shard is written)."""
    if isinstance(rows, pd.DataFrame):
        if rows.columns.duplicated().any():
            raise StoreError(f"duplicate row columns {sorted(set(rows.columns[rows.columns.duplicated()]))}")
        cols = {c: rows[c].to_numpy() for c in rows.columns}
    elif isinstance(rows, Mapping):
        cols = {str(c): np.asarray(v) for c, v in rows.items()}
        if len({len(v) for v in cols.values()}) > 1:
            raise StoreError(f"row columns differ in length: { {c: len(v) for c, v in cols.items()} }")
    else:
        raise StoreError(f"rows must be a pandas DataFrame or a dict of columns, got {type(rows).__name__}")
    clash = [c for c in RESERVED_COLUMNS if c in cols]
    if clash:
        raise StoreError(f"row columns {clash} are reserved by the store (grid position is patch_row/patch_col)")
    out: dict[str, np.ndarray] = {}
    n = len(next(iter(cols.values()))) if cols else 0
    for name, (dtype, default) in ROW_COLUMNS.items():
        if name in cols:
            col = cols[name]
            if dtype == "str":
                out[name] = col.astype(object, copy=False)
                continue
            if dtype in ("int64", "int32", "bool") and col.dtype.kind in "fO" and pd.isna(col).any():
                raise StoreError(f"row column {name!r} has missing values")
            try:
                # an owned copy: a view would keep the caller's whole DataFrame block alive until the commit
                out[name] = np.array(col, dtype=dtype, copy=True)
            except (TypeError, ValueError):
                raise StoreError(f"row column {name!r} cannot be read as {dtype}") from None
        elif default is None:
            raise StoreError(f"rows lack the required column {name!r}")
        else:
            out[name] = np.full(n, default, dtype=object if dtype == "str" else dtype)
    bad = set(pd.unique(out["sink_class"])) - set(SINK_CLASSES)
    if bad:
        raise StoreError(f"sink_class must be one of {SINK_CLASSES}, got {sorted(map(str, bad))}")
    for c, v in cols.items():
        if c not in ROW_COLUMNS:
            out[c] = v
    return out


def _str_array(values: np.ndarray) -> pa.Array:
    try:
        arr = pa.array(values, type=pa.string())
        if arr.null_count == 0:
            return arr
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    return pa.array([str(v) for v in values], type=pa.string())


def _batch_table(cols: Mapping[str, np.ndarray]) -> pa.Table:
    """One batch's rows as a compact arrow table: the standard string columns dictionary-encoded
    (a sample's id and path repeat on each of its rows), the extra columns' types inferred."""
    arrays = []
    for c, v in cols.items():
        kind = ROW_COLUMNS.get(c, (None,))[0]
        if kind == "str":
            arrays.append(_str_array(v).dictionary_encode())
        elif kind is not None:
            arrays.append(pa.array(v))
        else:
            try:
                arrays.append(pa.array(v, from_pandas=True))
            except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
                raise StoreError(f"row column {c!r} mixes types that parquet cannot hold in one column: {e}") from None
    return pa.Table.from_arrays(arrays, names=list(cols))


def _plain(schema: pa.Schema) -> pa.Schema:
    """The schema with dictionary columns as their value type."""
    return pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                      for f in schema])


def _rows_table(tables: list[pa.Table]) -> pa.Table:
    """The batches' tables as one (chunked, not copied) table with plain string columns."""
    try:
        t = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        return t.cast(_plain(t.schema))
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise StoreError(f"row columns changed type between batches: {_first_line(e)}") from None


def _meta_crc(samples: bytes, keys: bytes, tensors: bytes) -> bytes:
    return _crc_hex(zlib.crc32(tensors, zlib.crc32(keys, zlib.crc32(samples)))).encode()


class _ShardMeta:
    """What a committed shard's parquet footer says (checked against its own crc)."""

    def __init__(self, root: Path, name: str, keys: bool = False) -> None:
        self.name = name
        self.parquet = root / "shards" / f"{name}.parquet"
        self.tensors = root / "shards" / f"{name}.safetensors"
        try:
            md = pq.read_metadata(self.parquet)
        except FileNotFoundError:
            raise StoreCorrupt(f"{self.parquet} is missing; {_repair_shard(self.parquet)}") from None
        except (pa.ArrowException, OSError) as e:
            raise StoreCorrupt(f"{self.parquet} is corrupt ({_first_line(e)}); {_repair_shard(self.parquet)}") from None
        meta = md.metadata or {}
        if _SAMPLES_KEY not in meta:
            raise StoreError(f"{self.parquet} lacks the sample list; it was not written by StoreWriter")
        if _TENSORS_KEY not in meta or _META_CRC_KEY not in meta:
            raise StoreError(f"{self.parquet} has no checksums: it was written by an older mechsink; "
                             "start a new store in another directory")
        raw = (meta[_SAMPLES_KEY], meta.get(_KEYS_KEY, b"{}"), meta[_TENSORS_KEY])
        if _meta_crc(*raw) != meta[_META_CRC_KEY]:
            raise StoreCorrupt(f"{self.parquet} is corrupt (its metadata fails its crc32); {_repair_shard(self.parquet)}")
        try:
            self.samples = np.array(json.loads(raw[0]), dtype=np.int64)
            self._keys_raw = raw[1] if keys else b"{}"   # a merge does not need them
            tensors = json.loads(raw[2])
            self.tensor_crc: str = tensors["crc32"]
            self.tensor_bytes: int = int(tensors["bytes"])
        except (ValueError, KeyError, TypeError):
            raise StoreCorrupt(f"{self.parquet} is corrupt (unreadable metadata); {_repair_shard(self.parquet)}") from None
        self.num_rows = md.num_rows
        sizes = [md.row_group(k).num_rows for k in range(md.num_row_groups)]
        self.group_starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64) if sizes else np.zeros(1, np.int64)
        # not md.schema: each ParquetSchema pins ~240 kB that is never handed back (pyarrow 26)
        self.schema: pa.Schema | None = pq.read_schema(self.parquet).remove_metadata()


def _shard_keys(meta: _ShardMeta) -> dict[str, str]:
    try:
        return json.loads(meta._keys_raw)
    except ValueError:
        raise StoreCorrupt(f"{meta.parquet} is corrupt (unreadable metadata); {_repair_shard(meta.parquet)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ----------------------------------------------------------------------------- writer


class SampleSet:
    """Sample indices as a bitmap: one bit per index, where a Python set costs ~70 bytes per
    sample (a writer holds every sample it was given; 10^6 images would be 70 MB). Set-like:
    ``in``, ``len``, sorted iteration, ``add``/``update``, ``|``, and equality with a set."""

    def __init__(self, items: Iterable[int] = ()) -> None:
        self._bits = np.zeros(0, dtype=bool)
        self._n = 0
        self.update(items)

    def update(self, items: Iterable[int]) -> None:
        idx = np.fromiter((int(i) for i in items), dtype=np.int64) if not isinstance(items, np.ndarray) \
            else items.astype(np.int64, copy=False)
        if not len(idx):
            return
        if idx.min() < 0:
            raise StoreError(f"sample_idx must be >= 0, got {int(idx.min())}")
        idx = np.unique(idx)
        top = int(idx[-1]) + 1
        if top > len(self._bits):
            grown = np.zeros(max(top, 2 * len(self._bits)), dtype=bool)
            grown[: len(self._bits)] = self._bits
            self._bits = grown
        self._n += int((~self._bits[idx]).sum())
        self._bits[idx] = True

    def contains(self, idx: np.ndarray) -> np.ndarray:
        """Membership of every index of an int array, as a bool array."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.zeros(len(idx), dtype=bool)
        ok = (idx >= 0) & (idx < len(self._bits))
        out[ok] = self._bits[idx[ok]]
        return out

    def add(self, i: int) -> None:
        self.update((i,))

    def __contains__(self, i: object) -> bool:
        try:
            k = int(i)                           # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        return 0 <= k < len(self._bits) and bool(self._bits[k])

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._bits).tolist())

    def __or__(self, other: Iterable[int]) -> "SampleSet":
        out = SampleSet()
        out._bits, out._n = self._bits.copy(), self._n
        out.update(other._indices() if isinstance(other, SampleSet) else other)
        return out

    def _indices(self) -> np.ndarray:
        return np.flatnonzero(self._bits)

    def __rsub__(self, other: Iterable[int]) -> set[int]:
        return {i for i in other if i not in self}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SampleSet):
            return np.array_equal(self._indices(), other._indices())
        if isinstance(other, (set, frozenset)):
            return len(other) == self._n and all(i in self for i in other)
        return NotImplemented

    __hash__ = None                              # type: ignore[assignment] - mutable

    def __repr__(self) -> str:
        return f"SampleSet({len(self)} samples)"


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


def _read_config(root: Path) -> dict:
    """store.json, checked against its own id (a changed byte changes the content hash)."""
    cfg = _read_json(root / "store.json", "config")
    try:
        hashed = {k: v for k, v in cfg.items() if k not in ("id", "mechsink_version")}
        ok = hashlib.sha256(_canonical(hashed)).hexdigest() == cfg["id"]
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise StoreCorrupt(f"{root / 'store.json'} is corrupt (its content does not match its id); "
                           f"{_REPAIR['store.json']}")
    if cfg.get("format") != FORMAT_VERSION:
        raise StoreError(f"{root} is a store of format {cfg.get('format')}, this mechsink reads format "
                         f"{FORMAT_VERSION}; rebuild it in a new directory")
    return cfg


def _shard_dims(path: Path, sites: tuple[str, ...], dtype: str) -> dict[str, int]:
    """{site: d} of one shard, checked against the store's sites and dtype."""
    _, header = read_safetensors_header(path)
    if set(header) != set(sites):
        raise StoreCorrupt(f"{path} holds sites {sorted(header)}, the store caches {list(sites)}; {_repair_shard(path)}")
    dims = {}
    for site in sites:
        h = header[site]
        if not isinstance(h, dict) or h.get("dtype") != _ST_DTYPES[dtype] or len(h.get("shape", ())) != 2:
            raise StoreCorrupt(f"{path}:{site} is not {_ST_DTYPES[dtype]}[n, d]; {_repair_shard(path)}")
        dims[site] = h["shape"][1]
    return dims


# ----------------------------------------------------------------------------- merge


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


# ----------------------------------------------------------------------------- reader

# (path, inode, size, mtime_ns, crc) of files whose crc32 this process has checked
_VERIFIED: set[tuple] = set()


def _check_file(root: Path, rel: str, want: Mapping[str, Any], *, content: bool) -> None:
    """Raise StoreCorrupt unless ``root/rel`` exists with the recorded size (and, with ``content``,
    crc32 - checked once per file and process)."""
    path = root / rel
    fix = _repair_shard(path) if rel.startswith("shards/") else _REPAIR.get(path.name, "").replace("DIR", str(root))
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StoreCorrupt(f"{path} is missing; {fix}") from None
    if st.st_size != want["bytes"]:
        kind = "truncated" if st.st_size < want["bytes"] else "longer than written"
        raise StoreCorrupt(f"{path} is {kind} ({st.st_size} bytes, {want['bytes']} written); {fix}")
    if not content:
        return
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, want["crc32"])
    if key in _VERIFIED:
        return
    crc, _ = file_crc32(path)
    if crc != want["crc32"]:
        raise StoreCorrupt(f"{path} is corrupt (crc32 {crc[6:]} != {want['crc32'][6:]} written); {fix}")
    _VERIFIED.add(key)


def _read_summary(root: Path) -> dict:
    summary = _read_json(root / "summary.json", "summary (run finalize() or mechsink.cache.merge)")
    body = {k: v for k, v in summary.items() if k != "crc32"}
    if summary.get("crc32") != _crc_hex(zlib.crc32(_canonical(body))):
        raise StoreCorrupt(f"{root / 'summary.json'} is corrupt (fails its crc32); "
                           f"{_REPAIR['summary.json'].replace('DIR', str(root))}")
    return summary


class Store:
    """A finished store, read through memory maps; neither tensors nor the index are loaded wholesale
    unless asked (``index`` loads the whole index on first use; ``iter_index``/``read_index`` do not).

    Attributes: ``path``, ``config`` (store.json), ``id``, ``index`` (DataFrame, one row per token,
    ``row`` = position; loaded lazily), ``sites``, ``dims`` ({site: d}), ``dtype``, ``summary``.
    Every file is checked against its recorded size on open and its crc32 on first read (once per
    process); a damaged file raises StoreCorrupt naming it and the repair.
    """

    def __init__(self, path: Path, config: dict, summary: dict, index: pd.DataFrame | None = None) -> None:
        self.path, self.config, self.summary = Path(path), config, summary
        self._index = index
        self.id: str = config["id"]
        self.sites: tuple[str, ...] = tuple(config["sites"])
        self.dtype: str = config["dtype"]
        self.dims: dict[str, int] = {s: int(summary["sites"][s]) for s in self.sites}
        self._shard_list: list[str] = list(summary["shards"])
        self._layout: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._specs: dict[tuple[int, str], tuple[Path, np.dtype, int, tuple[int, int]]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        root = Path(path)
        config = _read_config(root)
        summary = _read_summary(root)
        if not (root / "index.parquet").exists():
            raise StoreError(f"{root} has no index.parquet; run finalize() or mechsink.cache.merge({str(root)!r})")
        committed = _shard_names(root / "shards")
        listed = summary.get("shards", [])
        gone = [n for n in listed if n not in set(committed)]
        if gone:
            p = root / "shards" / f"{gone[0]}.parquet"
            raise StoreCorrupt(f"{p} is missing ({len(gone)} merged shard(s) gone); {_repair_shard(p)}")
        if committed != listed or summary.get("id") != config.get("id"):
            raise StoreError(
                f"{root}: index.parquet is out of date with shards/ "
                f"({len(listed)} merged, {len(committed)} on disk); run mechsink.cache.merge"
            )
        for rel, want in summary["files"].items():
            _check_file(root, rel, want, content=False)
        return cls(root, config, summary)

    def __len__(self) -> int:
        return int(self.summary["n_rows"])

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, rows={len(self)}, sites={list(self.sites)}, dtype={self.dtype})"

    # -- the index, lazily

    def _index_file(self, categorical: Iterable[str] = ()) -> pq.ParquetFile:
        _check_file(self.path, "index.parquet", self.summary["files"]["index.parquet"], content=True)
        return pq.ParquetFile(self.path / "index.parquet", page_checksum_verification=True,
                              read_dictionary=list(categorical) or None)

    def _corrupt_index(self, e: BaseException) -> StoreCorrupt:
        return StoreCorrupt(f"{self.path / 'index.parquet'} is corrupt ({_first_line(e)}); "
                            f"{_REPAIR['index.parquet'].replace('DIR', str(self.path))}")

    @property
    def index(self) -> pd.DataFrame:
        """The whole index as a DataFrame (loaded on first use; for a large store prefer
        ``iter_index`` or ``read_index(columns=...)``)."""
        if self._index is None:
            self._index = self.read_index()
        return self._index

    @property
    def index_columns(self) -> list[str]:
        """Names of the index columns (read from the Parquet schema, not the data)."""
        return list(self._index_file().schema_arrow.names)

    def read_index(self, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """The index (only ``columns`` if given, e.g. ``["row", "sample_idx", "is_sink"]``) as a DataFrame."""
        cols = None if columns is None else list(columns)
        try:
            table = self._index_file().read(columns=cols)
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, KeyError) or "No match for FieldRef" in str(e):
                raise StoreError(f"index columns {cols} are not all in this store") from None
            raise self._corrupt_index(e) from None
        return table.to_pandas()

    def iter_index(self, batch_rows: int = INDEX_ROW_GROUP, columns: Iterable[str] | None = None,
                   categorical: Iterable[str] = ()) -> Iterator[pd.DataFrame]:
        """Yield the index in blocks of <= batch_rows rows (in ``row`` order); memory ~ one block.
        ``categorical`` string columns come as pandas categoricals of the block's values, decoded
        from the file's dictionary pages (no string per row)."""
        if batch_rows < 1:
            raise StoreError(f"batch_rows must be >= 1, got {batch_rows}")
        f = self._index_file(categorical)
        try:
            for batch in f.iter_batches(batch_size=batch_rows, columns=None if columns is None else list(columns),
                                        use_threads=False):
                yield batch.to_pandas()
        except (pa.ArrowException, OSError) as e:
            raise self._corrupt_index(e) from None

    def _get_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Runs of rows that are consecutive in one shard: (first row, shard code, first shard row),
        built from the index's shard columns one row group at a time."""
        if self._layout is None:
            code_of = {name: i for i, name in enumerate(self._shard_list)}
            starts, codes, srows = [], [], []
            pos, last_code, last_srow = 0, -1, -2
            f = self._index_file()
            try:
                for batch in f.iter_batches(batch_size=8192, columns=["shard", "shard_row"], use_threads=False):
                    shard = batch.column(0).dictionary_encode()
                    lut = np.array([code_of.get(s, -1) for s in shard.dictionary.to_pylist()], dtype=np.int64)
                    c = lut[shard.indices.to_numpy(zero_copy_only=False)]
                    r = batch.column(1).to_numpy()
                    if (c < 0).any():
                        raise StoreCorrupt(f"{self.path / 'index.parquet'} names shards that summary.json does "
                                           f"not list; {_REPAIR['index.parquet'].replace('DIR', str(self.path))}")
                    prev_c = np.r_[last_code, c[:-1]]
                    prev_r = np.r_[last_srow, r[:-1]]
                    new = np.flatnonzero((c != prev_c) | (r != prev_r + 1))
                    starts.append(new + pos)
                    codes.append(c[new])
                    srows.append(r[new])
                    pos += len(c)
                    if len(c):
                        last_code, last_srow = int(c[-1]), int(r[-1])
            except (pa.ArrowException, OSError) as e:
                raise self._corrupt_index(e) from None
            if pos != len(self):
                raise self._corrupt_index(ValueError(f"{pos} rows, summary.json says {len(self)}"))
            cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
            self._layout = (cat(starts).astype(np.int64), cat(codes).astype(np.int64), cat(srows).astype(np.int64))
        return self._layout

    # -- tensors

    def _map(self, code: int, site: str) -> np.ndarray:
        """A fresh read-only map of one shard's tensor [n, d]; dropping it unmaps the pages it touched,
        so resident memory stays at one batch however much of the store has been read. The shard's
        crc32 is checked on its first map in this process."""
        key = (code, site)
        spec = self._specs.get(key)
        if spec is None:
            rel = f"shards/{self._shard_list[code]}.safetensors"
            file = self.path / rel
            _check_file(self.path, rel, self.summary["files"][rel], content=True)
            start, header = read_safetensors_header(file)
            h = header.get(site)
            try:
                lo, hi = h["data_offsets"]
                dt = np.dtype(_NP_OF_ST[h["dtype"]])
                shape = tuple(int(x) for x in h["shape"])
                ok = hi - lo == dt.itemsize * int(np.prod(shape)) and start + hi <= file.stat().st_size
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise StoreCorrupt(f"{file}:{site} has a corrupt header (offsets do not match its shape); "
                                   f"{_repair_shard(file)}")
            spec = self._specs[key] = (file, dt, start + lo, shape)
        file, dt, offset, shape = spec
        if shape[0] == 0:  # np.memmap refuses empty maps
            return np.zeros(shape, dtype=dt)
        return np.memmap(str(file), dtype=dt, mode="r", offset=offset, shape=shape)  # str: a Path is resolve()d per map

    def _check_site(self, site: str) -> None:
        if site not in self.dims:
            raise StoreError(f"site {site!r} is not in this store; it has {list(self.sites)}")

    def _gather(self, site: str, rows: np.ndarray, as_: str) -> np.ndarray | torch.Tensor:
        """Rows (global positions) of one site, shard by shard, decoded into the output dtype."""
        if as_ not in ("numpy", "torch"):
            raise StoreError(f"as_ must be 'numpy' or 'torch', got {as_!r}")
        raw_bf16 = self.dtype == "bfloat16"
        # numpy has no bfloat16: numpy output is float32, torch output keeps the raw bits as bfloat16
        out_dt = np.uint16 if raw_bf16 and as_ == "torch" else (np.float32 if raw_bf16 else _NP_DTYPES[self.dtype])
        out = np.empty((len(rows), self.dims[site]), dtype=out_dt)
        if len(rows):
            run_start, run_code, run_srow = self._get_layout()
            k = np.searchsorted(run_start, rows, side="right") - 1
            codes = run_code[k]
            offsets = run_srow[k] + (rows - run_start[k])
            del k
            order = np.argsort(codes, kind="stable")
            bounds = np.flatnonzero(np.diff(codes[order])) + 1
            for part in np.split(order, bounds):
                mm = self._map(int(codes[part[0]]), site)
                chunk = mm[offsets[part]]
                if raw_bf16 and as_ == "numpy":
                    chunk = (chunk.astype(np.uint32) << 16).view(np.float32)
                out[part] = chunk
        if as_ == "numpy":
            return out
        t = torch.from_numpy(out)
        return t.view(torch.bfloat16) if raw_bf16 else t

    def _rows(self, rows: Any) -> np.ndarray:
        n = len(self)
        if rows is None:
            return np.arange(n, dtype=np.int64)
        if isinstance(rows, slice):
            return np.arange(n, dtype=np.int64)[rows]
        r = np.asarray(rows.to_numpy() if isinstance(rows, (pd.Series, pd.Index)) else rows)
        if r.dtype == bool:
            if r.shape != (n,):
                raise StoreError(f"a boolean row mask must have length {n}, got {r.shape}")
            return np.flatnonzero(r)
        if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
            raise StoreError(f"rows must be a 1-d array of row numbers or a boolean mask, got {r.dtype}{r.shape}")
        r = r.astype(np.int64)
        if r.size and (r.min() < 0 or r.max() >= n):
            raise StoreError(f"row numbers must lie in [0, {n}), got [{r.min()}, {r.max()}]")
        return r

    def get(self, site: str, rows: Any = None, as_: Literal["numpy", "torch"] = "numpy") -> np.ndarray | torch.Tensor:
        """Activations [n, d_site] for ``rows`` (row numbers, a boolean mask or a slice; all if None), in that order.

        Float16/float32 stores return their dtype; bfloat16 stores return float32 (numpy) or bfloat16 (torch).
        Only the returned array is allocated.
        """
        self._check_site(site)
        return self._gather(site, self._rows(rows), as_)

    def iter_batches(
        self, site: str, batch_rows: int = 65536, rows: Any = None, as_: Literal["numpy", "torch"] = "numpy"
    ) -> Iterator[np.ndarray | torch.Tensor]:
        """Yield [<= batch_rows, d_site] blocks of ``rows`` (default all, index order); peak memory ~ one block.

        Block k covers ``rows[k*batch_rows:(k+1)*batch_rows]``, so ``index.iloc`` of the same slice gives its labels.
        """
        self._check_site(site)
        if batch_rows < 1:
            raise StoreError(f"batch_rows must be >= 1, got {batch_rows}")
        if rows is None:   # no n-sized row array
            for i in range(0, len(self), batch_rows):
                yield self._gather(site, np.arange(i, min(i + batch_rows, len(self)), dtype=np.int64), as_)
            return
        r = self._rows(rows)
        for i in range(0, len(r), batch_rows):
            yield self._gather(site, r[i : i + batch_rows], as_)


# ----------------------------------------------------------------------------- verify


def verify(path: str | os.PathLike, repair: bool = False) -> dict:
    """Check every file of a store: config, each shard's metadata, page checksums, size and crc32
    of its tensors, the samples' uniqueness, summary.json and index.parquet (all bytes read).

    With ``repair``: damaged shards are deleted (their samples are recomputed by rerunning the
    same cache command, which resumes), and a damaged or stale index/summary is rebuilt by a merge
    when no shard was lost (else deleted, and the rerun merges). Refuses while a writer is alive.

    Returns a JSON-ready dict: store, ok (no problem found), merged, shards, samples, rows,
    bytes_checked, problems [{file, problem}], debris [files], repaired [actions], next (what to run).
    """
    root = Path(path)
    cfg = _read_config(root)
    locks = _hold_all_locks(root) if repair else []
    try:
        return _verify(root, cfg, repair)
    finally:
        for lock in locks:
            lock.release()


def _verify(root: Path, cfg: dict, repair: bool) -> dict:
    sites, dtype = tuple(cfg["sites"]), cfg["dtype"]
    shards = root / "shards"
    report: dict[str, Any] = {"store": str(root), "ok": True, "merged": False, "shards": 0, "samples": 0, "rows": 0,
                              "bytes_checked": 0, "problems": [], "debris": [], "repaired": [], "next": None}
    problems: list[dict] = report["problems"]

    def problem(file: Path | str, e: BaseException | str) -> None:
        problems.append({"file": str(file), "problem": str(e)})

    names = _shard_names(shards) if shards.is_dir() else []
    bad: set[str] = set()
    owner: dict[int, str] = {}
    crcs: dict[str, dict] = {}
    for name in names:
        try:
            m = _ShardMeta(root, name)
            _shard_dims(m.tensors, sites, dtype)
            n_t = {read_safetensors_header(m.tensors)[1][s]["shape"][0] for s in sites}
            if n_t != {m.num_rows}:
                raise StoreCorrupt(f"{m.tensors} holds {sorted(n_t)} rows, its parquet {m.num_rows}; {_repair_shard(m.tensors)}")
            crc, size = file_crc32(m.tensors)
            report["bytes_checked"] += size
            if size != m.tensor_bytes:
                raise StoreCorrupt(f"{m.tensors} has {size} bytes, {m.tensor_bytes} were written; {_repair_shard(m.tensors)}")
            if crc != m.tensor_crc:
                raise StoreCorrupt(f"{m.tensors} is corrupt (crc32 {crc[6:]} != {m.tensor_crc[6:]} written); "
                                   f"{_repair_shard(m.tensors)}")
            try:
                pq.ParquetFile(m.parquet, page_checksum_verification=True).read(use_threads=False)
            except (pa.ArrowException, OSError) as e:
                raise StoreCorrupt(f"{m.parquet} is corrupt ({_first_line(e)}); {_repair_shard(m.parquet)}") from None
            pcrc, psize = file_crc32(m.parquet)
            report["bytes_checked"] += psize
            crcs[f"shards/{name}.parquet"] = {"crc32": pcrc, "bytes": psize}
            crcs[f"shards/{name}.safetensors"] = {"crc32": crc, "bytes": size}
        except StoreError as e:
            bad.add(name)
            problem(shards / f"{name}.safetensors", e)
            continue
        for s in m.samples.tolist():
            if s in owner:
                problem(m.parquet, f"sample {s} is also in shard {owner[s]}; run `mechsink verify --cache {root} "
                        "--repair` after deleting one of the two shards")
            owner[s] = name
        report["rows"] += m.num_rows
    report["shards"], report["samples"] = len(names), len(owner)
    if shards.is_dir():
        debris = [p for p in shards.glob("*.tmp")]
        debris += [p for p in shards.glob("*.safetensors") if not p.with_suffix(".parquet").exists()]
        report["debris"] = sorted(str(p) for p in debris)

    stale_index = False
    if (root / "summary.json").exists():
        try:
            summary = _read_summary(root)
            report["merged"] = True
            if summary.get("shards") != names:
                stale_index = True
                gone = [n for n in summary.get("shards", []) if n not in set(names)]
                if gone:
                    problem(shards / f"{gone[0]}.parquet", f"{len(gone)} merged shard(s) are missing, e.g. {gone[0]}")
                else:
                    problem(root / "index.parquet", "index.parquet is out of date with shards/ (run mechsink.cache.merge)")
            for rel, want in summary.get("files", {}).items():
                if rel.startswith("shards/"):
                    if rel in crcs and crcs[rel] != want:
                        bad.add(Path(rel).stem)
                        problem(root / rel, f"{root / rel} differs from the bytes merged (crc32 {crcs[rel]['crc32'][6:]} "
                                f"!= {want['crc32'][6:]}); {_repair_shard(root / rel)}")
                    continue
                try:
                    crc, size = file_crc32(root / rel)
                except FileNotFoundError:
                    stale_index = True
                    problem(root / rel, f"{root / rel} is missing; {_REPAIR['index.parquet'].replace('DIR', str(root))}")
                    continue
                report["bytes_checked"] += size
                if (crc, size) != (want["crc32"], want["bytes"]):
                    stale_index = True
                    problem(root / rel, f"{root / rel} is corrupt (crc32 {crc[6:]} != {want['crc32'][6:]} written); "
                            f"{_REPAIR['index.parquet'].replace('DIR', str(root))}")
        except StoreError as e:
            stale_index = True
            problem(root / "summary.json", e)
    report["ok"] = not problems
    if repair and (problems or report["debris"]):
        for name in sorted(bad):
            for ext in ("parquet", "safetensors"):     # parquet first: the shard is uncommitted at once
                _unlink_quietly(shards / f"{name}.{ext}")
            report["repaired"].append(f"deleted damaged shard {name}")
        _clean_debris(shards, "r")
        if report["debris"]:
            report["repaired"].append(f"deleted {len(report['debris'])} uncommitted file(s)")
        if bad:
            _unlink_quietly(root / "index.parquet", root / "summary.json")
            report["repaired"].append("deleted index.parquet and summary.json (a rerun rebuilds them)")
            report["next"] = ("rerun the same `mechsink cache` command: it resumes and recomputes the samples of the "
                              f"{len(bad)} deleted shard(s)")
        elif stale_index or report["merged"] is False and names:
            _merge(root, cfg, _shard_names(shards))
            report["repaired"].append("rebuilt index.parquet and summary.json from the shards")
    return report


