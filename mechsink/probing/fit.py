"""Fitting a standardised logistic/ridge probe from blocks of rows, so that memory does not grow
with the rows: the objective, optimiser and tolerances of scikit-learn 1.9's
``LogisticRegression(C, max_iter)`` (lbfgs) and ``RidgeClassifier(alpha)``, with the loss, its
gradient and the ridge's sufficient statistics summed block by block.

Rows come in blocks (``batches()``: dicts with "pos", "rows" and class codes "y", as
:meth:`.sets._Set.batches` yields them) whose features a feature source gives
(:class:`.features._Rows`). Every pass over the rows reads them again, from memory or from the store.
"""
from __future__ import annotations

import logging
from functools import partial

import numpy as np

from .config import ProbeConfig
from .features import _Rows, _take

log = logging.getLogger("mechsink")

SMALL_FIT = 1 << 22  # activations (n * d) below which a probe is fit on one thread
TOL = 1e-4           # LogisticRegression's default tol: L-BFGS stops when max |gradient| <= TOL


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fit a standardised logistic/ridge probe on x [n, d] (in memory) with class codes y [n] in
    [0, n_classes); return (weight [K, d], bias [K]) on raw activations. See :func:`fit_rows`."""
    x = np.asarray(x)
    return fit_rows(_Rows(x.shape[1], partial(_take, x)), np.arange(len(x)), y, n_classes, config)


def fit_rows(rows, pos: np.ndarray, y: np.ndarray, n_classes: int, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fit on the rows ``pos`` of ``rows`` with class codes y [len(pos)]; see :func:`fit_batches`."""
    pos, y = np.asarray(pos), np.asarray(y)

    def batches():
        for start in range(0, len(pos), rows.block_rows):
            p = pos[start:start + rows.block_rows]
            yield {"pos": p, "rows": p, "y": y[start:start + rows.block_rows]}
    return fit_batches(rows, batches, n_classes, config)


def fit_batches(rows, batches, n_classes: int, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fit on the blocks ``batches()`` yields (called once per pass); return (weight [K, d], bias
    [K]) on raw activations (the scaler folded in: w' = w / sigma, b' = b - w' . mu).

    Classes missing from the rows get a bias of -1e30 (never predicted); one class present: predict it.
    """
    from threadpoolctl import threadpool_limits

    counts = np.zeros(n_classes, dtype=np.int64)
    for b in batches():                            # the classes present (no features read)
        counts += np.bincount(b["y"], minlength=n_classes)
    present = np.flatnonzero(counts)
    n = int(counts.sum())
    # codes 0..m-1 of the present classes (the codes themselves when every class is present)
    lut = None if len(present) and present[-1] == len(present) - 1 else np.cumsum(counts > 0) - 1
    mu, sigma = _moments(rows, batches)
    weight = np.zeros((n_classes, rows.d))
    bias = np.full(n_classes, -1e30)
    if len(present) == 1:
        bias[present[0]] = 0.0
        return weight, bias

    buf = np.empty((min(rows.block_rows, n), rows.d))  # one block, reused: no page faults per pass
    # held rows whose float64 copy fits the budget too are standardised once, not on every pass
    # (the same blocks, the same arithmetic: the same numbers)
    kept: list | None = [] if rows.held and n * rows.d * 8 <= rows.memory_bytes else None
    done = [False]

    def blocks():  # (standardised float64 block, its codes), as sklearn sees the whole matrix
        if done[0]:
            yield from kept
            return
        kept_now = kept is not None
        if kept_now:
            kept.clear()                 # a pass left unfinished starts over
        for b in batches():
            x = rows.read(b)
            z = np.subtract(x, mu, out=np.empty(x.shape) if kept_now else buf[:len(x)])
            z /= sigma
            code = b["y"] if lut is None else lut[b["y"]].astype(b["y"].dtype)
            if kept_now:
                kept.append((z, code))
            yield z, code
        done[0] = kept_now

    # Small fits run on one thread: BLAS on small blocks is overhead-bound and spin-waits badly on
    # a busy machine (sklearn's OpenMP loss measured 6x slower with 2 threads on 2 shared cores).
    threads = 1 if n * rows.d < SMALL_FIT else None
    with threadpool_limits(threads):
        if config.model == "logistic":
            coef, icpt = _logistic(blocks, n, len(present), rows.d, config.C, config.max_iter)
        else:
            coef, icpt = _ridge(blocks, len(present), rows.d, config.alpha)
    if coef.shape[0] == 1:  # binary: one score s; [-s/2, s/2] keeps argmax and softmax = sigmoid(s)
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    w = coef / sigma
    weight[present] = w
    bias[present] = icpt - w @ mu
    return weight, bias


def _moments(rows, batches) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and (population) std of the rows, in one pass: float64 block moments merged
    with Chan et al.'s update (exact to rounding; one block is numpy's own two-pass formula)."""
    n, mean, m2 = 0, np.zeros(rows.d), np.zeros(rows.d)
    for b in batches():
        x = np.asarray(rows.read(b), dtype=np.float64)
        nb, mb = len(x), x.mean(axis=0)
        m2b = np.square(x - mb).sum(axis=0)
        delta, tot = mb - mean, n + nb
        mean += delta * (nb / tot)
        m2 += m2b + np.square(delta) * (n * nb / tot)
        n = tot
    sigma = np.sqrt(m2 / n)
    sigma[sigma < 1e-12] = 1.0  # constant features carry nothing; leave them unscaled
    return mean, sigma


def _ridge(blocks, k: int, d: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """RidgeClassifier: targets +-1 per class (one column for two classes, +1 = the second), the
    intercept from centred data, coef = (Zc'Zc + alpha I)^-1 Zc'Yc; here from Z'Z, Z'Y and the sums."""
    from scipy import linalg

    m = 1 if k == 2 else k
    gram, zy, sz, sy, n = np.zeros((d, d)), np.zeros((d, m)), np.zeros(d), np.zeros(m), 0
    for z, c in blocks():
        t = (2.0 * (c == 1) - 1.0)[:, None] if k == 2 else 2.0 * (c[:, None] == np.arange(k)) - 1.0
        gram += z.T @ z
        zy += z.T @ t
        sz += z.sum(axis=0)
        sy += t.sum(axis=0)
        n += len(z)
    zm, ym = sz / n, sy / n
    a = gram - n * np.outer(zm, zm)
    a.flat[:: d + 1] += alpha
    coef = linalg.solve(a, zy - n * np.outer(zm, ym), assume_a="pos", overwrite_a=True).T
    return coef, ym - coef @ zm


def _logistic(blocks, n: int, k: int, d: int, C: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """LogisticRegression's lbfgs fit: mean half-binomial (two classes, one coefficient vector, the
    second class positive) or half-multinomial loss + 1 / (2 C n) |w|^2, intercept unpenalised,
    coefficients (classes contiguous per feature) from zeros, sklearn's L-BFGS-B options."""
    from scipy import optimize
    from scipy.special import expit

    l2 = 1.0 / (C * n)
    binary = k == 2

    def split(w):
        if binary:
            return w[:d], w[d]
        wb = w.reshape((k, d + 1), order="F")
        return wb[:, :d], wb[:, d]

    def loss_grad(w):
        coef, icpt = split(w)
        loss, g_coef, g_icpt = 0.0, np.zeros_like(coef), np.zeros_like(icpt)
        for z, t in blocks():
            if binary:
                t = (t == 1).astype(np.float64)
                raw = z @ coef + icpt
                loss += float(np.sum(np.logaddexp(0.0, raw) - t * raw))
                g = (expit(raw) - t) / n
            else:
                raw = z @ coef.T + icpt
                top = raw.max(axis=1, keepdims=True)
                e = np.exp(raw - top)
                s = e.sum(axis=1, keepdims=True)
                rows = np.arange(len(z))
                loss += float(np.sum(top[:, 0] + np.log(s[:, 0]) - raw[rows, t]))
                g = e / s
                g[rows, t] -= 1.0
                g /= n
            g_coef += (z.T @ g) if binary else (g.T @ z)
            g_icpt += g.sum(axis=0)
        loss = loss / n + 0.5 * l2 * float(np.sum(coef * coef))
        g_coef += l2 * coef
        if binary:
            return loss, np.append(g_coef, g_icpt)
        return loss, np.column_stack([g_coef, g_icpt]).ravel(order="F")

    w0 = np.zeros(d + 1 if binary else k * (d + 1))
    res = optimize.minimize(loss_grad, w0, method="L-BFGS-B", jac=True,
                            options={"maxiter": max_iter, "maxls": 50, "gtol": TOL, "ftol": 64 * np.finfo(float).eps})
    if res.status != 0:
        log.warning("probe did not converge in %d iterations (raise max_iter or lower C)", max_iter)
    coef, icpt = split(res.x)
    return np.atleast_2d(coef), np.atleast_1d(icpt)
