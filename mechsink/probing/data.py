"""From a cache index to the rows a probe trains on: labels and their level, image folds, token
sets (selections and the ``mean`` aggregate), control-task labels and the features themselves."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .config import _SEED_ORDER, ProbeConfig, ProbeError
from .linear import _plain


@dataclass
class _Labels:
    """Per index row: class code (-1 unlabelled), unit id and group (image) id."""

    level: str
    classes: list
    y: np.ndarray          # [n_rows] int, -1 where unlabelled
    unit: np.ndarray       # [n_rows] int: sample (image-level) or row (patch-level)
    group: np.ndarray      # [n_rows] int: image the row belongs to (split and bootstrap unit)
    group_names: np.ndarray
    fold_of_group: np.ndarray  # [n_groups]


def _labels(index: pd.DataFrame, config: ProbeConfig) -> _Labels:
    col = config.label
    if col not in index.columns:
        skip = {"row", "shard", "shard_row"}
        raise ProbeError(f"label {col!r} is not a column of the cache index; columns: "
                         f"{[c for c in index.columns if c not in skip]}")
    raw = index[col]
    labelled = raw.notna().to_numpy()
    if raw.dtype == object:  # mixed str/int labels compare as strings
        raw = raw.where(~labelled, raw.astype(str))
    codes, classes = pd.factorize(raw, sort=True)
    if len(classes) < 2:
        raise ProbeError(f"label {col!r} has {len(classes)} distinct value(s); a probe needs at least 2")
    if len(classes) > 1000:
        raise ProbeError(f"label {col!r} has {len(classes)} distinct values; probes here are classifiers "
                         "(bin a continuous label first)")
    codes = np.where(labelled, codes, -1).astype(np.int64)
    sample = index["sample_idx"].to_numpy(np.int64)

    per_sample = pd.Series(codes[labelled]).groupby(sample[labelled]).nunique()
    constant = bool((per_sample <= 1).all())
    level = ("image" if constant else "patch") if config.level == "auto" else config.level
    if level == "image" and not constant:
        bad = per_sample.index[per_sample > 1][:3].tolist()
        raise ProbeError(f"label {col!r} varies within samples {bad}; use level='patch' for a patch-level label")

    paths = index["image_path"].astype(str).to_numpy() if "image_path" in index.columns else None
    if paths is not None and (paths != "").all():
        gcodes, gnames = pd.factorize(paths, sort=True)
    else:
        gcodes, gnames = pd.factorize(sample, sort=True)
    group = gcodes.astype(np.int64)
    unit = sample if level == "image" else np.arange(len(index), dtype=np.int64)

    return _Labels(level, _plain(classes), codes, unit, group, np.asarray(gnames),
                   _deal_folds(group, codes, labelled, len(gnames), level, config))


def _deal_folds(group, codes, labelled, n_groups, level, config) -> np.ndarray:
    """Assign each image to one of k folds, stratified by its label when the label is image-level."""
    from sklearn.model_selection import KFold, StratifiedKFold

    have = np.unique(group[labelled])
    if len(have) < config.k:
        raise ProbeError(f"{len(have)} labelled images cannot fill k={config.k} folds; lower k or add images")
    fold = np.full(n_groups, -1, dtype=np.int64)
    glabel = pd.Series(codes[labelled]).groupby(group[labelled]).first().reindex(have)
    counts = glabel.value_counts()
    if level == "image" and counts.min() >= config.k:
        splitter = StratifiedKFold(config.k, shuffle=True, random_state=config.seed)
        parts = splitter.split(have, glabel.to_numpy())
    else:
        parts = KFold(config.k, shuffle=True, random_state=config.seed).split(have)
    for f, (_, test) in enumerate(parts):
        fold[have[test]] = f
    return fold


@dataclass
class _Set:
    """Rows of one token set: index rows (or pooled rows for ``mean``) with their labels and images."""

    name: str
    rows: np.ndarray        # [n] index rows; for mean: [n_pool] first row of each pooled image
    pool: np.ndarray | None  # mean only: [n_image_rows] pool id of every image row in pool_rows
    pool_rows: np.ndarray | None
    y: np.ndarray
    y_control: np.ndarray
    unit: np.ndarray
    group: np.ndarray


def _token_set(name: str, index: pd.DataFrame, lab: _Labels, config: ProbeConfig) -> _Set | str:
    """The rows of a token set, or a string saying why it is left out."""
    role = index["token_role"].astype(str).to_numpy()
    ok = lab.y >= 0
    image = (role == "image") & ok
    sink = index["is_sink"].to_numpy(bool)
    pool = pool_rows = None
    if name in ("cls", "mean") and lab.level == "patch":
        return f"{name}: a patch-level label has no {name} token"
    if name == "sinks":
        rows = np.flatnonzero(image & sink)
    elif name == "nonsinks":
        rows = np.flatnonzero(image & ~sink)
    elif name == "image":
        rows = np.flatnonzero(image)
    elif name == "cls":
        rows = np.flatnonzero((role == "cls") & ok)
    else:  # mean (an aggregate, not a selection): one pooled row per (sample, image)
        pool_rows = np.flatnonzero(image)
        keys = index[["sample_idx", "image"]].to_numpy()[pool_rows]
        _, first, pool = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        pool = pool.ravel()
        rows = pool_rows[first]
    if name in ("sinks", "nonsinks", "image") and config.max_tokens_per_image is not None and len(rows):
        rng = np.random.default_rng(config.seed)
        order = rows[rng.permutation(len(rows))]
        keep = pd.Series(lab.group[order]).groupby(lab.group[order]).cumcount().to_numpy() < config.max_tokens_per_image
        rows = np.sort(order[keep])
    if len(rows) == 0:
        return f"{name}: no rows in the cache"
    y, unit, group = lab.y[rows], lab.unit[rows], lab.group[rows]
    control = _control_labels(y, unit, group, lab.level, np.random.default_rng([config.seed, _SEED_ORDER.index(name)]))
    return _Set(name, rows, pool, pool_rows, y, control, unit, group)


def _control_labels(y: np.ndarray, unit: np.ndarray, group: np.ndarray, level: str, rng) -> np.ndarray:
    """Control task labels [n] for a token set with labels y [n]; the control keeps the set's label
    distribution and breaks every link between an image's content and its label."""
    if level == "image":  # the units' labels shuffled across units
        units, first, inv = np.unique(unit, return_index=True, return_inverse=True)
        return rng.permutation(y[first])[inv.ravel()]
    # each (image, label) pair mapped to a random label drawn from the set's label distribution
    pairs, inv = np.unique(np.stack([group, y], axis=1), axis=0, return_inverse=True)
    freq = np.bincount(y, minlength=int(y.max()) + 1) / len(y)
    return rng.choice(len(freq), size=len(pairs), p=freq)[inv.ravel()]


def _features(store, s: _Set, site: str) -> np.ndarray:
    """[n, d] float32 activations of the set at a site (mean: pooled per image); NaN rows stay NaN."""
    if s.pool is None:
        return np.asarray(store.get(site, s.rows), dtype=np.float32)
    sums = torch.zeros(len(s.rows), store.dims[site], dtype=torch.float64)
    start = 0
    for block in store.iter_batches(site, batch_rows=65536, rows=s.pool_rows):
        ids = torch.from_numpy(s.pool[start:start + len(block)])
        sums.index_add_(0, ids, torch.from_numpy(np.asarray(block, dtype=np.float64)))
        start += len(block)
    counts = np.bincount(s.pool, minlength=len(s.rows))[:, None]
    return (sums.numpy() / counts).astype(np.float32)


def _subset(s: _Set, keep: np.ndarray) -> _Set:
    if keep.all():
        return s
    return dataclasses.replace(s, rows=s.rows[keep], y=s.y[keep], y_control=s.y_control[keep], unit=s.unit[keep],
                               group=s.group[keep])
