"""The activation store: sharded, resumable, crash-safe on write and memory-mapped on read.

A store is a directory::

    store.json                      config; its sha256 content hash is the store id
    shards/r{rank:02d}-{seq:06d}.safetensors   one tensor per site, name = site, shape [n_rows, d_site]
    shards/r{rank:02d}-{seq:06d}.parquet       the rows of that shard (one row per cached token)
    index.parquet                   all committed rows, sorted by (sample_idx, order of writing),
                                    with a global ``row`` column (= position) and ``shard``/``shard_row``
    summary.json                    counts, site widths, the list of merged shards

A shard counts only once its parquet file exists: tensors are renamed into place first, the
parquet last, so a process killed at any moment leaves either a whole shard or debris that the
next writer of that rank deletes. Samples are never split across shards, which is what makes
``done_samples()`` an exact resume point.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mechsink.errors import MechsinkError


class StoreError(MechsinkError):
    """A store cannot be opened, written or read as asked (one-line message)."""


FORMAT_VERSION = 1
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_NP_DTYPES = {"float16": np.float16, "float32": np.float32}
# np.memmap dtype per safetensors dtype; bf16 has no numpy type and is read as its raw bits
_NP_OF_ST = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}
SINK_CLASSES = ("vit", "llm", "both", "none")

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
_SAMPLES_KEY = b"mechsink.samples"


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StoreConfig:
    """What determines a store's content; its hash (with the dtype) is the store id.

    sites: site names cached, e.g. ``("vit.out", "llm.blocks.2.hook_resid_post")``.
    tokens: the token selection cached, e.g. ``("image", "cls")``.
    model / model_hash: model id and a hash of its weights or config.
    data: fingerprint of the dataset (ids, paths, prompts, order).
    params: anything else that changes the content (sink rule, prompt template, ...); JSON-able.
    """

    sites: tuple[str, ...]
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
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path.parent} is not a store: {what} {path.name} is missing") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file straight from the tensors' memory and fsync it.

    Written here rather than with safetensors.save_file, which stages through its own temporary
    file (whose name a killed process would leave behind) or through one more copy in memory.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    views, pos = [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().view(-1)
        raw = raw.view(torch.int16) if t.dtype == torch.bfloat16 else raw  # numpy has no bfloat16
        view = raw.numpy().view(np.uint8)
        st_dtype = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype]
        header[name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [pos, pos + view.nbytes]}
        views.append(view)
        pos += view.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data starts 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for view in views:
            f.write(view.data)
        f.flush()
        os.fsync(f.fileno())


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, header dict) of a safetensors file, read without loading it."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise StoreError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{path} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def _shard_names(shards: Path) -> list[str]:
    """Committed shards (their parquet exists), in (rank, seq) order."""
    names = [p.stem for p in shards.glob("r*-*.parquet") if _SHARD_RE.match(p.stem)]
    return sorted(names, key=lambda s: tuple(int(x) for x in _SHARD_RE.match(s).groups()))


def _shard_samples(parquet: Path) -> list[int]:
    meta = pq.read_schema(parquet).metadata or {}
    if _SAMPLES_KEY not in meta:
        raise StoreError(f"{parquet} lacks the sample list; it was not written by StoreWriter")
    return json.loads(meta[_SAMPLES_KEY])


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


# ----------------------------------------------------------------------------- rows


def _normalise_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Standard columns in order with their dtypes (defaults filled), then the extra columns as given."""
    if not isinstance(rows, pd.DataFrame):
        raise StoreError(f"rows must be a pandas DataFrame, got {type(rows).__name__}")
    clash = [c for c in RESERVED_COLUMNS if c in rows.columns]
    if clash:
        raise StoreError(f"row columns {clash} are reserved by the store (grid position is patch_row/patch_col)")
    if rows.columns.duplicated().any():
        raise StoreError(f"duplicate row columns {sorted(set(rows.columns[rows.columns.duplicated()]))}")
    out = {}
    n = len(rows)
    for name, (dtype, default) in ROW_COLUMNS.items():
        if name in rows.columns:
            col = rows[name]
            if dtype in ("int64", "int32", "bool") and col.isna().any():
                raise StoreError(f"row column {name!r} has missing values")
            try:
                out[name] = col.astype(dtype).to_numpy() if dtype != "str" else col.astype(str).to_numpy()
            except (TypeError, ValueError):
                raise StoreError(f"row column {name!r} cannot be read as {dtype}") from None
        elif default is None:
            raise StoreError(f"rows lack the required column {name!r}")
        else:
            out[name] = np.full(n, default, dtype=object if dtype == "str" else dtype)
    bad = set(out["sink_class"]) - set(SINK_CLASSES)
    if bad:
        raise StoreError(f"sink_class must be one of {SINK_CLASSES}, got {sorted(bad)}")
    df = pd.DataFrame(out)
    for c in ("sample_id", "image_path", "token_role", "sink_class"):
        df[c] = df[c].astype(str)
    for c in rows.columns:
        if c not in ROW_COLUMNS:
            df[c] = rows[c].reset_index(drop=True)
    return df


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate, leaving out empty frames (their untyped extra columns would turn ints into floats)."""
    full = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(full, ignore_index=True) if len(full) > 1 else full[0].reset_index(drop=True)


# ----------------------------------------------------------------------------- writer


class StoreWriter:
    """Appends whole samples to a store; shards are written on a background thread.

    Args:
        path: store directory (created if missing; an existing store with the same config resumes).
        config: a StoreConfig or a mapping of its fields.
        rank, world_size: this writer's shard namespace; default to torch.distributed's when a
            process group is up, else 0 and 1. Which samples a rank writes is the caller's choice.
        shard_rows: a shard is cut once this many rows are buffered (never inside a sample).
        dtype: storage dtype of the tensors: "float16", "bfloat16" or "float32".
        pending_shards: shards allowed to wait for the disk while the next one fills; bounds memory
            at about (pending_shards + 1) shards.

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
    ) -> None:
        if dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if shard_rows < 1 or pending_shards < 1:
            raise StoreError(f"shard_rows and pending_shards must be >= 1, got {shard_rows}, {pending_shards}")
        d = _dist()
        self.rank = rank if rank is not None else (d.get_rank() if d else 0)
        self.world_size = world_size if world_size is not None else (d.get_world_size() if d else 1)
        if not 0 <= self.rank < self.world_size:
            raise StoreError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.config = StoreConfig.coerce(config)
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.path = Path(path)
        self.shards = self.path / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.id = self._claim_config()
        self._prefix = f"r{self.rank:02d}-"
        _clean_debris(self.shards, self._prefix)

        self._done: set[int] = set()
        self._dims: dict[str, int] = {}
        seq = -1
        for name in _shard_names(self.shards):
            self._done.update(_shard_samples(self.shards / f"{name}.parquet"))
            if name.startswith(self._prefix):
                seq = max(seq, int(_SHARD_RE.match(name).group(2)))
            if not self._dims:
                self._dims = _shard_dims(self.shards / f"{name}.safetensors", self.config.sites, self.dtype)
        self._seq = seq + 1

        self._rows: list[pd.DataFrame] = []
        self._tensors: dict[str, list[torch.Tensor]] = {s: [] for s in self.config.sites}
        self._samples: list[int] = []
        self._added: set[int] = set()  # every sample handed to this writer, buffered or written
        self._n_buffered = 0
        self._columns: list[str] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mechsink-store")
        self._pending: deque[Future] = deque()
        self._max_pending = pending_shards
        self._closed = False

    def _claim_config(self) -> str:
        sid = store_id(self.config, self.dtype)
        doc = {"id": sid, **self.config.hashed(self.dtype), "mechsink_version": _mechsink_version()}
        target = self.path / "store.json"
        if not target.exists():
            # exclusive create: ranks starting together agree on one store.json
            tmp = self.path / f".store.json.r{self.rank:02d}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            _fsync_file(tmp)
            try:
                os.link(tmp, target)
                _fsync_dir(self.path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        have = _read_json(target, "config").get("id")
        if have != sid:
            raise StoreError(
                f"{self.path} holds a store with another config (id {str(have)[:12]} != {sid[:12]}); "
                "use a new directory or the same config"
            )
        return sid

    # -- writing

    def done_samples(self) -> set[int]:
        """sample_idx committed by any rank before this writer opened, plus those added to it (skip these)."""
        return self._done | self._added

    def add(
        self,
        rows: pd.DataFrame,
        tensors: Mapping[str, torch.Tensor | np.ndarray],
        samples: Iterable[int] | None = None,
    ) -> None:
        """Buffer whole samples.

        rows: one row per token (see ROW_COLUMNS; ``sample_idx`` and ``token_role`` required,
            other standard columns default, extra columns kept). Every call must carry the same columns.
        tensors: {site: [n_rows, d_site]}, row i of each belongs to row i of ``rows``.
        samples: the sample_idx this call completes; defaults to those in ``rows``. Pass it to
            record samples that yield no rows, so a resume does not redo them.
        """
        self._check_open()
        df = _normalise_rows(rows)
        n = len(df)
        if self._columns is None:
            self._columns = list(df.columns)
        elif list(df.columns) != self._columns:
            raise StoreError(f"row columns changed between add() calls: {self._columns} -> {list(df.columns)}")
        in_rows = set(np.unique(df["sample_idx"]).tolist())
        samples = sorted(in_rows if samples is None else {int(s) for s in samples})
        if not in_rows <= set(samples):
            raise StoreError(f"rows hold samples {sorted(in_rows - set(samples))} not listed in samples")
        again = [s for s in samples if s in self._done or s in self._added]
        if again:
            raise StoreError(f"samples {again[:5]} are already in the store; skip done_samples()")
        if set(tensors) != set(self.config.sites):
            raise StoreError(f"tensors are for sites {sorted(tensors)}, the store caches {list(self.config.sites)}")
        converted = {}
        for site in self.config.sites:
            t = torch.as_tensor(tensors[site]).detach()
            if t.ndim != 2 or t.shape[0] != n:
                raise StoreError(f"tensor for {site} has shape {tuple(t.shape)}, expected [{n}, d]")
            d = self._dims.setdefault(site, int(t.shape[1]))
            if t.shape[1] != d:
                raise StoreError(f"tensor for {site} has width {t.shape[1]}, the store holds width {d}")
            converted[site] = t.to(device="cpu", dtype=DTYPES[self.dtype]).contiguous()
        for site, t in converted.items():
            self._tensors[site].append(t)
        self._rows.append(df)
        self._samples.extend(samples)
        self._added.update(samples)
        self._n_buffered += n
        if self._n_buffered >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered samples to the disk thread as one shard (blocks while too many are pending)."""
        self._check_open()
        self._raise_failed()
        if not self._samples:
            return
        rows = _concat(self._rows)
        tensors = {s: torch.cat(ts) if len(ts) > 1 else ts[0] for s, ts in self._tensors.items()}
        samples = self._samples
        name = f"{self._prefix}{self._seq:06d}"
        self._seq += 1
        self._rows, self._samples, self._n_buffered = [], [], 0
        self._tensors = {s: [] for s in self.config.sites}
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()  # re-raises a failed write here
        self._pending.append(self._pool.submit(self._commit, name, rows, tensors, samples))

    def _commit(self, name: str, rows: pd.DataFrame, tensors: dict[str, torch.Tensor], samples: list[int]) -> None:
        """Write one shard: tmp files, fsync, rename tensors, then rename the parquet (the commit point)."""
        st, pqt = self.shards / f"{name}.safetensors", self.shards / f"{name}.parquet"
        st_tmp, pq_tmp = st.with_name(st.name + ".tmp"), pqt.with_name(pqt.name + ".tmp")
        write_safetensors(st_tmp, tensors, metadata={"store_id": self.id, "rows": str(len(rows))})
        table = pa.Table.from_pandas(rows, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[_SAMPLES_KEY] = json.dumps(sorted(samples)).encode()
        pq.write_table(table.replace_schema_metadata(meta), pq_tmp)
        _fsync_file(pq_tmp)
        os.replace(st_tmp, st)
        _fsync_dir(self.shards)
        os.replace(pq_tmp, pqt)
        _fsync_dir(self.shards)

    def _raise_failed(self) -> None:
        for f in [f for f in self._pending if f.done()]:
            self._pending.remove(f)
            f.result()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"writer for {self.path} is closed")

    def close(self) -> None:
        """Commit what is buffered and wait for the disk thread."""
        if self._closed:
            return
        try:
            self.flush()
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)

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
        if self.rank == 0:
            merge(self.path, clean=d is not None or self.world_size == 1)
        if d:
            d.barrier()
        return Store.open(self.path) if d or self.rank == 0 else None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shard_dims(path: Path, sites: tuple[str, ...], dtype: str) -> dict[str, int]:
    """{site: d} of one shard, checked against the store's sites and dtype."""
    _, header = read_safetensors_header(path)
    if set(header) != set(sites):
        raise StoreError(f"{path.name} holds sites {sorted(header)}, the store caches {list(sites)}")
    dims = {}
    for site in sites:
        h = header[site]
        if h["dtype"] != _ST_DTYPES[dtype] or len(h["shape"]) != 2:
            raise StoreError(f"{path.name}:{site} is {h['dtype']}{h['shape']}, expected {_ST_DTYPES[dtype]}[n, d]")
        dims[site] = h["shape"][1]
    return dims


# ----------------------------------------------------------------------------- merge


def merge(path: str | os.PathLike, clean: bool = False) -> "Store":
    """Build index.parquet and summary.json from every committed shard; return the opened store.

    Rows are sorted by (sample_idx, order of writing); ``row`` is the global position. Call it when
    no writer is active; ``clean`` also deletes every rank's tmp files and uncommitted tensors.
    """
    root = Path(path)
    cfg = _read_json(root / "store.json", "config")
    shards = root / "shards"
    if clean:
        _clean_debris(shards, "r")
    sites, dtype = tuple(cfg["sites"]), cfg["dtype"]
    names = _shard_names(shards)
    frames, dims, owner, columns = [], {}, {}, None
    for name in names:
        table = pq.read_table(shards / f"{name}.parquet")
        for s in json.loads(table.schema.metadata[_SAMPLES_KEY]):
            if s in owner:
                raise StoreError(f"sample {s} is in both shards {owner[s]} and {name}; remove one of them")
            owner[s] = name
        sd = _shard_dims(shards / f"{name}.safetensors", sites, dtype)
        n_t = {read_safetensors_header(shards / f"{name}.safetensors")[1][s]["shape"][0] for s in sites}
        if n_t != {table.num_rows}:
            raise StoreError(f"{name} has {table.num_rows} rows but tensors of {sorted(n_t)} rows")
        if dims and sd != dims:
            raise StoreError(f"{name} has site widths {sd}, other shards {dims}")
        dims = sd
        df = table.to_pandas()
        if columns is None:
            columns = list(df.columns)
        elif list(df.columns) != columns:
            raise StoreError(f"{name} has columns {list(df.columns)}, other shards {columns}")
        df["shard"] = name
        df["shard_row"] = np.arange(len(df), dtype=np.int64)
        frames.append(df)
    if frames:
        index = _concat(frames)
        index = index.sort_values("sample_idx", kind="stable", ignore_index=True)
    else:
        index = _normalise_rows(pd.DataFrame({"sample_idx": [], "token_role": []}))
        index["shard"] = pd.Series([], dtype=str)
        index["shard_row"] = np.zeros(0, dtype=np.int64)
    index.insert(0, "row", np.arange(len(index), dtype=np.int64))
    tmp = root / ".index.parquet.tmp"
    pq.write_table(pa.Table.from_pandas(index, preserve_index=False), tmp)
    _fsync_file(tmp)
    os.replace(tmp, root / "index.parquet")
    item = np.dtype(_NP_OF_ST[_ST_DTYPES[dtype]]).itemsize
    summary = {
        "id": cfg["id"],
        "n_rows": int(len(index)),
        "n_samples": len(owner),
        "n_samples_with_rows": int(index["sample_idx"].nunique()),
        "sites": {s: int(dims.get(s, 0)) for s in sites},
        "dtype": dtype,
        "tensor_bytes": int(len(index) * item * sum(dims.values())),
        "rows_by_role": {str(k): int(v) for k, v in index["token_role"].value_counts().sort_index().items()},
        "rows_by_sink_class": {str(k): int(v) for k, v in index["sink_class"].value_counts().sort_index().items()},
        "shards": names,
    }
    _write_json_atomic(root / "summary.json", summary)
    return Store.open(root)


# ----------------------------------------------------------------------------- reader


class Store:
    """A finished store, read through memory maps; tensor memory is never loaded wholesale.

    Attributes: ``path``, ``config`` (store.json), ``id``, ``index`` (DataFrame, one row per token,
    ``row`` = position), ``sites``, ``dims`` ({site: d}), ``dtype``, ``summary``.
    """

    def __init__(self, path: Path, config: dict, summary: dict, index: pd.DataFrame) -> None:
        self.path, self.config, self.summary, self.index = path, config, summary, index
        self.id: str = config["id"]
        self.sites: tuple[str, ...] = tuple(config["sites"])
        self.dtype: str = config["dtype"]
        self.dims: dict[str, int] = {s: int(summary["sites"][s]) for s in self.sites}
        codes, self._shard_list = pd.factorize(index["shard"], sort=False)
        self._code = codes.astype(np.int64)
        self._offset = index["shard_row"].to_numpy(np.int64)
        self._specs: dict[tuple[int, str], tuple[Path, np.dtype, int, tuple[int, int]]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        root = Path(path)
        config = _read_json(root / "store.json", "config")
        summary = _read_json(root / "summary.json", "summary (run finalize() or mechsink.cache.merge)")
        if not (root / "index.parquet").exists():
            raise StoreError(f"{root} has no index.parquet; run finalize() or mechsink.cache.merge({str(root)!r})")
        committed = _shard_names(root / "shards")
        if committed != summary.get("shards") or summary.get("id") != config.get("id"):
            raise StoreError(
                f"{root}: index.parquet is out of date with shards/ "
                f"({len(summary.get('shards', []))} merged, {len(committed)} on disk); run mechsink.cache.merge"
            )
        return cls(root, config, summary, pd.read_parquet(root / "index.parquet"))

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, rows={len(self)}, sites={list(self.sites)}, dtype={self.dtype})"

    def _map(self, code: int, site: str) -> np.ndarray:
        """A fresh read-only map of one shard's tensor [n, d]; dropping it unmaps the pages it touched,
        so resident memory stays at one batch however much of the store has been read."""
        key = (code, site)
        spec = self._specs.get(key)
        if spec is None:
            file = self.path / "shards" / f"{self._shard_list[code]}.safetensors"
            start, header = read_safetensors_header(file)
            h = header[site]
            lo, hi = h["data_offsets"]
            dt = np.dtype(_NP_OF_ST[h["dtype"]])
            if hi - lo != dt.itemsize * int(np.prod(h["shape"])):
                raise StoreError(f"{file.name}:{site} has a corrupt header (offsets do not match its shape)")
            spec = self._specs[key] = (file, dt, start + lo, tuple(h["shape"]))
        file, dt, offset, shape = spec
        if shape[0] == 0:  # np.memmap refuses empty maps
            return np.zeros(shape, dtype=dt)
        return np.memmap(file, dtype=dt, mode="r", offset=offset, shape=shape)

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
        codes = self._code[rows]
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for part in np.split(order, bounds) if len(order) else ():
            mm = self._map(int(codes[part[0]]), site)
            chunk = mm[self._offset[rows[part]]]
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
        r = self._rows(rows)
        for i in range(0, len(r), batch_rows):
            yield self._gather(site, r[i : i + batch_rows], as_)

