"""Reading a finished store: :class:`Store` maps shards' tensors and reads the index lazily.
Every file is checked against its recorded size on open and its crc32 on its first read in a
process."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mechsink.cache.layout import (
    INDEX_ROW_GROUP, StoreCorrupt, StoreError, _NP_DTYPES, _NP_OF_ST, _REPAIR, _canonical, _crc_hex,
    _first_line, _read_config, _read_json, _repair_shard, _shard_names, file_crc32,
)
from mechsink.cache.tensorfile import read_safetensors_header


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
