"""Scoring probes: balanced accuracy with an image-level (cluster) bootstrap CI, token predictions
aggregated per image, cross-validated out-of-fold scores and the majority baseline."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .config import ProbeConfig
from .data import _int_type, _Set, _unique
from .fit import fit_rows
from .linear import LinearProbe, _softmax


def _balanced_counts(group: np.ndarray, y: np.ndarray, correct: np.ndarray, n_groups: int, k: int):
    """Per image and class: evaluated units [G, K] and correct ones [G, K]."""
    counts = np.zeros((n_groups, k))
    hits = np.zeros((n_groups, k))
    np.add.at(counts, (group, y), 1.0)
    np.add.at(hits, (group, y), correct.astype(float))
    return counts, hits


def _balanced(counts: np.ndarray, hits: np.ndarray) -> float:
    c, h = counts.sum(0), hits.sum(0)
    return float(np.mean(h[c > 0] / c[c > 0]))


_BOOT_ELEMENTS = 32_768      # resampled image ids held at once (bounds the bootstrap's memory; ~1 MB)


def balanced_accuracy_ci(group, y, correct, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Balanced accuracy of per-unit outcomes with a bootstrap CI that resamples images.

    group, y, correct: [n] image id, true class code and whether the prediction was right, per
    evaluated unit (image or token). Images are resampled whole (a cluster bootstrap), so tokens
    of one image never count as independent evidence. Returns (estimate, low, high), the BCa
    interval of ``mechsink.stats.bootstrap_ci``.

    Memory stays O(images x classes): resamples are reduced in blocks of at most ``_BOOT_ELEMENTS``
    image ids, and the jackknife is the totals less each image's own counts (the generic one would
    evaluate n resamples of n - 1 images).
    """
    from ..stats import bootstrap_ci

    gids, g = np.unique(np.asarray(group), return_inverse=True)
    y = np.asarray(y, dtype=np.int64)
    counts, hits = _balanced_counts(g.ravel(), y, np.asarray(correct, bool), len(gids), int(y.max()) + 1)
    n = len(gids)
    if n < 2:
        return _balanced(counts, hits), float("nan"), float("nan")

    def per_class(c, h):                     # [b, K] evaluated / correct units -> [b] balanced accuracy
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(c > 0, h / c, np.nan), axis=1)

    def stat(idx, axis=-1):                  # [b, m] resampled image indices -> [b]
        idx = np.asarray(idx, dtype=np.int64)
        b = idx.shape[0]
        w = np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n).reshape(b, n).astype(float)
        return per_class(w @ counts, w @ hits)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample can miss a class entirely
        return bootstrap_ci(np.arange(n, dtype=float), stat=stat, n_boot=n_boot, seed=seed, alpha=alpha,
                            jackknife=per_class(counts.sum(0) - counts, hits.sum(0) - hits),
                            max_elements=_BOOT_ELEMENTS)


@dataclass
class _OutOfFold:
    """Out-of-fold predictions of a token set: each token's class (argmax of its scores) and each
    unit's (argmax of its tokens' mean probability, logistic, or mean score, ridge). Per unit only
    [u, K] sums are held while the folds run, never the [n, K] scores of every token."""

    token_pred: np.ndarray   # [n]
    units: np.ndarray        # [u] unit ids, sorted
    first: np.ndarray        # [u] first token of each unit
    unit_pred: np.ndarray    # [u]


@dataclass
class _Scored:
    accuracy: tuple[float, float, float]
    token_accuracy: float
    majority: float
    n_units: int
    aggregate: str


def _score(s: _Set, y: np.ndarray, oof: _OutOfFold, fold: np.ndarray, n_classes: int, config: ProbeConfig) -> _Scored:
    """Score out-of-fold predictions against codes y [n] at the unit level."""
    right = y[oof.token_pred == y]
    token_acc = _balanced(np.bincount(y, minlength=n_classes)[None].astype(float),
                          np.bincount(right, minlength=n_classes)[None].astype(float))
    del right
    units, first, pred = oof.units, oof.first, oof.unit_pred
    uy, ug, uf = y[first], s.group[first], fold[first]
    agg = "none" if len(units) == len(y) else ("mean_proba" if config.model == "logistic" else "mean_score")
    acc = balanced_accuracy_ci(ug, uy, pred == uy, n_boot=config.n_boot, seed=config.seed)
    # majority baseline: each fold predicts its training units' most frequent class
    maj = np.empty(len(uy), dtype=np.int64)
    for f in np.unique(uf):
        train = uy[uf != f]
        maj[uf == f] = np.bincount(train, minlength=n_classes).argmax() if len(train) else 0
    majority = _balanced(*_balanced_counts(np.zeros(len(uy), np.int64), uy, maj == uy, 1, n_classes))
    return _Scored(acc, token_acc if agg != "none" else float("nan"), majority, len(units), agg)


def _cross_val(rows, pos, y, unit, folds, n_classes, config) -> _OutOfFold:
    """Each fold's tokens scored by a probe fit on the other folds. rows: a feature source
    (:class:`.data._Rows`); pos [n]: its rows (None: row i is token i); unit [n]: the unit of each
    token; folds: (train, test) into pos. A unit's tokens are summed fold by fold, in token order
    within each: the order of the whole set, unless the unit's sample holds images that fall in
    different folds."""
    units, first, inv = _unique(unit)
    one = len(units) == len(unit)            # one token per unit: its own prediction
    token_pred = np.zeros(len(y), dtype=_int_type(n_classes))
    unit_pred = np.zeros(len(units), dtype=token_pred.dtype)
    sums = None if one else np.zeros((len(units), n_classes))
    for train, test in folds:
        w, b = fit_rows(rows, train if pos is None else pos[train], y[train], n_classes, config)
        p = LinearProbe(w, b, list(range(n_classes)), config.model)
        for start, x in rows.blocks(test if pos is None else pos[test]):
            idx = test[start:start + len(x)]
            scores = p.scores(x)
            token_pred[idx] = scores.argmax(axis=1)
            values = _softmax(scores) if config.model == "logistic" else scores
            if one:
                unit_pred[inv[idx]] = values.argmax(axis=1)
            else:
                np.add.at(sums, inv[idx], values)
    if not one:
        unit_pred[:] = (sums / np.bincount(inv)[:, None]).argmax(axis=1)
    return _OutOfFold(token_pred, units, first, unit_pred)
