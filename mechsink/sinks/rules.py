"""Sink rules: which scores in one group of tokens (one image or tile) count as sinks.

Every rule is a pure function ``scores [n] -> bool [n]`` with keyword parameters; ``RULES`` lists
them with their defaults. Rules marked ``per_group`` look at the group's own distribution
(relative rules); the others compare each score with a fixed threshold.

- ``fixed``     score >= tau (LLaVA-1.5: tau = 100 on the projector input).
- ``sigma``     score > mean + k * std of the group (Neo et al.: k = 2).
- ``robust_z``  (score - median) / (1.4826 * MAD) >= z.
- ``ratio``     score >= ratio * median.
- ``topk``      the k highest scores.
- ``gap``       "norm drop": cut the sorted scores at their largest relative drop, if that drop is at
                least ``min_rel_gap`` and the cut keeps at most ``max_fraction`` of the tokens.
- ``quantile``  score >= tau, where tau is a dataset quantile fixed by calibration.
- ``relative``  (the default) score >= max(ratio * median, median + z * 1.4826 * MAD).

``QuantileSketch`` is the mergeable, fixed-memory histogram behind calibration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import MechsinkError

MAD_SCALE = 1.4826  # MAD of a normal distribution times this is its standard deviation


class SinkError(MechsinkError, ValueError):
    """Bad sink-detection input: unknown rule or parameter, missing calibration, mismatched shapes."""


def _robust_scale(s: np.ndarray, med):
    # Floor at 0.1 % of the median: a group whose majority is constant would otherwise make every
    # deviation infinitely significant. s: [n] or [groups, n] (med: [groups, 1]).
    mad = np.median(np.abs(s - med), axis=-1, keepdims=s.ndim > 1)
    return np.maximum(np.maximum(MAD_SCALE * mad, 1e-3 * np.abs(med)), 1e-12)


def fixed(s: np.ndarray, *, tau: float) -> np.ndarray:
    return s >= tau


def sigma(s: np.ndarray, *, k: float = 2.0) -> np.ndarray:
    return s > s.mean() + k * s.std()


def robust_z(s: np.ndarray, *, z: float = 3.5) -> np.ndarray:
    med = float(np.median(s))
    return (s - med) / _robust_scale(s, med) >= z


def ratio(s: np.ndarray, *, ratio: float = 5.0) -> np.ndarray:
    return s >= ratio * float(np.median(s))


def topk(s: np.ndarray, *, k: int = 1) -> np.ndarray:
    out = np.zeros(len(s), dtype=bool)
    out[np.argsort(-s, kind="stable")[: int(k)]] = True
    return out


def gap(s: np.ndarray, *, min_rel_gap: float = 0.5, max_fraction: float = 0.25) -> np.ndarray:
    """Largest *relative* drop (upper / lower - 1) between consecutive sorted scores. A relative drop
    keeps a spread of sink norms (300, 150, 140 above a bulk at <= 40) together, where the largest
    absolute drop would split them."""
    out = np.zeros(len(s), dtype=bool)
    if len(s) < 2:
        return out
    order = np.argsort(-s, kind="stable")
    desc = s[order]
    n_cut = max(1, int(math.floor(max_fraction * len(s))))
    upper, lower = desc[:n_cut], np.maximum(desc[1:n_cut + 1], 1e-12)
    rel = upper / lower - 1.0
    i = int(np.argmax(rel))
    if rel[i] >= min_rel_gap:
        out[order[: i + 1]] = True
    return out


def quantile(s: np.ndarray, *, q: float = 0.99, tau: float | None = None) -> np.ndarray:
    if tau is None:
        raise SinkError("the quantile rule has no threshold yet: run mechsink.sinks.calibrate(model, batches, spec) first")
    return s >= tau


def relative(s: np.ndarray, *, ratio: float = 5.0, z: float = 8.0) -> np.ndarray:
    """Both a multiple of the median and a robust z-score: the ratio keeps bright content (object
    patches a few times the background norm) out, the z-score keeps out the top of a wide spread.
    s: one group's scores [n], or equal-sized groups [groups, n] judged row by row."""
    med = np.median(s, axis=-1, keepdims=s.ndim > 1)
    return s >= np.maximum(ratio * med, med + z * _robust_scale(s, med))


@dataclass(frozen=True)
class Rule:
    fn: Callable[..., np.ndarray]
    defaults: dict
    per_group: bool
    required: tuple[str, ...] = ()
    rows: bool = False      # fn also judges equal-sized groups as the rows of one [groups, n] array


RULES: dict[str, Rule] = {
    "relative": Rule(relative, {"ratio": 5.0, "z": 8.0}, True, rows=True),
    "fixed": Rule(fixed, {}, False, ("tau",)),
    "sigma": Rule(sigma, {"k": 2.0}, True),
    "robust_z": Rule(robust_z, {"z": 3.5}, True),
    "ratio": Rule(ratio, {"ratio": 5.0}, True),
    "topk": Rule(topk, {"k": 1}, True),
    "gap": Rule(gap, {"min_rel_gap": 0.5, "max_fraction": 0.25}, True),
    "quantile": Rule(quantile, {"q": 0.99, "tau": None, "n_calib": 0}, False),
}


def apply(rule: str, s: np.ndarray, params: dict) -> np.ndarray:
    """Run one rule on one group's scores (NaN-free, 1-D)."""
    r = RULES[rule]
    kw = {k: v for k, v in params.items() if k != "n_calib"}
    return np.asarray(r.fn(s, **kw), dtype=bool)


class QuantileSketch:
    """Histogram over log-spaced bins (bin k holds (lo * g^(k-1), lo * g^k], g = 1 + rel_err): any
    quantile in fixed memory, and two sketches merge by adding counts, so calibration streams over a
    dataset of any size. ``quantile`` returns the lower edge of the bin holding the quantile: at
    most ``rel_err`` (relative) below the exact value and never above it, so a threshold set there
    keeps every token of that bin. Scores are non-negative (norms, absolute values); values below
    ``lo`` share the first bin and values above ``hi`` the last."""

    def __init__(self, rel_err: float = 0.005, lo: float = 1e-6, hi: float = 1e9):
        if not 0 < rel_err < 1 or not 0 < lo < hi:
            raise SinkError(f"QuantileSketch needs 0 < rel_err < 1 and 0 < lo < hi, got {rel_err}, {lo}, {hi}")
        self.rel_err, self.lo, self.hi = float(rel_err), float(lo), float(hi)
        self._log_gamma = math.log1p(rel_err)
        self.counts = np.zeros(int(math.ceil(math.log(hi / lo) / self._log_gamma)) + 1, dtype=np.int64)
        self.min, self.max = math.inf, -math.inf

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def _bin(self, v: np.ndarray) -> np.ndarray:
        k = np.ceil(np.log(np.clip(v, self.lo, self.hi) / self.lo) / self._log_gamma)
        return np.clip(k.astype(np.int64), 0, len(self.counts) - 1)

    def update(self, values) -> "QuantileSketch":
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if len(v):
            if (v < 0).any():
                raise SinkError("QuantileSketch takes non-negative scores (norms or absolute values)")
            self.counts += np.bincount(self._bin(v), minlength=len(self.counts))
            self.min, self.max = min(self.min, float(v.min())), max(self.max, float(v.max()))
        return self

    def merge(self, other: "QuantileSketch") -> "QuantileSketch":
        if (other.rel_err, other.lo, other.hi) != (self.rel_err, self.lo, self.hi):
            raise SinkError("cannot merge quantile sketches with different bins")
        self.counts += other.counts
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        return self

    def quantile(self, q: float) -> float:
        """The value at rank floor(q * (n - 1)) of the sorted scores, to within the bin's width below."""
        if self.n == 0:
            raise SinkError("the quantile sketch is empty: calibration saw no tokens")
        if not 0 <= q <= 1:
            raise SinkError(f"quantile q must lie in [0, 1], got {q}")
        rank = math.floor(q * (self.n - 1))
        k = int(np.searchsorted(np.cumsum(self.counts), rank, side="right"))
        edge = self.lo * math.exp((k - 1) * self._log_gamma)
        return float(min(max(edge, self.min), self.max))

    def to_dict(self) -> dict:
        nz = np.nonzero(self.counts)[0]
        empty = self.n == 0   # JSON has no infinity
        return {"rel_err": self.rel_err, "lo": self.lo, "hi": self.hi,
                "min": None if empty else self.min, "max": None if empty else self.max,
                "bins": nz.tolist(), "counts": self.counts[nz].tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantileSketch":
        sk = cls(d["rel_err"], d["lo"], d["hi"])
        sk.counts[np.asarray(d["bins"], dtype=np.int64)] = np.asarray(d["counts"], dtype=np.int64)
        if d["min"] is not None:
            sk.min, sk.max = float(d["min"]), float(d["max"])
        return sk
