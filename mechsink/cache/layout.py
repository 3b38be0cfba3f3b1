"""What an activation store is on disk: its layout, config and id, errors, and the durable-file
helpers every part of the store shares (writer, index, reader, integrity).

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
import hashlib
import json
import mmap
import os
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mechsink.config import Config
from mechsink.errors import MechsinkError


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
INDEX_ROW_GROUP = 1 << 16           # most rows per row group of index.parquet (fewer in small stores), and
                                    # the rows per block the reader yields by default

_SHARD_RE = re.compile(r"^r(\d{2,})-(\d{6,})$")
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
