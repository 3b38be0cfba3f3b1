"""What a probe predicts, read off the cache index in blocks: the label's classes and level, the
images (groups) rows belong to and each image's fold. Nothing of the index's size is held: each
scan holds one block, and what it keeps is per class, per sample or per image."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..memory import trim
from .config import ProbeConfig, ProbeError
from .linear import _plain

INDEX_BLOCK = 1 << 14   # index rows read at once by each scan
_CATEGORICAL = ("image_path", "token_role")   # strings read as codes: paths repeat per token, roles are few


def _int_type(top: int):
    """The smallest signed integer type that holds 0..top (and -top - 1..0)."""
    return next(dt for dt in (np.int8, np.int16, np.int32, np.int64) if top <= np.iinfo(dt).max)


class _Index:
    """A cache index (a Store's, or a DataFrame) read in blocks, as many times as the probe asks."""

    def __init__(self, source, block: int = INDEX_BLOCK) -> None:
        self.source, self.block = source, int(block)
        self.columns = list(source.columns if isinstance(source, pd.DataFrame) else source.index_columns)
        self.n = len(source)

    def blocks(self, columns, *, text: str | None = None):
        """(first row, frame) of each block with those of ``columns`` the index has; path and role
        strings as categoricals (``text``: a column read as plain values, the label)."""
        cols = list(dict.fromkeys(c for c in columns if c in self.columns))
        if isinstance(self.source, pd.DataFrame):
            parts = (self.source.iloc[i:i + self.block][cols] for i in range(0, self.n, self.block))
        else:
            parts = self.source.iter_index(batch_rows=self.block, columns=cols,
                                           categorical=[c for c in cols if c in _CATEGORICAL and c != text])
        at = 0
        for part in parts:
            yield at, part
            at += len(part)
        trim()    # the blocks' freed pages (Arrow's pool, the heap): a scan leaves nothing behind
        if at != self.n:
            raise ProbeError(f"the cache index holds {at} rows, its summary says {self.n}")


@dataclass
class _Labels:
    """The label's classes and level, and how index rows map to class codes and images. Images
    (groups) are the rows' image files, sorted by path, or their samples when a row has no path."""

    level: str
    classes: list
    group_names: np.ndarray      # [n_groups] path (or sample id) of each image
    fold_of_group: np.ndarray    # [n_groups] int8/int16; -1: no labelled row
    label: str
    class_index: pd.Index
    as_text: bool                 # labels compared as strings (a column of mixed values)
    by_path: bool                 # groups are image files (group_names, sorted); else samples
    samples: np.ndarray | None    # sorted sample ids (the groups when not by path)

    def codes(self, part: pd.Series) -> np.ndarray:
        """Class codes of a block's labels, -1 where unlabelled, in the smallest type."""
        if self.as_text:
            part = part.where(part.isna(), part.astype(str))
        return self.class_index.get_indexer(part).astype(_int_type(len(self.classes)))

    def groups(self, block: pd.DataFrame) -> np.ndarray:
        """Image (group) code of each row of a block (int64)."""
        if not self.by_path:
            return np.searchsorted(self.samples, block["sample_idx"].to_numpy())
        names, codes = _path_codes(block["image_path"])
        names = np.array(names + ["nan"], dtype=object)            # code -1: missing, the path "nan"
        at = np.minimum(np.searchsorted(self.group_names, names), len(self.group_names) - 1)
        lut = np.where(self.group_names[at] == names, at, -1)      # a category no row of the block uses: -1
        return lut[codes]


def _path_codes(col: pd.Series) -> tuple[list[str], np.ndarray]:
    """(distinct paths as strings, code of each row into them; -1 missing) of a block's paths."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [str(c) for c in col.cat.categories], col.cat.codes.to_numpy()
    codes, uniques = pd.factorize(col)
    return [str(u) for u in uniques], codes


def _labels(index: _Index, config: ProbeConfig) -> _Labels:
    """Scan the index twice: the label's classes, then its level, the images and their folds."""
    col = config.label
    if col not in index.columns:
        skip = {"row", "shard", "shard_row"}
        raise ProbeError(f"label {col!r} is not a column of the cache index; columns: "
                         f"{[c for c in index.columns if c not in skip]}")
    classes, as_text = _classes(index, col)
    if len(classes) < 2:
        raise ProbeError(f"label {col!r} has {len(classes)} distinct value(s); a probe needs at least 2")
    if len(classes) > 1000:
        raise ProbeError(f"label {col!r} has {len(classes)} distinct values; probes here are classifiers "
                         "(bin a continuous label first)")
    lab = _Labels(level="", classes=_plain(classes), group_names=np.array([]), fold_of_group=np.array([]),
                  label=col, class_index=classes, as_text=as_text, by_path=False, samples=None)   # codes() first

    # per sample: least and greatest code, first code; per path and per sample: the first label
    spans, firsts, samples, path_id, path_first = [], [], [], {}, []
    by_path = "image_path" in index.columns
    for _, b in index.blocks([col, "sample_idx", "image_path"], text=col):
        codes = lab.codes(b[col])
        sample = b["sample_idx"].to_numpy()
        samples.append(np.unique(sample))
        ok = codes >= 0
        s, c = sample[ok], codes[ok]
        if len(s):
            ids, at, inv = np.unique(s, return_index=True, return_inverse=True)
            lo = np.full(len(ids), np.iinfo(c.dtype).max, c.dtype)
            hi = np.full(len(ids), -1, c.dtype)
            np.minimum.at(lo, inv, c)
            np.maximum.at(hi, inv, c)
            spans.append((ids, lo, hi))
            firsts.append((ids, c[at]))
        if by_path:
            col_paths = b["image_path"]
            if (col_paths == "").any():
                by_path = False                # a row without an image file: images are samples
                continue
            names, pcodes = _path_codes(col_paths)
            if (pcodes < 0).any():
                names = names + ["nan"]       # a missing path is the path "nan"
                pcodes = np.where(pcodes < 0, len(names) - 1, pcodes)
            used = np.zeros(len(names), dtype=bool)
            used[pcodes] = True               # a block's categories can hold paths it does not use
            lut = np.full(len(names), -1, dtype=np.int64)
            for i in np.flatnonzero(used):
                lut[i] = path_id.setdefault(names[i], len(path_id))
            path_first.extend([-1] * (len(path_id) - len(path_first)))
            g, gc = lut[pcodes[ok]], c
            g, at = np.unique(g, return_index=True)   # each path's first labelled row in the block
            for gi, ci in zip(g.tolist(), gc[at].tolist()):
                if path_first[gi] < 0:
                    path_first[gi] = ci

    ids, varies = _varies(spans)
    constant = not varies.any()
    level = ("image" if constant else "patch") if config.level == "auto" else config.level
    if level == "image" and not constant:
        bad = ids[varies][:3].tolist()
        raise ProbeError(f"label {col!r} varies within samples {bad}; use level='patch' for a patch-level label")

    if by_path:
        names = sorted(path_id)         # as the strings sort (no fixed-width copy of every path)
        first = np.asarray(path_first, dtype=np.int64)[[path_id[n] for n in names]]
        del path_id, path_first
        lab.by_path = True
        group_names = np.array(names, dtype=object)
    else:
        lab.samples = np.unique(np.concatenate(samples)) if samples else np.array([], dtype=np.int64)
        group_names = lab.samples
        first = np.full(len(group_names), -1, dtype=np.int64)
        if firsts:
            s = np.concatenate([f[0] for f in firsts])
            c = np.concatenate([f[1] for f in firsts])
            s, at = np.unique(s, return_index=True)   # blocks in row order: the first block's label
            first[np.searchsorted(group_names, s)] = c[at]
    have = np.flatnonzero(first >= 0)
    lab.level, lab.group_names = level, np.asarray(group_names)
    lab.fold_of_group = _deal_folds(have, first[have], len(group_names), level, config)
    return lab


def _classes(index: _Index, col: str) -> tuple[pd.Index, bool]:
    """The label's distinct values sorted as ``pd.factorize(column, sort=True)`` sorts them, from
    each block's own (no hash table over every row), and whether they compare as strings (an
    object column: mixed str/int labels, or booleans with missing values)."""
    seen, as_text = [], False
    for _, b in index.blocks([col], text=col):
        part = b[col]
        as_text |= part.dtype == object
        seen.append(pd.Series(pd.unique(part[part.notna()]), dtype=part.dtype))
    if not seen:
        return pd.Index([]), as_text
    values = pd.concat(seen, ignore_index=True)
    if as_text:
        values = values.astype(str)
    return pd.Index(pd.factorize(values, sort=True)[1]), as_text


def _varies(spans: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, bool: that sample's labelled rows carry more than one class code), from each
    block's per-sample least and greatest codes."""
    if not spans:
        return np.array([], dtype=np.int64), np.array([], dtype=bool)
    ids = np.concatenate([s[0] for s in spans])
    lo = np.concatenate([s[1] for s in spans])
    hi = np.concatenate([s[2] for s in spans])
    u, inv = np.unique(ids, return_inverse=True)
    lo_u = np.full(len(u), np.iinfo(lo.dtype).max, lo.dtype)
    hi_u = np.full(len(u), -1, hi.dtype)
    np.minimum.at(lo_u, inv, lo)
    np.maximum.at(hi_u, inv, hi)
    return u, hi_u > lo_u


def _deal_folds(have: np.ndarray, glabel: np.ndarray, n_groups: int, level: str, config: ProbeConfig) -> np.ndarray:
    """Assign each labelled image (``have``, with the label of its first labelled row) to one of k
    folds, stratified by its label when the label is image-level."""
    from sklearn.model_selection import KFold, StratifiedKFold

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
