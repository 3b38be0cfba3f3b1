"""A saved linear probe: one affine map on raw activations (safetensors + JSON, no pickle); the
standardised fit that produces it is :mod:`.fit`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..atomic import write_text
from .config import ProbeError

PROBE_FORMAT = "mechsink-probe/1"


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
    e = s - s.max(axis=1, keepdims=True)  # one [n, K] array, exponentiated and normalised in place
    np.exp(e, out=e)
    e /= e.sum(axis=1, keepdims=True)
    return e


def _plain(values: Iterable) -> list:
    return [v.item() if isinstance(v, np.generic) else v for v in values]
