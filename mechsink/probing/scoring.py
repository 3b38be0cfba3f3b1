"""Scoring probes: balanced accuracy with an image-level (cluster) bootstrap CI, token predictions
aggregated per image, cross-validated out-of-fold scores and the majority baseline."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .config import ProbeConfig
from .fit import fit_batches
from .linear import LinearProbe, _softmax
from .sets import _Set


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
    """
    gids, g = np.unique(np.asarray(group), return_inverse=True)
    y = np.asarray(y, dtype=np.int64)
    counts, hits = _balanced_counts(g.ravel(), y, np.asarray(correct, bool), len(gids), int(y.max()) + 1)
    return _balanced_ci(counts, hits, n_boot=n_boot, seed=seed, alpha=alpha)


def _balanced_ci(counts: np.ndarray, hits: np.ndarray, *, n_boot: int, seed: int, alpha: float = 0.05):
    """``balanced_accuracy_ci`` from evaluated and correct units per image and class [G, K] (every
    image with a unit). Memory stays O(images x classes): resamples are reduced in blocks of at most
    ``_BOOT_ELEMENTS`` image ids, and the jackknife is the totals less each image's own counts (the
    generic one would evaluate n resamples of n - 1 images)."""
    from ..stats import bootstrap_ci

    n = len(counts)
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
class _Outcomes:
    """Out-of-fold outcomes of a token set, as counts: per image and class the units evaluated and
    the units predicted right [G, K], units per fold and class [F, K] (the majority baseline) and
    tokens per class, all and right [K]. A unit's prediction is its token's class (argmax of its
    scores), or for a unit of several tokens the argmax of their mean probability (logistic) or
    mean score (ridge). Nothing per token is held."""

    counts: np.ndarray
    hits: np.ndarray
    by_fold: np.ndarray
    tokens: np.ndarray
    token_hits: np.ndarray
    n_units: int
    n_tokens: int


@dataclass
class _Scored:
    accuracy: tuple[float, float, float]
    token_accuracy: float
    majority: float
    n_units: int
    aggregate: str


def _score(o: _Outcomes, config: ProbeConfig) -> _Scored:
    """Balanced accuracy of the units with its image-bootstrap CI, token accuracy and the majority
    baseline (each fold predicts its training units' most frequent class)."""
    k = int(np.flatnonzero(o.counts.sum(0))[-1]) + 1        # classes up to the last one evaluated
    have = o.counts.sum(1) > 0                                # images with a unit
    acc = _balanced_ci(o.counts[have, :k], o.hits[have, :k], n_boot=config.n_boot, seed=config.seed)
    agg = "none" if o.n_units == o.n_tokens else ("mean_proba" if config.model == "logistic" else "mean_score")
    token_acc = _balanced(o.tokens[None].astype(float), o.token_hits[None].astype(float))
    total = o.by_fold.sum(0)
    right = np.zeros(len(total))
    for f in np.flatnonzero(o.by_fold.sum(1)):
        train = total - o.by_fold[f]
        maj = int(train.argmax()) if train.sum() else 0
        right[maj] += o.by_fold[f, maj]
    majority = _balanced(total[None].astype(float), right[None])
    return _Scored(acc, token_acc if agg != "none" else float("nan"), majority, o.n_units, agg)


def _cross_val(feats, s: _Set, folds: list[int], control: bool, n_classes: int, config: ProbeConfig) -> _Outcomes:
    """Each fold's finite tokens scored by a probe fit on the other folds' (``control``: on the
    control labels). feats: the set's feature source (:class:`.features._Rows`); folds: the fold
    ids with test rows. A unit's tokens are summed fold by fold, in token order within each: the
    order of the whole set, unless the unit's sample holds images that fall in different folds."""
    n_groups, n_folds = len(s.fold_of_group), int(s.fold_of_group.max(initial=0)) + 1
    counts, hits = np.zeros((n_groups, n_classes)), np.zeros((n_groups, n_classes))
    by_fold = np.zeros((n_folds, n_classes))
    tokens, token_hits = np.zeros(n_classes, dtype=np.int64), np.zeros(n_classes, dtype=np.int64)
    units = _units(s, control)       # None: every unit is one token (its own prediction)
    sums = None if units is None else np.zeros((len(units[0]), n_classes))
    fold_of = s.fold_of_group
    for f in folds:
        w, b = fit_batches(feats, lambda: s.batches(feats.block_rows, lambda c: c["ok"] & (fold_of[c["group"]] != f),
                                                    control), n_classes, config)
        p = LinearProbe(w, b, list(range(n_classes)), config.model)
        for bt in s.batches(feats.block_rows, lambda c: c["ok"] & (fold_of[c["group"]] == f), control,
                            extra=("group", s.unit) if s.unit != "rows" else ("group",)):
            scores = p.scores(feats.read(bt))
            y = bt["y"]
            tokens += np.bincount(y, minlength=n_classes)
            token_hits += np.bincount(y[scores.argmax(axis=1) == y], minlength=n_classes)
            values = _softmax(scores) if config.model == "logistic" else scores
            if units is None:
                np.add.at(counts, (bt["group"], y), 1.0)
                np.add.at(hits, (bt["group"], y), (values.argmax(axis=1) == y).astype(float))
                by_fold[f] += np.bincount(y, minlength=n_classes)
            else:
                np.add.at(sums, np.searchsorted(units[0], bt[s.unit]), values)
    if units is None:
        n_units = int(tokens.sum())
    else:
        ids, uy, ug, n_tok = units
        pred = (sums / n_tok[:, None]).argmax(axis=1)
        np.add.at(counts, (ug, uy), 1.0)
        np.add.at(hits, (ug, uy), (pred == uy).astype(float))
        np.add.at(by_fold, (fold_of[ug], uy), 1.0)
        n_units = len(ids)
    return _Outcomes(counts, hits, by_fold, tokens, token_hits, n_units, int(tokens.sum()))


def _units(s: _Set, control: bool):
    """(unit ids sorted, each unit's label, image and finite tokens) of a set whose units (samples)
    hold several finite tokens; None when every unit is one token (patch level: the token itself)."""
    if s.unit == "rows":
        return None
    ids, rest = [], []           # per chunk: its units, and each one's (label, image, finite tokens)
    for _, c in s.cols.chunks(("ok", "y", "sample", "group")):
        m = c["ok"]
        u, at, n = np.unique(c["sample"][m], return_index=True, return_counts=True)
        lab = s.labels(c, control)[m]
        ids.append(u.astype(np.int64))
        rest.append(np.column_stack([lab[at].astype(np.int64), c["group"][m][at].astype(np.int64), n]))
    if not ids:
        return None
    ids, rest = np.concatenate(ids), np.concatenate(rest)
    units, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    if len(units) == int(rest[:, 2].sum()):
        return None
    n_tok = np.bincount(inv.ravel(), weights=rest[:, 2], minlength=len(units))
    return units, rest[first, 0], rest[first, 1], n_tok
