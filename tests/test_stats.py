"""Known-answer tests for mechsink.stats: coverage, null calibration, power, exactness, scipy agreement."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from mechsink.stats import (
    Comparison,
    StatsError,
    binomial_ci,
    bootstrap_ci,
    compare_paired,
    comparison_frame,
    holm,
    paired_permutation_test,
    summarize_draws,
)

N_SIMS = 400


def brute_force_p(a, b, alternative):
    """Sign-flip p-value by listing every sign pattern with itertools (the definition)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    observed = d.sum()
    tol = 1e-12 * max(1.0, np.abs(d).sum())
    hits = 0
    patterns = list(itertools.product((1.0, -1.0), repeat=len(d)))
    for signs in patterns:
        s = float(np.dot(signs, d))
        hits += {"greater": s >= observed - tol, "less": s <= observed + tol, "two-sided": abs(s) >= abs(observed) - tol}[
            alternative
        ]
    return hits / len(patterns)


# ------------------------------------------------------------------------------------ bootstrap


@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_bootstrap_ci_covers_true_mean_about_95_percent(method):
    rng = np.random.default_rng(123)
    data = rng.normal(loc=2.0, scale=3.0, size=(N_SIMS, 40))
    covered = 0
    for i, x in enumerate(data):
        est, low, high = bootstrap_ci(x, n_boot=1000, seed=i, method=method)
        assert low <= est <= high
        covered += low <= 2.0 <= high
    coverage = covered / N_SIMS
    # Bootstrap intervals undercover slightly at n=40 (~93-94 %); 400 sims have SE ~1.1 %.
    assert 0.90 <= coverage <= 0.98, coverage


def test_bootstrap_ci_width_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(5)
    widths = {}
    for n in (25, 400):
        _, low, high = bootstrap_ci(rng.normal(size=n), n_boot=4000)
        widths[n] = high - low
    # 2 * 1.96 / sqrt(n) for unit variance: 0.784 and 0.196; ratio 4.
    assert widths[25] / widths[400] == pytest.approx(4.0, rel=0.25)
    assert widths[400] == pytest.approx(2 * 1.96 / 20, rel=0.15)


@pytest.mark.parametrize("method,scipy_method", [("bca", "BCa"), ("percentile", "percentile")])
def test_bootstrap_ci_agrees_with_scipy(method, scipy_method):
    x = np.random.default_rng(1).exponential(size=60)  # skewed, where BCa and percentile differ
    ours = bootstrap_ci(x, n_boot=20000, method=method)
    ref = scipy.stats.bootstrap((x,), np.mean, n_resamples=20000, method=scipy_method, rng=2).confidence_interval
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert ours[0] == pytest.approx(x.mean())
    assert ours[1] == pytest.approx(ref.low, abs=0.1 * se)
    assert ours[2] == pytest.approx(ref.high, abs=0.1 * se)


def test_bootstrap_ci_with_non_vectorised_stat_and_determinism():
    x = np.random.default_rng(3).normal(size=30)
    trimmed = lambda v: scipy.stats.trim_mean(v, 0.1)  # noqa: E731  (no axis argument)
    a = bootstrap_ci(x, stat=trimmed, n_boot=300, seed=7)
    b = bootstrap_ci(x, stat=trimmed, n_boot=300, seed=7)
    assert a == b
    assert a[1] < a[0] < a[2]
    assert bootstrap_ci(x, n_boot=300, seed=1) != bootstrap_ci(x, n_boot=300, seed=2)


def test_bootstrap_ci_constant_data_is_a_point():
    assert bootstrap_ci(np.full(10, 3.5)) == (3.5, 3.5, 3.5)


@pytest.mark.parametrize(
    "x,match",
    [([1.0], "at least 2"), ([[1.0, 2.0]], "1-D"), ([1.0, np.nan, 2.0], "NaN")],
)
def test_bootstrap_ci_rejects_bad_input(x, match):
    with pytest.raises(StatsError, match=match):
        bootstrap_ci(x)


# ---------------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("n", [12, 40])  # exact enumeration and Monte Carlo
def test_permutation_false_positive_rate_under_null(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(2, N_SIMS, n))
    p = np.array([paired_permutation_test(a[i], b[i], n_perm=999, seed=i) for i in range(N_SIMS)])
    assert 0.02 <= np.mean(p <= 0.05) <= 0.09
    # uniform-ish: each quarter of [0, 1] holds roughly a quarter of the p-values
    quarters = np.histogram(p, bins=[0, 0.25, 0.5, 0.75, 1.0])[0] / N_SIMS
    assert np.all(np.abs(quarters - 0.25) < 0.07), quarters


def test_permutation_two_sided_false_positive_rate_under_null():
    rng = np.random.default_rng(99)
    a, b = rng.normal(size=(2, N_SIMS, 30))
    p = np.array([paired_permutation_test(a[i], b[i], n_perm=999, alternative="two-sided", seed=i) for i in range(N_SIMS)])
    assert 0.02 <= np.mean(p <= 0.05) <= 0.09


def test_permutation_power_under_large_effect():
    rng = np.random.default_rng(7)
    sims = 100
    b = rng.normal(size=(sims, 20))
    a = b + rng.normal(loc=1.5, size=(sims, 20))  # effect 1.5 SD of the difference
    p = np.array([paired_permutation_test(a[i], b[i], n_perm=999, seed=i) for i in range(sims)])
    assert np.mean(p <= 0.05) >= 0.98
    # the wrong direction never rejects
    p_less = np.array([paired_permutation_test(a[i], b[i], n_perm=999, alternative="less") for i in range(sims)])
    assert np.all(p_less > 0.5)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_enumeration_equals_brute_force(alternative, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=9) + 0.3, rng.normal(size=9)
    assert paired_permutation_test(a, b, alternative=alternative) == pytest.approx(brute_force_p(a, b, alternative), abs=1e-15)


def test_exact_enumeration_counts_ties_including_observed():
    # all differences equal: only the identity pattern reaches the observed sum -> p = 1/2**n
    a, b = np.ones(10), np.zeros(10)
    assert paired_permutation_test(a, b) == 1 / 2**10
    # all-zero differences: every pattern ties with the observed statistic
    assert paired_permutation_test(a, a) == 1.0
    # integer differences with many exact ties agree with brute force
    a = np.array([1, 2, 0, 1, 3, 1, 2, 0], float)
    assert paired_permutation_test(a, np.zeros(8)) == brute_force_p(a, np.zeros(8), "greater")


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_permutation_agrees_with_scipy(alternative):
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=11) + 0.4, rng.normal(size=11)
    ref = scipy.stats.permutation_test(
        (a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples", alternative=alternative
    ).pvalue
    assert paired_permutation_test(a, b, alternative=alternative) == pytest.approx(ref, abs=1e-12)


def test_monte_carlo_p_includes_observed_and_matches_exact():
    # n = 17 is just above the exact limit; its exact p via enumeration of 2**17 patterns
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=17) + 0.5, rng.normal(size=17)
    d = a - b
    bits = (np.arange(2**17)[:, None] >> np.arange(17)) & 1
    exact = np.mean((1 - 2.0 * bits) @ d >= d.sum() - 1e-12)
    mc = paired_permutation_test(a, b, n_perm=20000, seed=0)
    assert mc == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / 20000) + 1e-4)
    # strong effect: p bottoms out at 1 / (1 + n_perm), never 0
    assert paired_permutation_test(np.arange(50.0) + 100, np.zeros(50), n_perm=500) == 1 / 501


def test_permutation_rejects_bad_input():
    with pytest.raises(StatsError, match="same length"):
        paired_permutation_test([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(StatsError, match="alternative"):
        paired_permutation_test([1.0, 2.0], [1.0, 2.0], alternative="bigger")


# ------------------------------------------------------------------------------------ summaries


def test_summarize_draws_means_per_sample_and_skips_nan():
    per = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 6.0], [7.0, 7.0, 7.0]])
    s = summarize_draws(per)
    np.testing.assert_allclose(s.mean, [2.0, 5.0, 7.0])
    np.testing.assert_allclose(s.std, [1.0, np.sqrt(2.0), 0.0])
    np.testing.assert_array_equal(s.n_valid, [3, 2, 3])
    np.testing.assert_allclose(s.draw_means, [4.0, 4.5, 16 / 3])
    assert s.n_draws == 3
    with pytest.raises(StatsError, match="no valid random draw"):
        summarize_draws([[1.0, 2.0], [np.nan, np.nan]])
    with pytest.raises(StatsError, match=r"\[n_samples, n_draws\]"):
        summarize_draws([1.0, 2.0])


def test_compare_paired_known_effect_and_json():
    rng = np.random.default_rng(0)
    n, draws = 60, 8
    base = rng.normal(size=n)  # per-sample difficulty shared by both conditions (the pairing)
    sink = base + 1.0 + 0.3 * rng.normal(size=n)
    random = base[:, None] + 0.3 * rng.normal(size=(n, draws))
    c = compare_paired(sink, random)
    assert isinstance(c, Comparison)
    assert c.n == n and c.n_draws == draws
    assert c.diff.ci_low < 1.0 < c.diff.ci_high
    assert c.diff.ci_high - c.diff.ci_low < 0.4  # pairing removes the large shared variance
    assert c.sink.ci_high - c.sink.ci_low > 0.4
    assert c.diff.mean == pytest.approx(sink.mean() - random.mean(axis=1).mean())
    assert c.p_value == 1 / 10001
    assert "10000 random flips" in c.test
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert set(d) >= {"sink", "random", "diff", "p_value", "n", "test"}
    assert set(d["diff"]) == {"mean", "ci_low", "ci_high"}
    frame = comparison_frame({"toy": c})
    assert list(frame["condition"]) == ["sink", "random", "diff"]
    # no effect: p is not small, CI covers 0
    null = compare_paired(base + 0.3 * rng.normal(size=n), random, alternative="two-sided")
    assert null.p_value > 0.05 and null.diff.ci_low < 0 < null.diff.ci_high
    with pytest.raises(StatsError, match="same samples"):
        compare_paired(sink, random[:-1])


# ------------------------------------------------------------------------------- proportions


def test_binomial_ci_known_answers_and_scipy():
    assert binomial_ci(5, 10) == pytest.approx((0.5, 0.2365931, 0.7634069), abs=1e-6)
    p, low, high = binomial_ci(0, 10)
    z2 = scipy.stats.norm.ppf(0.975) ** 2
    assert (p, low) == (0.0, 0.0) and high == pytest.approx(z2 / (10 + z2))
    for k, n in [(1, 7), (30, 40), (87, 100), (100, 100)]:
        ref = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert binomial_ci(k, n)[1:] == pytest.approx((ref.low, ref.high), abs=1e-9)
    ps, lows, highs = binomial_ci(np.array([1, 5]), np.array([10, 10]))
    assert lows.shape == (2,) and highs[1] == pytest.approx(0.7634069, abs=1e-6)
    with pytest.raises(StatsError):
        binomial_ci(11, 10)


def test_binomial_ci_coverage():
    rng = np.random.default_rng(2)
    k = rng.binomial(50, 0.3, size=2000)
    _, low, high = binomial_ci(k, np.full_like(k, 50))
    assert 0.93 <= np.mean((low <= 0.3) & (0.3 <= high)) <= 0.97


def test_holm_known_answer():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    assert holm([0.02]).tolist() == [0.02]
    with pytest.raises(StatsError):
        holm([0.1, 1.5])


def test_image_level_test_keeps_its_size_where_question_level_does_not():
    """Null data with 3 questions per image sharing an image effect: averaging within images keeps
    the false-positive rate near alpha; treating questions as independent inflates it."""
    from mechsink.stats import compare_paired
    rng = np.random.default_rng(0)
    n_img, per, reps = 24, 3, 1000
    units = np.repeat(np.arange(n_img), per)
    hits_img = hits_q = 0
    for _ in range(reps):
        shared = rng.normal(0, 1.0, n_img)[units]              # the image's own (null) effect, shared
        sink = shared + rng.normal(0, 0.3, n_img * per)
        rand = rng.normal(0, 0.3, n_img * per)
        kw = dict(n_boot=100, n_perm=400, method="percentile", alternative="greater", seed=int(rng.integers(1 << 30)))
        hits_img += compare_paired(sink, rand, units=units, **kw).p_value < 0.05
        hits_q += compare_paired(sink, rand, **kw).p_value < 0.05
    fpr_img, fpr_q = hits_img / reps, hits_q / reps
    assert 0.03 <= fpr_img <= 0.07, fpr_img
    assert fpr_q > 0.09, fpr_q                                 # the pseudo-replicated test is anti-conservative


def test_unit_means_and_counts():
    from mechsink.stats import compare_paired, unit_means
    assert unit_means([1.0, 3.0, 10.0, 2.0], ["b", "b", "a", "c"]).tolist() == [2.0, 10.0, 2.0]
    rng = np.random.default_rng(0)                       # many units, interleaved, in order of first appearance
    v, u = rng.normal(size=3000), rng.choice([f"{h:064x}" for h in range(400)], 3000)
    _, first, inv = np.unique(u, return_index=True, return_inverse=True)     # the sort-based reference
    want = (np.bincount(inv, weights=v) / np.bincount(inv))[np.argsort(first)]
    assert np.array_equal(unit_means(v, u), want) and np.array_equal(unit_means(v, list(u)), want)
    assert np.allclose(want, pd.Series(v).groupby(u, sort=False).mean().to_numpy(), rtol=0, atol=1e-15)
    c = compare_paired([1.0, 3.0, 10.0, 2.0, 5.0, 6.0], [0.0] * 6, units=[1, 1, 2, 3, 4, 4], n_boot=100, n_perm=50)
    assert (c.n, c.n_obs, c.unit) == (4, 6, "image") and c.sink.mean == pytest.approx((2 + 10 + 2 + 5.5) / 4)


def test_bootstrap_ci_with_given_jackknife_equals_the_computed_one():
    from mechsink.stats import StatsError, bootstrap_ci
    x = np.random.default_rng(3).gamma(2.0, 1.0, 57)
    loo = (x.sum() - x) / (len(x) - 1)                   # leave-one-out means, in closed form
    want = bootstrap_ci(x, n_boot=500, seed=1)
    assert np.allclose(bootstrap_ci(x, n_boot=500, seed=1, jackknife=loo), want, rtol=0, atol=1e-12)
    assert np.allclose(bootstrap_ci(x, n_boot=500, seed=1, max_elements=100), want, rtol=0, atol=1e-12)
    with pytest.raises(StatsError, match="one value per sample"):
        bootstrap_ci(x, n_boot=500, seed=1, jackknife=loo[:-1])


def test_mean_bootstrap_takes_the_closed_form_jackknife_and_gives_the_generic_interval():
    """For np.mean the BCa's leave-one-out means come in closed form (O(n)); the interval equals
    the one from n evaluations of a mean the bootstrap cannot recognise."""
    x = np.random.default_rng(5).gamma(0.7, size=301)     # skewed: the acceleration matters
    generic = lambda a, axis=-1: np.mean(a, axis=axis)    # noqa: E731 - not np.mean by identity
    fast, slow = bootstrap_ci(x, n_boot=2000, seed=2), bootstrap_ci(x, stat=generic, n_boot=2000, seed=2)
    assert fast == pytest.approx(slow, rel=1e-12, abs=1e-12)
    assert fast != bootstrap_ci(x, n_boot=2000, seed=2, method="percentile")


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 18])
def test_resamples_and_sign_flips_do_not_depend_on_the_chunk_size(monkeypatch, chunk):
    """The bootstrap and the Monte Carlo sign flips draw the same numbers however they are chunked,
    so bounding their memory changes no interval and no p-value."""
    import mechsink.stats as st
    rng = np.random.default_rng(9)
    a, b = rng.normal(0.2, 1, 203), rng.normal(0, 1, 203)
    want = (bootstrap_ci(a - b, n_boot=500, seed=1), paired_permutation_test(a, b, n_perm=3001, seed=4))
    monkeypatch.setattr(st, "_CHUNK_ELEMENTS", chunk)
    assert (bootstrap_ci(a - b, n_boot=500, seed=1), paired_permutation_test(a, b, n_perm=3001, seed=4)) == want
