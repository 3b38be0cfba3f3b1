"""From a cache index to the rows a probe trains on: labels and their level, image folds, token
sets (selections and the ``mean`` aggregate), control-task labels and the features themselves."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from .config import _SEED_ORDER, ProbeConfig, ProbeError
from .linear import _plain


ROW_CHUNK = 1 << 16   # index rows looked at once by the passes that keep a number per image


@dataclass
class _Labels:
    """Per index row: class code (-1 unlabelled), unit id and group (image) id. Per-row arrays are
    held in the smallest integer type their values fit (a probe over 10^7 tokens holds several)."""

    level: str
    classes: list
    y: np.ndarray          # [n_rows] class codes in the smallest signed type, -1 where unlabelled
    unit: np.ndarray | None  # [n_rows]: sample (image-level); None at patch level, where the unit is the row
    group: np.ndarray      # [n_rows] int: image the row belongs to (split and bootstrap unit)
    group_names: np.ndarray
    fold_of_group: np.ndarray  # [n_groups] int8/int16


def _int_type(top: int):
    """The smallest signed integer type that holds 0..top (and -top - 1..0)."""
    return next(dt for dt in (np.int8, np.int16, np.int32, np.int64) if top <= np.iinfo(dt).max)


def _small(a: np.ndarray) -> np.ndarray:
    """Non-negative integers in the smallest of int8/16/32/64 that holds them (storage only:
    arithmetic on them casts to int64 first)."""
    return a.astype(_int_type(int(a.max(initial=0))), copy=False)


def _labels(index: pd.DataFrame, config: ProbeConfig) -> _Labels:
    col = config.label
    if col not in index.columns:
        skip = {"row", "shard", "shard_row"}
        raise ProbeError(f"label {col!r} is not a column of the cache index; columns: "
                         f"{[c for c in index.columns if c not in skip]}")
    raw = index[col]
    labelled = raw.notna().to_numpy()
    classes = _classes(raw, labelled)
    if len(classes) < 2:
        raise ProbeError(f"label {col!r} has {len(classes)} distinct value(s); a probe needs at least 2")
    if len(classes) > 1000:
        raise ProbeError(f"label {col!r} has {len(classes)} distinct values; probes here are classifiers "
                         "(bin a continuous label first)")
    codes = np.full(len(raw), -1, dtype=_int_type(len(classes)))   # int8 up to 127 classes
    for start, part in _label_chunks(raw, labelled):
        codes[start:start + len(part)] = classes.get_indexer(part)
    sample = index["sample_idx"].to_numpy()

    ids, varies = _varies(sample[labelled], codes[labelled])
    constant = not varies.any()
    level = ("image" if constant else "patch") if config.level == "auto" else config.level
    if level == "image" and not constant:
        bad = ids[varies][:3].tolist()
        raise ProbeError(f"label {col!r} varies within samples {bad}; use level='patch' for a patch-level label")

    paths = index["image_path"] if "image_path" in index.columns else None
    if paths is not None and paths.isna().any():
        paths = paths.astype(str)                  # a missing path is the path "nan"
    if paths is not None and (paths != "").all():
        if _sorted_categories(paths):          # the probe's index: its codes are the factorized ones
            gcodes, gnames = paths.cat.codes.to_numpy(), np.asarray(paths.cat.categories, dtype=object)
        else:
            gcodes, gnames = pd.factorize(paths, sort=True)  # no string object per row
            gnames = np.asarray(gnames, dtype=object)
    else:
        gcodes, gnames = pd.factorize(sample, sort=True)
    group = _small(gcodes)
    unit = sample if level == "image" else None

    return _Labels(level, _plain(classes), codes, unit, group, np.asarray(gnames),
                   _deal_folds(group, codes, labelled, len(gnames), level, config))


def _label_chunks(raw: pd.Series, labelled: np.ndarray):
    """(start, labels) of the index rows in chunks, mixed str/int labels (an object column) as strings."""
    for start in range(0, len(raw), ROW_CHUNK):
        part = raw.iloc[start:start + ROW_CHUNK]
        if raw.dtype == object:      # mixed str/int labels compare as strings
            ok = labelled[start:start + ROW_CHUNK]
            part = part.where(~ok, part.astype(str))
        yield start, part


def _classes(raw: pd.Series, labelled: np.ndarray) -> pd.Index:
    """The label's distinct values, sorted as ``pd.factorize(raw, sort=True)`` sorts them, from
    each chunk's own (no hash table over every row)."""
    seen = [pd.Series(pd.unique(part[labelled[start:start + len(part)]]), dtype=part.dtype)
            for start, part in _label_chunks(raw, labelled)]
    if not seen:
        return pd.Index([])
    return pd.Index(pd.factorize(pd.concat(seen, ignore_index=True), sort=True)[1])


def _sorted_categories(col: pd.Series) -> bool:
    """A categorical whose categories are sorted, every one used and no value missing: its codes
    are what ``pd.factorize(col, sort=True)`` returns, without a hash table over the rows."""
    if not isinstance(col.dtype, pd.CategoricalDtype):
        return False
    cats, codes = col.cat.categories, col.cat.codes.to_numpy()
    if not cats.is_monotonic_increasing or (len(codes) and codes.min() < 0):
        return False
    used = np.zeros(len(cats), dtype=bool)
    used[codes] = True
    return bool(used.all())


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


def _varies(sample: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids [m], bool [m]: that sample's rows carry more than one class code), from per-sample
    least and greatest codes: no hash table over the rows. Ids index the arrays directly (sample
    indices are a dataset's order), unless they are sparse."""
    size = int(sample.max(initial=-1)) + 1
    if size > 2 * len(sample) + 1024:
        ids, sample = np.unique(sample, return_inverse=True)
    else:
        ids = np.arange(size)
    lo = np.full(len(ids), np.iinfo(codes.dtype).max, codes.dtype)
    hi = np.full(len(ids), -1, codes.dtype)
    np.minimum.at(lo, sample, codes)
    np.maximum.at(hi, sample, codes)
    return ids, hi > lo


def _deal_folds(group, codes, labelled, n_groups, level, config) -> np.ndarray:
    """Assign each image to one of k folds, stratified by its label when the label is image-level."""
    from sklearn.model_selection import KFold, StratifiedKFold

    have, glabel = _first_labels(group, codes, labelled, n_groups)
    if len(have) < config.k:
        raise ProbeError(f"{len(have)} labelled images cannot fill k={config.k} folds; lower k or add images")
    fold = np.full(n_groups, -1, dtype=np.int8 if config.k < 128 else np.int16)
    counts = np.bincount(glabel)
    if level == "image" and counts[counts > 0].min() >= config.k:
        splitter = StratifiedKFold(config.k, shuffle=True, random_state=config.seed)
        parts = splitter.split(have, glabel)
    else:
        parts = KFold(config.k, shuffle=True, random_state=config.seed).split(have)
    for f, (_, test) in enumerate(parts):
        fold[have[test]] = f
    return fold


def _first_labels(group, codes, labelled, n_groups) -> tuple[np.ndarray, np.ndarray]:
    """(images with a labelled row, sorted; the label of each one's first labelled row), from a
    walk over the rows in chunks: nothing of the index's size is sorted or copied."""
    first = np.full(n_groups, -1, dtype=codes.dtype)
    for start in range(0, len(group), ROW_CHUNK):
        ok = labelled[start:start + ROW_CHUNK]
        g, c = group[start:start + ROW_CHUNK][ok], codes[start:start + ROW_CHUNK][ok]
        g, at = np.unique(g, return_index=True)        # each image's first row in the chunk
        new = first[g] < 0
        first[g[new]] = c[at[new]]
    have = np.flatnonzero(first >= 0)
    return have, first[have]


@dataclass
class _Set:
    """Rows of one token set: index rows (or pooled rows for ``mean``) with their labels and images."""

    name: str
    rows: np.ndarray        # [n] index rows; for mean: [n_pool] first row of each pooled image
    pool: np.ndarray | None  # mean only: [n_image_rows] pool id of every image row in pool_rows
    pool_rows: np.ndarray | None
    y: np.ndarray           # class codes (lab.y's type)
    y_control: np.ndarray
    unit: np.ndarray        # sample (image-level) or index row (patch-level: ``rows`` itself)
    group: np.ndarray


def _token_set(name: str, index: pd.DataFrame, lab: _Labels, config: ProbeConfig) -> _Set | str:
    """The rows of a token set, or a string saying why it is left out."""
    role = index["token_role"]
    ok = lab.y >= 0
    image = (role == "image").to_numpy(bool) & ok
    sink = index["is_sink"].to_numpy(bool)
    pool = pool_rows = None
    if name in ("cls", "mean") and lab.level == "patch":
        return f"{name}: a patch-level label has no {name} token"
    if name == "sinks":
        rows = _where(image & sink)
    elif name == "nonsinks":
        rows = _where(image & ~sink)
    elif name == "image":
        rows = _where(image)
    elif name == "cls":
        rows = _where((role == "cls").to_numpy(bool) & ok)
    else:  # mean (an aggregate, not a selection): one pooled row per (sample, image)
        pool_rows = _where(image)
        img = index["image"].to_numpy()[pool_rows].astype(np.int64)
        img -= img.min(initial=0)
        keys = index["sample_idx"].to_numpy()[pool_rows].astype(np.int64) * (int(img.max(initial=0)) + 1) + img
        _, first, pool = _unique(keys)     # (sample, image) pairs in order; index order: no sort
        pool = _small(pool.ravel())
        rows = pool_rows[first]
    if name in ("sinks", "nonsinks", "image") and config.max_tokens_per_image is not None and len(rows):
        rows = _cap(rows, lab.group, config.max_tokens_per_image, config.seed)
    if len(rows) == 0:
        return f"{name}: no rows in the cache"
    y, group = lab.y[rows], lab.group[rows]
    unit = rows if lab.unit is None else lab.unit[rows]
    control = _control_labels(y, unit, group, lab.level, np.random.default_rng([config.seed, _SEED_ORDER.index(name)]))
    return _Set(name, rows, pool, pool_rows, y, control, unit, group)


CAP_CHUNK = 1 << 16   # rows of the random order looked at once when a token set is capped per image


def _cap(rows: np.ndarray, group: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The sorted ``rows`` less all but k of each image's (``group[rows]``): the first k of each
    image in the order ``default_rng(seed).permutation(len(rows))`` puts the rows in. Walked in
    chunks with a count per image, so that besides that order nothing of the set's size is held;
    when no image has more than k rows every row is kept and nothing is drawn."""
    counts = np.bincount(group[rows])
    if counts.max(initial=0) <= k:
        return rows
    order = np.random.default_rng(seed).permutation(len(rows))
    seen = np.zeros(len(counts), dtype=np.int64)      # rows of each image met so far in that order
    kept = []
    for start in range(0, len(order), CAP_CHUNK):
        r = rows[order[start:start + CAP_CHUNK]]
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
    if s.pool is None:
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
    order = _small(np.argsort(s.pool, kind="stable"))          # rows of pool p: order[start[p]:start[p + 1]]
    start = np.searchsorted(s.pool[order], np.arange(len(s.rows) + 1))
    size = np.diff(start)
    step = max(1, _Rows(store.dims[site], None, memory_mb).block_rows // max(1, int(size.max())))

    def gather(pos):
        out = np.empty((len(pos), store.dims[site]), dtype=np.float32)
        for i in range(0, len(pos), step):                     # at most a block of image rows at once
            p = pos[i:i + step]
            n = size[p]
            first = np.cumsum(n) - n
            members = order[np.repeat(start[p] - first, n) + np.arange(n.sum())]
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
