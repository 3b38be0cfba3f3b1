"""A token set's features at a site, read from the store in blocks of rows: held in memory (in
the store's float16, or float32) when they fit the probe's budget, else gathered from the store on
every pass of a fit."""
from __future__ import annotations

from functools import partial

import numpy as np

from .sets import _Set

BLOCK_BYTES = 1 << 20   # float64 rows a fit works on at once (a store read costs ~0.25 ms however few rows)
MIN_BLOCK_ROWS = 1024     # ... but never fewer rows than this (wide models: matrix products stay efficient)


class _Rows:
    """Features of a set of rows at one width: ``read(batch)`` gives [len, d] for a block of rows
    (a :meth:`.sets._Set.batches` block), looked up by ``key`` ("pos": positions in the set, or
    "rows": index rows of the store). Blocks have ``block_rows`` rows, which depend only on the
    width: rows held and rows read from the store, under any budget, give the same sums."""

    def __init__(self, d: int, read, memory_mb: float = float("inf"), key: str = "pos") -> None:
        self.d = int(d)
        self.block_rows = max(MIN_BLOCK_ROWS, BLOCK_BYTES // (8 * self.d))
        self.reader, self.key = read, key
        self.held = False
        self.memory_bytes = memory_mb * 2**20

    def read(self, batch: dict) -> np.ndarray:
        return self.reader(batch[self.key])


def _features(store, s: _Set, site: str, memory_mb: float) -> _Rows:
    """The set's features at a site (mean: pooled per image, float32), and in ``s.cols["ok"]``
    which rows are finite (NaN: not cached). Read once and held when they fit in ``memory_mb``
    (float16 from a float16 store, else float32); else every pass of a fit gathers its rows from
    the store again, so memory does not grow with the cache."""
    d = store.dims[site]
    if s.members is None:   # the store's float16/float32 (exact in float32; the fit computes in float64)
        rows = _Rows(d, lambda index_rows: store.get(site, index_rows), memory_mb, key="rows")
    else:
        rows = _Rows(d, _pooled(store, s, site, memory_mb), memory_mb)
    # held in the store's own float16 where it has it (float32 holds it exactly: the same numbers,
    # twice the rows in the budget); pooled means and the other types as float32
    dt = np.dtype(np.float16 if s.members is None and store.dtype == "float16" else np.float32)
    held = np.empty((s.n, d), dtype=dt) if s.n * d * dt.itemsize <= memory_mb * 2**20 else None
    s.cols.reset("ok", bool)
    for b in s.batches(rows.block_rows):
        x = rows.read(b)
        s.cols.append(ok=np.isfinite(x).all(axis=1))
        if held is not None:
            held[b["pos"]] = x
    s.cols.close()
    if held is not None:
        rows.reader, rows.key, rows.held = partial(_take, held), "pos", True
    return rows


def _take(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """x[pos], a view when pos is a run of consecutive rows (the final fit reads every row)."""
    if len(pos) and pos[-1] - pos[0] == len(pos) - 1 and (len(pos) < 3 or (np.diff(pos) == 1).all()):
        return x[pos[0]:pos[-1] + 1]
    return x[pos]


def _pooled(store, s: _Set, site: str, memory_mb: float):
    """positions (ascending) -> [len, d] means of those pools' image rows (float64 sums in row order)."""
    start = s.pool_start[:-1]
    size = np.diff(s.pool_start)
    d = store.dims[site]
    step = max(1, _Rows(d, None, memory_mb).block_rows // max(1, int(size.max(initial=1))))

    def gather(pos):
        out = np.empty((len(pos), d), dtype=np.float32)
        for i in range(0, len(pos), step):                     # at most a block of image rows at once
            p = pos[i:i + step]
            n = size[p]
            first = np.cumsum(n) - n
            lo = int(start[p[0]])
            span = s.members.read("rows", lo, int(start[p[-1]] + n[-1]))
            x = np.asarray(store.get(site, span[np.repeat(start[p] - lo - first, n) + np.arange(n.sum())]),
                           dtype=np.float64)
            out[i:i + len(p)] = np.add.reduceat(x, first, axis=0) / n[:, None]
        return out
    return gather
