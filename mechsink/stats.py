"""Statistics for paired comparisons: sink effect vs matched-random effect on the same samples.

Every analysis that compares sinks with random tokens measures both on the *same* samples, so the
comparison is paired: confidence intervals come from the bootstrap over samples and the test is a
sign-flip permutation test on the per-sample differences (no normality assumption). When several
samples (questions) share an image, ``compare_paired(..., units=image_keys(...))`` averages within
each image first, so the bootstrap and the sign flips run over the independent images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal, Sequence

import numpy as np
from scipy.special import ndtr, ndtri

from mechsink.errors import MechsinkError

Alternative = Literal["greater", "less", "two-sided"]

EXACT_MAX_N = 16  # 2**16 sign patterns: exact enumeration is cheaper than Monte Carlo
_CHUNK_ELEMENTS = 1 << 18      # resampled values or signs held at once (a few MB, whatever n is)


class StatsError(MechsinkError, ValueError):
    """Bad input to a statistic (wrong shape, NaN, too few samples)."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its (1 - alpha) confidence interval."""

    mean: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Comparison:
    """Sink effect vs matched-random effect on the same n samples.

    ``diff`` is sink minus random per sample; ``p_value`` tests ``diff`` against zero in the
    direction given by ``alternative``.
    """

    sink: Estimate
    random: Estimate
    diff: Estimate
    p_value: float
    n: int
    test: str
    alternative: str
    alpha: float
    n_draws: int
    n_obs: int | None = None        # observations before averaging within units (e.g. questions)
    unit: str = "sample"            # what n counts: the independent unit of the test

    def to_dict(self) -> dict:
        """Plain nested dict; NaN becomes None so the result is valid JSON."""
        return _json_safe(asdict(self))

    def to_rows(self, label: str) -> list[dict]:
        """Long-format rows (one per condition) for :func:`mechsink.report.figures.effect_plot`."""
        return [
            {"label": label, "condition": cond, **asdict(getattr(self, cond))}
            for cond in ("sink", "random", "diff")
        ]


@dataclass(frozen=True)
class DrawSummary:
    """Per-sample summary of a random control measured over several random draws.

    mean, std, n_valid: shape [n_samples]; draw_means: shape [n_draws] (each draw's mean over
    samples, whose spread shows how much the aggregate depends on the particular draw).
    """

    mean: np.ndarray
    std: np.ndarray
    n_valid: np.ndarray
    draw_means: np.ndarray

    @property
    def n_draws(self) -> int:
        return int(self.draw_means.shape[0])


# ---------------------------------------------------------------------------------------- input


def _as_1d(x, name: str, min_n: int = 2) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise StatsError(f"{name} must be 1-D (one value per sample), got shape {arr.shape}")
    if arr.shape[0] < min_n:
        raise StatsError(f"{name} needs at least {min_n} samples, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise StatsError(f"{name} contains NaN or inf at positions {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}")
    return arr


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise StatsError(f"alpha must lie in (0, 1), got {alpha}")


def _apply_stat(stat: Callable, samples: np.ndarray) -> np.ndarray:
    """stat over the last axis; vectorised when stat takes ``axis`` (numpy reductions do)."""
    try:
        out = np.asarray(stat(samples, axis=-1), dtype=float)
    except TypeError:
        out = np.apply_along_axis(stat, -1, samples).astype(float)
    if out.shape != samples.shape[:-1]:
        raise StatsError(f"stat must reduce one sample to a scalar, got output shape {out.shape}")
    return out


# ------------------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    x,
    *,
    stat: Callable = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    method: Literal["bca", "percentile"] = "bca",
    jackknife: np.ndarray | None = None,
    max_elements: int | None = None,
) -> tuple[float, float, float]:
    """Bootstrap confidence interval of ``stat(x)`` over resampled samples.

    x: shape [n]. Returns (estimate, low, high) where estimate = stat(x). ``method="bca"``
    (bias-corrected and accelerated, as in scipy.stats.bootstrap) corrects the percentile
    interval for skew and bias at the cost of n jackknife evaluations; it falls back to the
    percentile interval when the bootstrap distribution is degenerate. ``jackknife``: the n
    leave-one-out values of ``stat``, when the caller has them cheaper than n evaluations.
    ``max_elements``: resampled values held at once (the memory of a chunk of resamples).
    """
    x = _as_1d(x, "x")
    _check_alpha(alpha)
    if n_boot < 100:
        raise StatsError(f"n_boot must be at least 100 for a usable interval, got {n_boot}")
    if method not in ("bca", "percentile"):
        raise StatsError(f"method must be 'bca' or 'percentile', got {method!r}")
    n = x.shape[0]
    estimate = float(_apply_stat(stat, x[None, :])[0])
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    rows = max(1, (max_elements or _CHUNK_ELEMENTS) // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        boot[start:stop] = _apply_stat(stat, x[rng.integers(0, n, size=(stop - start, n))])

    levels = np.array([alpha / 2, 1 - alpha / 2])
    if method == "bca":
        if jackknife is None and stat is np.mean:     # leave-one-out means in closed form: O(n), not O(n^2)
            jackknife = (x.sum() - x) / (n - 1)
        levels = _bca_levels(x, stat, boot, estimate, levels, jackknife)
    low, high = np.quantile(boot, levels)
    return estimate, float(low), float(high)


def _bca_levels(x: np.ndarray, stat: Callable, boot: np.ndarray, estimate: float, levels: np.ndarray,
                jack: np.ndarray | None = None) -> np.ndarray:
    """Adjusted quantile levels for the BCa interval (Efron 1987)."""
    below = np.mean(boot < estimate) + 0.5 * np.mean(boot == estimate)  # ties split evenly
    if not 0.0 < below < 1.0:
        return levels
    z0 = ndtri(below)
    n = x.shape[0]
    if jack is None:
        jack = np.empty(n)
        cols = np.arange(n - 1)
        rows = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, n, rows):
            drop = np.arange(start, min(n, start + rows))[:, None]
            jack[start : start + drop.shape[0]] = _apply_stat(stat, x[cols + (cols >= drop)])  # row i skips x[i]
    elif np.shape(jack) != (n,):
        raise StatsError(f"jackknife must hold one value per sample ({n}), got shape {np.shape(jack)}")
    dev = jack.mean() - jack
    denom = 6.0 * np.sum(dev**2) ** 1.5
    accel = np.sum(dev**3) / denom if denom > 0 else 0.0
    z = ndtri(levels)
    adjusted = ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    return adjusted if np.all(np.isfinite(adjusted)) else levels


# ----------------------------------------------------------------------------------- permutation


def paired_permutation_test(
    a,
    b,
    *,
    n_perm: int = 10000,
    alternative: Alternative = "greater",
    seed: int = 0,
) -> float:
    """Sign-flip permutation test of mean(a - b) against zero; returns the p-value.

    a, b: shape [n], paired by position. Under the null each difference is as likely to be
    positive as negative, so flipping signs draws from the null distribution of the mean.
    For n <= 16 all 2**n sign patterns are enumerated (exact p; the identity pattern is the
    observed statistic). Otherwise n_perm random patterns are drawn and
    p = (1 + #{T* >= T}) / (1 + n_perm), which counts the observed statistic and is never 0.
    """
    a = _as_1d(a, "a", min_n=1)
    b = _as_1d(b, "b", min_n=1)
    if a.shape != b.shape:
        raise StatsError(f"a and b must be paired (same length), got {a.shape[0]} and {b.shape[0]}")
    if alternative not in ("greater", "less", "two-sided"):
        raise StatsError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    d = a - b
    n = d.shape[0]
    observed = float(d.sum())  # the sum orders exactly like the mean and avoids one division
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))  # flips equal up to rounding count as ties

    def count_extreme(signs: np.ndarray) -> int:
        sums = signs @ d
        if alternative == "greater":
            return int(np.count_nonzero(sums >= observed - tol))
        if alternative == "less":
            return int(np.count_nonzero(sums <= observed + tol))
        return int(np.count_nonzero(np.abs(sums) >= abs(observed) - tol))

    if n <= EXACT_MAX_N:
        count = 0
        for signs in _all_sign_patterns(n):
            count += count_extreme(signs)
        return count / 2**n

    if n_perm < 100:
        raise StatsError(f"n_perm must be at least 100, got {n_perm}")
    rng = np.random.default_rng(seed)
    count = 0
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_perm, rows):
        m = min(n_perm, start + rows) - start
        # int32 draws: the same signs however the flips are chunked (int8 draws are not)
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int32) * 2.0 - 1.0
        count += count_extreme(signs)
    return (1 + count) / (1 + n_perm)


def _all_sign_patterns(n: int):
    """Yield chunks of the 2**n x n matrix of +-1 sign patterns (row 0 is all +1)."""
    total = 2**n
    rows = max(1, min(total, _CHUNK_ELEMENTS // max(n, 1)))
    bits = np.arange(n)
    for start in range(0, total, rows):
        codes = np.arange(start, min(total, start + rows))[:, None]
        yield 1.0 - 2.0 * ((codes >> bits) & 1)


# ----------------------------------------------------------------------------------- summaries


def summarize_draws(per_sample_by_draw) -> DrawSummary:
    """Average a random control over its draws, per sample.

    per_sample_by_draw: shape [n_samples, n_draws]; NaN marks a draw that could not be made for
    that sample (e.g. too few matched tokens) and is skipped. Each sample's control is the mean
    over its valid draws, which is the matched-random effect to pair with that sample's sink
    effect.
    """
    arr = np.asarray(per_sample_by_draw, dtype=float)
    if arr.ndim != 2:
        raise StatsError(f"per_sample_by_draw must have shape [n_samples, n_draws], got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise StatsError(f"per_sample_by_draw is empty (shape {arr.shape})")
    if np.isinf(arr).any():
        raise StatsError("per_sample_by_draw contains inf")
    valid = ~np.isnan(arr)
    n_valid = valid.sum(axis=1)
    if (n_valid == 0).any():
        raise StatsError(f"samples {np.flatnonzero(n_valid == 0)[:5].tolist()} have no valid random draw")
    filled = np.where(valid, arr, 0.0)
    mean = filled.sum(axis=1) / n_valid
    var = np.where(valid, (arr - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(n_valid - 1, 1)
    std = np.where(n_valid > 1, np.sqrt(var), np.nan)
    draw_valid = valid.sum(axis=0)
    draw_means = np.where(draw_valid > 0, filled.sum(axis=0) / np.maximum(draw_valid, 1), np.nan)
    return DrawSummary(mean=mean, std=std, n_valid=n_valid, draw_means=draw_means)


def compare_paired(
    sink_effect,
    random_effect,
    *,
    n_boot: int = 2000,
    n_perm: int = 10000,
    alpha: float = 0.05,
    alternative: Alternative = "greater",
    seed: int = 0,
    method: Literal["bca", "percentile"] = "bca",
    units: Sequence | None = None,
    unit: str = "image",
) -> Comparison:
    """Compare per-sample sink effects with matched-random effects on the same samples.

    sink_effect: shape [n]. random_effect: shape [n] or [n, n_draws] (averaged over draws per
    sample with :func:`summarize_draws` first). Means get bootstrap CIs; the difference gets a
    bootstrap CI and a paired sign-flip permutation p-value ("greater": sinks matter more).

    units: one label per sample naming its independent unit (e.g. the image several questions
    share). Effects are then averaged within each unit first and every CI and the test run over
    units (a cluster bootstrap and unit-level sign flips), so correlated questions do not count
    as independent evidence; ``n`` is the number of units, ``n_obs`` the number of samples.
    """
    sink = _as_1d(sink_effect, "sink_effect")
    rand = np.asarray(random_effect, dtype=float)
    n_draws = 1
    if rand.ndim == 2:
        n_draws = rand.shape[1]
        rand = summarize_draws(rand).mean
    rand = _as_1d(rand, "random_effect", min_n=1 if units is not None else 2)
    if rand.shape != sink.shape:
        raise StatsError(f"sink_effect and random_effect must cover the same samples, got {sink.shape[0]} and {rand.shape[0]}")
    n_obs = int(sink.shape[0])
    if units is not None:
        sink, rand = unit_means(sink, units), unit_means(rand, units)
        sink = _as_1d(sink, f"sink_effect per {unit}")
    else:
        unit = "sample"
    ci = dict(n_boot=n_boot, alpha=alpha, seed=seed, method=method)
    diff = sink - rand
    p = paired_permutation_test(sink, rand, n_perm=n_perm, alternative=alternative, seed=seed)
    exact = sink.shape[0] <= EXACT_MAX_N
    test = "paired sign-flip permutation, " + ("exact" if exact else f"{n_perm} random flips")
    return Comparison(
        sink=Estimate(*bootstrap_ci(sink, **ci)),
        random=Estimate(*bootstrap_ci(rand, **ci)),
        diff=Estimate(*bootstrap_ci(diff, **ci)),
        p_value=float(p),
        n=int(sink.shape[0]),
        test=test,
        alternative=alternative,
        alpha=alpha,
        n_draws=int(n_draws),
        n_obs=n_obs,
        unit=unit,
    )


def unit_means(values, units: Sequence) -> np.ndarray:
    """Mean of ``values`` within each unit, units in order of first appearance."""
    import pandas as pd

    v = np.asarray(values, dtype=float)
    if len(units) != v.shape[0]:
        raise StatsError(f"{len(units)} unit labels for {v.shape[0]} values")
    # codes in order of first appearance, by hashing: no fixed-width string copy of the labels to sort
    codes, uniques = pd.factorize(np.asarray(units, dtype=object), use_na_sentinel=False)
    sums = np.bincount(codes, weights=v, minlength=len(uniques))
    return sums / np.bincount(codes, minlength=len(uniques))


def image_keys(images: Sequence) -> list[str]:
    """One key per sample naming its image(s) (``images``: a list of PIL images or of lists of
    them, as ``Batch.images``): a hash of the pixels, so questions asked of the same image share a
    key whichever file or row it came from -- the ``units`` of :func:`compare_paired`."""
    import hashlib
    keys = []
    for group in images:
        h = hashlib.sha256()
        for im in (group if isinstance(group, (list, tuple)) else [group]):
            h.update(f"{im.mode}{im.size}".encode())
            h.update(im.tobytes())
        keys.append(h.hexdigest()[:16])
    return keys


def comparison_frame(comparisons: dict[str, Comparison]):
    """Long DataFrame (label, condition, mean, ci_low, ci_high) from named comparisons."""
    import pandas as pd

    return pd.DataFrame([row for label, c in comparisons.items() for row in c.to_rows(label)])


# ---------------------------------------------------------------------------- proportions, fwer


def binomial_ci(k, n, *, alpha: float = 0.05) -> tuple:
    """Wilson score interval for a proportion k / n (e.g. an accuracy).

    k, n: scalars or arrays of the same shape. Returns (p_hat, low, high), as floats for scalar
    input. Unlike the normal approximation it stays inside [0, 1] and is sensible at k = 0 or n.
    """
    _check_alpha(alpha)
    k_arr = np.asarray(k, dtype=float)
    n_arr = np.asarray(n, dtype=float)
    if np.any(n_arr <= 0) or np.any(k_arr < 0) or np.any(k_arr > n_arr) or np.any(k_arr != np.round(k_arr)):
        raise StatsError("binomial_ci needs whole counts with 0 <= k <= n and n > 0")
    z = ndtri(1 - alpha / 2)
    p_hat = k_arr / n_arr
    denom = 1 + z**2 / n_arr
    centre = (p_hat + z**2 / (2 * n_arr)) / denom
    half = z * np.sqrt(p_hat * (1 - p_hat) / n_arr + z**2 / (4 * n_arr**2)) / denom
    low, high = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    if p_hat.ndim == 0:
        return float(p_hat), float(low), float(high)
    return p_hat, low, high


def holm(pvals: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order as the input), controlling the FWER.

    Reject hypothesis i at level alpha when adjusted[i] <= alpha.
    """
    p = np.asarray(pvals, dtype=float)
    if p.ndim != 1:
        raise StatsError(f"pvals must be 1-D, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise StatsError("pvals must be finite and lie in [0, 1]")
    m = p.shape[0]
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
