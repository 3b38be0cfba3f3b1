"""Token sets: the rows a probe trains on, read off the cache index in one scan (selections, and
the ``mean`` aggregate's pools), their control-task labels, and passes over them in blocks.

A set's per-row arrays (index row, class code, sample, image) are :class:`.columns._Columns`:
held while they fit the probe's memory budget, else in a scratch folder. What the probe keeps
besides is per image, per unit or per class, so that memory does not grow with the tokens."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .columns import _Columns
from .config import _SEED_ORDER, ProbeConfig, ProbeError
from .labels import _Index, _int_type, _Labels


@dataclass
class _Set:
    """One token set: ``cols`` holds per row its index row (``rows``; for ``mean``, the pool's first
    image row), class code ``y``, ``sample`` and image ``group``, and after ``features`` whether the
    row is finite at the site read (``ok``). ``mean`` also keeps its pools: ``members`` (the image
    rows, pool by pool, index order within one) and ``pool_start`` [n + 1]."""

    name: str
    level: str
    cols: _Columns
    fold_of_group: np.ndarray
    control: "_Control | None" = None
    members: _Columns | None = None
    pool_start: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.cols.lengths["rows"]

    @property
    def unit(self) -> str:
        """The column naming each row's unit: its sample (image-level labels) or the row itself."""
        return "sample" if self.level == "image" else "rows"

    def labels(self, chunk: dict, control: bool) -> np.ndarray:
        return self.control(chunk) if control else chunk["y"]

    def batches(self, block_rows: int, keep=None, control: bool = False, extra=()):
        """Blocks of ``block_rows`` rows (the last one shorter) of the rows where ``keep(chunk)`` is
        true, in set order: {"pos": set positions, "rows": index rows, "y": class codes (control
        ones if asked), and ``extra`` columns}. Blocks depend only on the rows kept and
        ``block_rows``, never on how the columns are read (held or spilled, chunk size)."""
        names = sorted({"rows", "y", "sample", "group", *extra} | ({"ok"} if keep is not None else set()))
        left: dict | None = None              # rows kept but not yet yielded
        for start, c in self.cols.chunks(names):
            m = slice(None) if keep is None else keep(c)
            piece = {"pos": np.arange(start, start + len(c["rows"]))[m] if keep is None else np.flatnonzero(m) + start,
                     "rows": c["rows"][m], "y": self.labels(c, control)[m], **{e: c[e][m] for e in extra}}
            if left is not None:
                piece = {k: np.concatenate([left[k], v]) for k, v in piece.items()}
            at, n = 0, len(piece["pos"])
            while n - at >= block_rows:
                yield {k: v[at:at + block_rows] for k, v in piece.items()}
                at += block_rows
            left = {k: v[at:] for k, v in piece.items()} if at < n else None
        if left is not None:
            yield left


_SET_COLUMNS = ("sample_idx", "image_path", "token_role", "is_sink", "image")   # what a token set reads


def _token_set(name: str, index: _Index, lab: _Labels, config: ProbeConfig,
               memory_mb: float = float("inf")) -> _Set | str:
    """The rows of a token set, read off the index in one scan of its blocks (held up to
    ``memory_mb``, else spilled), or a string saying why it is left out."""
    if name in ("cls", "mean") and lab.level == "patch":
        return f"{name}: a patch-level label has no {name} token"
    need = ("sample_idx", "token_role") + (("is_sink",) if name in ("sinks", "nonsinks") else ()) \
        + (("image",) if name == "mean" else ())
    missing = [c for c in need if c not in index.columns]
    if missing:
        raise ProbeError(f"the cache index has no column {missing[0]!r}, which the token set {name!r} needs")
    budget = memory_mb * 2**20
    schema = {"rows": np.int32 if index.n < 2**31 else np.int64, "y": _int_type(len(lab.classes)),
              "sample": np.int64, "group": _int_type(len(lab.group_names))}
    cols = _Columns({**schema, **({"image": np.int64} if name == "mean" else {})}, budget)
    for at, b in index.blocks([lab.label, *_SET_COLUMNS], text=lab.label):
        y = lab.codes(b[lab.label])
        keep = (b["token_role"] == ("cls" if name == "cls" else "image")).to_numpy(bool) & (y >= 0)
        if name in ("sinks", "nonsinks"):
            sink = b["is_sink"].to_numpy(bool)
            keep &= sink if name == "sinks" else ~sink
        p = np.flatnonzero(keep)
        sample = b["sample_idx"].to_numpy()[p]
        piece = dict(rows=(p + at).astype(schema["rows"]), y=y[p], group=lab.groups(b.iloc[p]).astype(schema["group"]),
                     sample=sample.astype(_int_type(int(np.abs(sample).max(initial=0)))))   # held: 2 bytes, not 8
        if name == "mean":
            piece["image"] = b["image"].to_numpy()[p]
        cols.append(**piece)
    cols.close()
    s = _Set(name, lab.level, cols, lab.fold_of_group)
    if name == "mean":   # an aggregate, not a selection: one pooled row per (sample, image)
        s.cols, s.members, s.pool_start = _pools(cols, schema, budget)
    if name in ("sinks", "nonsinks", "image") and config.max_tokens_per_image is not None and s.n:
        s.cols = _cap(cols, config.max_tokens_per_image, config.seed, schema, budget) or cols
    if s.n == 0:
        return f"{name}: no rows in the cache"
    s.control = _Control(s, np.random.default_rng([config.seed, _SEED_ORDER.index(name)]))
    return s


def _pools(cols: _Columns, schema: dict, budget: float):
    """The ``mean`` set from its image rows: (the set's columns, one row per (sample, image) in
    that order, at the pool's first image row; the image rows pool by pool; pool starts [n + 1]).
    An index written sample by sample holds each pool as one run of rows in order, found chunk by
    chunk (nothing sorted); any other order is sorted in memory."""
    out, starts = _Columns(schema, budget), []
    last = None                            # (sample, image) of the previous chunk's last row
    for start, c in cols.chunks(("rows", "y", "sample", "group", "image")):
        s, i = c["sample"].astype(np.int64), c["image"].astype(np.int64)
        ps, pi = (np.r_[last[0], s[:-1]], np.r_[last[1], i[:-1]]) if last else (s[:-1], i[:-1])
        cs, ci = (s, i) if last else (s[1:], i[1:])
        if not ((cs > ps) | ((cs == ps) & (ci >= pi))).all():
            return _pools_sorted(cols, schema, budget)
        new = (cs != ps) | (ci != pi)
        if not last:
            new = np.r_[True, new]
        q = np.flatnonzero(new)
        starts.append(q + start)
        out.append(**{k: c[k][q] for k in schema})
        last = (s[-1], i[-1])
    pool_start = np.append(np.concatenate(starts) if starts else np.zeros(0, np.int64), cols.n).astype(np.int64)
    members = _Columns({"rows": schema["rows"]}, budget)
    for _, c in cols.chunks(("rows",)):
        members.append(rows=c["rows"])
    return out.close(), members.close(), pool_start


def _pools_sorted(cols: _Columns, schema: dict, budget: float):
    """``_pools`` of image rows in any order: pools sorted by (sample, image), rows within one in index order."""
    s, i = cols.read("sample").astype(np.int64), cols.read("image").astype(np.int64)
    i -= i.min(initial=0)
    keys = s * (int(i.max(initial=0)) + 1) + i
    del s, i
    _, first, pool = np.unique(keys, return_index=True, return_inverse=True)
    del keys
    pool = pool.ravel()
    order = np.argsort(pool, kind="stable")                # within a pool: index order
    pool_start = np.append(0, np.cumsum(np.bincount(pool, minlength=len(first)))).astype(np.int64)
    out = _Columns(schema, budget)
    out.append(**{k: cols.read(k)[first] for k in schema})
    members = _Columns({"rows": schema["rows"]}, budget)
    members.append(rows=cols.read("rows")[order])
    return out.close(), members.close(), pool_start


def _tally(total: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``total`` plus np.bincount of ``values`` (as long as the longer of the two)."""
    b = np.bincount(values)
    total = np.pad(total, (0, max(0, len(b) - len(total))))
    total[:len(b)] += b
    return total


def _bincount(cols: _Columns, name: str) -> np.ndarray:
    """np.bincount of a column, summed chunk by chunk (its length: the largest value + 1)."""
    total = np.zeros(0, dtype=np.int64)
    for _, c in cols.chunks((name,)):
        total = _tally(total, c[name])
    return total


def _cap(cols: _Columns, k: int, seed: int, schema: dict, budget: float) -> _Columns | None:
    """The rows of a token set less all but k of each image's: image g keeps the rows whose rank
    among its own (in index order) is in ``default_rng([seed, g]).choice(c_g, k, replace=False)``,
    a uniform draw of k of its c_g rows. Two passes in chunks, holding a count per image; None when
    no image has more than k rows (every row kept, nothing drawn)."""
    counts = _bincount(cols, "group")
    if counts.max(initial=0) <= k:
        return None
    seen = np.zeros(len(counts), dtype=np.int64)         # rows of each image met so far
    out = _Columns(schema, budget)
    for _, c in cols.chunks(tuple(schema)):
        g = c["group"].astype(np.int64)
        by = np.argsort(g, kind="stable")                 # the chunk's rows image by image, in index order
        sg = g[by]
        head = np.r_[True, sg[1:] != sg[:-1]]
        first = np.flatnonzero(head)
        rank = np.empty(len(g), dtype=np.int64)
        rank[by] = np.arange(len(sg)) - first[np.cumsum(head) - 1] + seen[sg]
        keep = np.ones(len(g), dtype=bool)
        ends = np.append(first[1:], len(sg))
        for j in np.flatnonzero(counts[sg[first]] > k):   # images over the cap: their draw
            img, idx = int(sg[first[j]]), by[first[j]:ends[j]]
            drawn = np.zeros(counts[img], dtype=bool)
            drawn[np.random.default_rng([seed, img]).choice(counts[img], k, replace=False)] = True
            keep[idx] = drawn[rank[idx]]
        seen += np.bincount(g, minlength=len(seen))
        out.append(**{name: c[name][keep] for name in schema})
    return out.close()


class _Control:
    """Control-task labels of a token set, as a table looked up per chunk of rows: the control
    keeps the set's label distribution and breaks every link between an image's content and its
    label. Image-level: the units' (samples') labels shuffled across units. Patch-level: each
    (image, label) pair mapped to a label drawn from the set's label distribution."""

    def __init__(self, s: _Set, rng) -> None:
        self.image_level = s.level == "image"
        ks, vs, counts = [], [], np.zeros(0, dtype=np.int64)
        for _, c in s.cols.chunks(("y", "sample", "group")):
            if self.image_level:
                u, at = np.unique(c["sample"], return_index=True)     # each unit's first row in the chunk
                ks.append(u.astype(np.int64))
                vs.append(c["y"][at])
            else:
                ks.append(np.unique(self._pair(c)))
                counts = _tally(counts, c["y"])          # the label frequencies, in the same pass
        keys = np.concatenate(ks)
        if self.image_level:      # units in order, each with its first row's label, shuffled
            self.keys, at = np.unique(keys, return_index=True)
            self.values = rng.permutation(np.concatenate(vs)[at])
        else:                     # pairs in (image, label) order, each a draw from the label frequencies
            self.keys = np.unique(keys)
            freq = counts / counts.sum()
            self.values = rng.choice(len(freq), size=len(self.keys), p=freq).astype(s.cols.schema["y"])

    @staticmethod
    def _pair(c: dict) -> np.ndarray:
        return c["group"].astype(np.int64) * 65536 + c["y"].astype(np.int64)    # classes < 1001

    def __call__(self, c: dict) -> np.ndarray:
        key = c["sample"] if self.image_level else self._pair(c)
        return self.values[np.searchsorted(self.keys, key)]
