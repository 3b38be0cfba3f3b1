"""The rows a probe trains on: token sets (selections and the ``mean`` aggregate) read off the
cache index, their control-task labels, and their features read from the store in blocks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import numpy as np

from .config import _SEED_ORDER, ProbeConfig, ProbeError
from .labels import _Index, _int_type, _Labels, _small


ROW_CHUNK = 1 << 16   # rows looked at once by the passes that find positions


def _where(mask: np.ndarray) -> np.ndarray:
    """np.flatnonzero(mask) as int32 when positions fit (a token set's rows cost half), found in
    chunks: no int64 array of them on the way."""
    if len(mask) >= 2**31:
        return np.flatnonzero(mask)
    out = np.empty(np.count_nonzero(mask), dtype=np.int32)
    at = 0
    for start in range(0, len(mask), ROW_CHUNK):
        p = np.flatnonzero(mask[start:start + ROW_CHUNK])
        out[at:at + len(p)] = p
        out[at:at + len(p)] += start
        at += len(p)
    return out


@dataclass
class _Set:
    """Rows of one token set: index rows (or pooled rows for ``mean``) with their labels and images."""

    name: str
    rows: np.ndarray        # [n] index rows; for mean: [n_pool] first row of each pooled image
    pool_rows: np.ndarray | None   # mean only: [m] the image rows, pool by pool (index order within one)
    pool_start: np.ndarray | None  # mean only: [n + 1] pool p is pool_rows[pool_start[p]:pool_start[p + 1]]
    y: np.ndarray           # class codes (lab.y's type)
    y_control: np.ndarray
    unit: np.ndarray        # sample (image-level) or index row (patch-level: ``rows`` itself)
    group: np.ndarray


_SET_COLUMNS = ("sample_idx", "image_path", "token_role", "is_sink", "image")   # what a token set reads


def _token_set(name: str, index: _Index, lab: _Labels, config: ProbeConfig) -> _Set | str:
    """The rows of a token set, read off the index in one scan of its blocks, or a string saying
    why it is left out."""
    if name in ("cls", "mean") and lab.level == "patch":
        return f"{name}: a patch-level label has no {name} token"
    need = ("sample_idx", "token_role") + (("is_sink",) if name in ("sinks", "nonsinks") else ()) \
        + (("image",) if name == "mean" else ())
    missing = [c for c in need if c not in index.columns]
    if missing:
        raise ProbeError(f"the cache index has no column {missing[0]!r}, which the token set {name!r} needs")
    row_type = np.int32 if index.n < 2**31 else np.int64
    parts = []
    for at, b in index.blocks([lab.label, *_SET_COLUMNS], text=lab.label):
        y = lab.codes(b[lab.label])
        keep = (b["token_role"] == ("cls" if name == "cls" else "image")).to_numpy(bool) & (y >= 0)
        if name in ("sinks", "nonsinks"):
            sink = b["is_sink"].to_numpy(bool)
            keep &= sink if name == "sinks" else ~sink
        p = np.flatnonzero(keep)
        sample = b["sample_idx"].to_numpy()[p]
        sample = sample.astype(_int_type(int(np.abs(sample).max(initial=0))))   # the unit: 2 bytes, not 8
        parts.append(((p + at).astype(row_type), y[p], lab.groups(b.iloc[p]).astype(np.int32), sample,
                      _small(b["image"].to_numpy()[p] + 1) if name == "mean" else None))   # image -1: none
    rows, y, group, sample = (np.concatenate([q[i] for q in parts]) if parts else np.array([], dtype=np.int64)
                              for i in range(4))
    group = group.astype(_int_type(len(lab.group_names)))
    pool_rows = pool_start = None
    if name == "mean":   # an aggregate, not a selection: one pooled row per (sample, image)
        first, pool_rows, pool_start = _pools(rows, sample, np.concatenate([q[4] for q in parts]))
        rows, y, group, sample = rows[first], y[first], group[first], sample[first]
    del parts
    if name in ("sinks", "nonsinks", "image") and config.max_tokens_per_image is not None and len(rows):
        keep = _cap(group, config.max_tokens_per_image, config.seed)
        if keep is not None:
            rows, y, group, sample = rows[keep], y[keep], group[keep], sample[keep]
    if len(rows) == 0:
        return f"{name}: no rows in the cache"
    unit = sample if lab.level == "image" else rows
    control = _control_labels(y, unit, group, lab.level, np.random.default_rng([config.seed, _SEED_ORDER.index(name)]))
    return _Set(name, rows, pool_rows, pool_start, y, control, unit, group)


def _pools(rows: np.ndarray, sample: np.ndarray, image: np.ndarray):
    """The ``mean`` set's pools, one per (sample, image), in (sample, image) order: (first row of
    each [n], the rows pool by pool [m], pool starts [n + 1]). An index written sample by sample
    holds each pool's rows as one run: then nothing is sorted."""
    if not len(rows):
        return np.array([], dtype=np.int64), rows, np.zeros(1, dtype=np.int64)
    new = np.empty(len(rows), dtype=bool)
    new[0] = True
    np.not_equal(sample[1:], sample[:-1], out=new[1:])
    new[1:] |= image[1:] != image[:-1]
    step = (sample[1:] > sample[:-1]) | ((sample[1:] == sample[:-1]) & (image[1:] >= image[:-1]))
    if step.all():                 # runs in order: pool p starts at its first row
        first = _where(new)
        return first, rows, np.append(first, len(rows))
    del new, step
    keys = sample.astype(np.int64) * (int(image.max()) + 1) + image
    _, first, pool = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(pool.ravel(), kind="stable")                # within a pool: index order
    return first, rows[order], np.append(0, np.cumsum(np.bincount(pool.ravel(), minlength=len(first))))


CAP_CHUNK = 1 << 16   # rows of the random order looked at once when a token set is capped per image


def _cap(group: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    """Positions (sorted) of a token set's rows that keep at most k of each image's (``group`` [n]):
    the first k of each image in the order ``default_rng(seed).permutation(n)`` puts the rows in;
    None when no image has more than k rows (every row kept, nothing drawn). Walked in chunks with
    a count per image, so that besides that order nothing of the set's size is held."""
    counts = np.bincount(group)
    if counts.max(initial=0) <= k:
        return None
    order = np.random.default_rng(seed).permutation(len(group))
    seen = np.zeros(len(counts), dtype=np.int64)      # rows of each image met so far in that order
    kept = []
    for start in range(0, len(order), CAP_CHUNK):
        r = order[start:start + CAP_CHUNK]
        g = group[r]
        by = np.argsort(g, kind="stable")               # within an image, in the random order
        sg = g[by]
        head = np.r_[True, sg[1:] != sg[:-1]]
        first = np.flatnonzero(head)
        rank = np.arange(len(sg)) - first[np.cumsum(head) - 1] + seen[sg]
        kept.append(r[by[rank < k]])
        seen += np.bincount(g, minlength=len(seen))
    return np.sort(np.concatenate(kept))


def _control_labels(y: np.ndarray, unit: np.ndarray, group: np.ndarray, level: str, rng) -> np.ndarray:
    """Control task labels [n] for a token set with labels y [n]; the control keeps the set's label
    distribution and breaks every link between an image's content and its label."""
    if level == "image":  # the units' labels shuffled across units
        _, first, inv = _unique(unit)
        return rng.permutation(y[first])[inv]
    # each (image, label) pair mapped to a random label drawn from the set's label distribution
    pairs, inv = np.unique(np.stack([group, y], axis=1), axis=0, return_inverse=True)
    freq = np.bincount(y, minlength=int(y.max()) + 1) / len(y)
    return rng.choice(len(freq), size=len(pairs), p=freq).astype(y.dtype)[inv.ravel()]


def _unique(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(a, return_index=True, return_inverse=True) (inverse flat). Units come in index
    order, already sorted: then without the sort and its n-sized temporaries."""
    if len(a) and (a[1:] >= a[:-1]).all():
        new = np.empty(len(a), dtype=bool)
        new[0] = True
        np.not_equal(a[1:], a[:-1], out=new[1:])
        first = _where(new)
        inv = np.cumsum(new, dtype=_int_type(len(first)))   # the smallest type per row, not int64
        inv -= 1
        return a[first], first, inv
    values, first, inv = np.unique(a, return_index=True, return_inverse=True)
    return values, first, inv.ravel()


BLOCK_BYTES = 1 << 20   # float64 rows a fit works on at once (a store read costs ~0.25 ms however few rows)
MIN_BLOCK_ROWS = 1024     # ... but never fewer rows than this (wide models: matrix products stay efficient)


class _Rows:
    """A token set's features at a site, read in blocks of rows: ``blocks(pos)`` yields
    ``(start, x)``, x [<= block_rows, d] the rows ``pos[start:start + len(x)]``. Blocks depend only
    on ``pos`` and the width (not on the memory budget), so rows held in memory and rows read from
    the store, under any budget, give the same sums and the same probe."""

    def __init__(self, d: int, read, memory_mb: float = float("inf")) -> None:
        self.d = int(d)
        self.block_rows = max(MIN_BLOCK_ROWS, BLOCK_BYTES // (8 * self.d))
        self.read = read           # positions -> [len, d] features
        self.held = False
        self.memory_bytes = memory_mb * 2**20

    def blocks(self, pos: np.ndarray):
        for start in range(0, len(pos), self.block_rows):
            yield start, self.read(pos[start:start + self.block_rows])


def _features(store, s: _Set, site: str, memory_mb: float) -> tuple[_Rows, np.ndarray]:
    """The set's features at a site (mean: pooled per image, float32) and which rows are finite
    (NaN: not cached). Read once and held as float32 when n * d float32 fit in ``memory_mb``; else
    every pass of a fit gathers its rows from the store again, so memory does not grow with the cache."""
    d = store.dims[site]
    if s.pool_rows is None:
        def gather(pos):  # the store's float16/float32 (exact in float32; the fit computes in float64)
            return store.get(site, s.rows[pos])
    else:
        gather = _pooled(store, s, site, memory_mb)
    rows = _Rows(d, gather, memory_mb)
    n = len(s.rows)
    held = np.empty((n, d), dtype=np.float32) if n * d * 4 <= memory_mb * 2**20 else None
    finite = np.empty(n, dtype=bool)
    for start, x in rows.blocks(np.arange(n, dtype=_int_type(n))):
        finite[start:start + len(x)] = np.isfinite(x).all(axis=1)
        if held is not None:
            held[start:start + len(x)] = x
    if held is not None:
        rows.read, rows.held = partial(_take, held), True
    return rows, finite


def _take(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """x[pos], a view when pos is a run of consecutive rows (the final fit reads every row)."""
    if len(pos) and pos[-1] - pos[0] == len(pos) - 1 and (len(pos) < 3 or (np.diff(pos) == 1).all()):
        return x[pos[0]:pos[-1] + 1]
    return x[pos]


def _pooled(store, s: _Set, site: str, memory_mb: float):
    """positions -> [len, d] means of those pools' image rows (float64 sums in row order)."""
    start = s.pool_start[:-1]
    size = np.diff(s.pool_start)
    step = max(1, _Rows(store.dims[site], None, memory_mb).block_rows // max(1, int(size.max(initial=1))))

    def gather(pos):
        out = np.empty((len(pos), store.dims[site]), dtype=np.float32)
        for i in range(0, len(pos), step):                     # at most a block of image rows at once
            p = pos[i:i + step]
            n = size[p]
            first = np.cumsum(n) - n
            members = np.repeat(start[p] - first, n) + np.arange(n.sum())
            x = np.asarray(store.get(site, s.pool_rows[members]), dtype=np.float64)
            out[i:i + len(p)] = np.add.reduceat(x, first, axis=0) / n[:, None]
        return out
    return gather


def _subset(s: _Set, keep: np.ndarray) -> _Set:
    if keep.all():
        return s
    rows = s.rows[keep]
    return dataclasses.replace(s, rows=rows, y=s.y[keep], y_control=s.y_control[keep],
                               unit=rows if s.unit is s.rows else s.unit[keep], group=s.group[keep])
