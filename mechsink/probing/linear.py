"""A saved linear probe: one affine map on raw activations (safetensors + JSON, no pickle), and the
standardised logistic/ridge fit that produces it (the feature scaler folded into the weights)."""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..atomic import write_text
from .config import ProbeConfig, ProbeError

log = logging.getLogger("mechsink")

PROBE_FORMAT = "mechsink-probe/1"
SMALL_FIT = 1 << 22  # activations (n * d) below which a probe is fit on one thread


@dataclass
class LinearProbe:
    """An affine classifier on raw activations: scores = x @ weight.T + bias.

    weight: [K, d] float32; bias: [K] float32; classes: K labels (str or int), in score order.
    kind "logistic": softmax(scores) are class probabilities. meta: what it was trained on.
    """

    weight: np.ndarray
    bias: np.ndarray
    classes: list
    kind: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weight = np.ascontiguousarray(self.weight, dtype=np.float32)
        self.bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],) or len(self.classes) != len(self.bias):
            raise ProbeError(f"probe shapes disagree: weight {self.weight.shape}, bias {self.bias.shape}, "
                             f"{len(self.classes)} classes")

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def scores(self, x) -> np.ndarray:
        """x: [n, d] -> scores [n, K] (float64)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ProbeError(f"probe expects activations of shape [n, {self.dim}], got {list(x.shape)}")
        return x.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64)

    def predict_proba(self, x) -> np.ndarray:
        """[n, K] softmax of the scores (only meaningful for logistic probes)."""
        return _softmax(self.scores(x))

    def predict_index(self, x) -> np.ndarray:
        return self.scores(x).argmax(axis=1)

    def predict(self, x) -> np.ndarray:
        """[n] predicted labels."""
        return np.asarray(self.classes, dtype=object)[self.predict_index(x)]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path``.safetensors (weight, bias) and ``path``.json (classes, kind, meta); returns the .json path."""
        from safetensors.numpy import save_file

        stem = Path(path)
        stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        st, js = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
        tmp = st.with_name("." + st.name + ".tmp")
        save_file({"weight": self.weight, "bias": self.bias}, str(tmp), metadata={"format": PROBE_FORMAT})
        os.replace(tmp, st)
        doc = {"format": PROBE_FORMAT, "kind": self.kind, "classes": _plain(self.classes), "dim": self.dim,
               "tensors": st.name, "meta": self.meta}
        write_text(js, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return js


def load_probe(path: str | os.PathLike) -> LinearProbe:
    """Read a probe written by :meth:`LinearProbe.save` (``path`` with or without .json/.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
    js = stem.with_name(stem.name + ".json")
    try:
        doc = json.loads(js.read_text())
    except FileNotFoundError:
        raise ProbeError(f"no saved probe at {js}") from None
    except json.JSONDecodeError as e:
        raise ProbeError(f"{js} is not valid JSON ({e.msg})") from None
    if doc.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{js} is not a {PROBE_FORMAT} file (format {doc.get('format')!r})")
    try:
        t = load_file(str(js.with_name(doc["tensors"])))
    except (FileNotFoundError, SafetensorError) as e:
        raise ProbeError(f"cannot read the tensors of {js}: {e}") from None
    return LinearProbe(t["weight"], t["bias"], list(doc["classes"]), doc["kind"], doc.get("meta", {}))


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _plain(values: Iterable) -> list:
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fit a standardised logistic/ridge probe; return (weight [K, d], bias [K]) on raw activations.

    x: [n, d]; y: [n] class codes in [0, n_classes). Classes missing from y get score -inf-like
    (a bias of -1e30 - never predicted). The scaler is folded in: w' = w / sigma, b' = b - w' . mu.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from threadpoolctl import threadpool_limits

    z = np.array(x, dtype=np.float64)        # one float64 copy, standardised in place (no temporaries of [n, d])
    mu = z.mean(axis=0)
    sigma = z.std(axis=0)
    sigma[sigma < 1e-12] = 1.0  # constant features carry nothing; leave them unscaled
    z -= mu
    z /= sigma
    present = np.unique(y)
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, -1e30)
    if len(present) == 1:  # a training fold with one class: predict it
        bias[present[0]] = 0.0
        return weight, bias
    if config.model == "logistic":
        clf = LogisticRegression(C=config.C, max_iter=config.max_iter)
    else:
        clf = RidgeClassifier(alpha=config.alpha)
    # Small fits run on one thread: sklearn's OpenMP loss is overhead-bound there and spin-waits
    # badly on a busy machine (measured 6x slower with 2 threads on 2 shared cores).
    threads = 1 if z.size < SMALL_FIT else None
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(threads):
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(z, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("probe did not converge in %d iterations (raise max_iter or lower C)", config.max_iter)
    coef, icpt = np.atleast_2d(clf.coef_), np.atleast_1d(clf.intercept_)
    if coef.shape[0] == 1:  # binary: one score s; [-s/2, s/2] keeps argmax and softmax = sigmoid(s)
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    w = coef / sigma
    weight[clf.classes_] = w
    bias[clf.classes_] = icpt - w @ mu
    return weight, bias
