"""Linear probes on cached activations: what do sink tokens encode, compared with the rest?

    cfg = ProbeConfig(label="planted_label")                # token sets sinks, nonsinks, cls, mean
    res = probe(Store.open("cache/"), cfg, out="probe_out/")
    res.frame                                               # one row per (token set, site)
    res.probes["sinks", "vit.out"].predict(x)               # the probe refit on every image
    accuracy_figure(res)                                    # accuracy by layer per token set

A label is *image-level* when it is constant within each sample (a class, an attribute) and
*patch-level* otherwise (what or where the patch is, e.g. ``patch_row``). Token sets:

- ``sinks`` / ``nonsinks``: every image token (``is_sink`` true / false) is one training sample.
  For an image-level label the test images are scored by averaging their tokens' predicted
  probabilities (ridge: decision scores) — the ``aggregate`` column says which — and the token-level
  score is reported too (``token_accuracy``).
- ``cls``: CLS rows (image-level labels only). ``mean``: the mean of each image's image tokens.

Every split is grouped by image: images (``image_path`` when the cache records it, so one picture
asked several questions stays on one side; else the sample) are dealt into k folds once, and every
token set and site uses those folds, so their scores are paired. The score is balanced accuracy with
a bootstrap CI over images. The control task (Hewitt & Liang) gives each image a random label from
the token set's label distribution (image-level: the images' labels shuffled across images;
patch-level: each (image, label) pair mapped to a random label), fixed across sites; with
image-grouped splits a probe can only beat chance on it by memorising images, so a control above
chance flags leakage or an over-expressive probe. ``selectivity`` = accuracy - control accuracy. ``majority`` is the
balanced accuracy of predicting the training folds' most frequent class.

Probes are saved as safetensors (weight [K, d], bias [K]) + JSON (classes, site, label, config):
the feature standardisation is folded into the weights, so a saved probe is one affine map.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .atomic import write_parquet, write_text
from .errors import MechsinkError, SiteError
from .sites import Site

log = logging.getLogger("mechsink")

TOKEN_SETS = ("sinks", "nonsinks", "cls", "mean")
MODELS = ("logistic", "ridge")
LEVELS = ("auto", "image", "patch")
PROBE_FORMAT = "mechsink-probe/1"
SMALL_FIT = 1 << 22  # activations (n * d) below which a probe is fit on one thread


class ProbeError(MechsinkError, ValueError):
    """A probe cannot be trained or loaded as asked (one-line message)."""


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ProbeConfig:
    """What a probing run does; JSON round-trips and its hash names the run.

    label: index column to predict. token_sets: subset of TOKEN_SETS. sites: cached sites to probe
    (None: all). model: "logistic" (inverse regularisation C) or "ridge" (penalty alpha).
    k: CV folds. n_boot: bootstrap draws for the CIs. control: run the control task.
    level: "auto" | "image" | "patch" (see the module docstring).
    max_tokens_per_image: cap on the tokens one image contributes to a token-level set (a fixed
    random subset), bounding memory on large models; None keeps all.
    """

    label: str
    token_sets: tuple[str, ...] = TOKEN_SETS
    sites: tuple[str, ...] | None = None
    model: str = "logistic"
    C: float = 1.0
    alpha: float = 1.0
    k: int = 5
    n_boot: int = 1000
    seed: int = 0
    control: bool = True
    level: str = "auto"
    max_tokens_per_image: int | None = 64
    max_iter: int = 1000

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if not isinstance(self.label, str) or not self.label:
            raise ProbeError("label must be the name of an index column")
        sets = (self.token_sets,) if isinstance(self.token_sets, str) else tuple(self.token_sets)
        bad = [s for s in sets if s not in TOKEN_SETS]
        if bad or not sets or len(set(sets)) != len(sets):
            raise ProbeError(f"token_sets must be distinct names from {list(TOKEN_SETS)}, got {list(sets)}")
        set_("token_sets", sets)
        if self.sites is not None:
            set_("sites", (self.sites,) if isinstance(self.sites, str) else tuple(self.sites))
        if self.model not in MODELS:
            raise ProbeError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        if self.level not in LEVELS:
            raise ProbeError(f"level must be one of {list(LEVELS)}, got {self.level!r}")
        if not (self.C > 0 and self.alpha > 0):
            raise ProbeError(f"C and alpha must be > 0, got C={self.C}, alpha={self.alpha}")
        if int(self.k) != self.k or self.k < 2:
            raise ProbeError(f"k (folds) must be an integer >= 2, got {self.k}")
        if self.n_boot < 100:
            raise ProbeError(f"n_boot must be at least 100, got {self.n_boot}")
        if self.max_tokens_per_image is not None and self.max_tokens_per_image < 1:
            raise ProbeError(f"max_tokens_per_image must be >= 1 or None, got {self.max_tokens_per_image}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["token_sets"] = list(self.token_sets)
        d["sites"] = None if self.sites is None else list(self.sites)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProbeConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ProbeError(f"unknown probe config keys {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ProbeConfig":
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ probe


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

    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    sigma = x.std(axis=0)
    sigma[sigma < 1e-12] = 1.0  # constant features carry nothing; leave them unscaled
    z = (x - mu) / sigma
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


# ------------------------------------------------------------------------------------ result


@dataclass
class ProbeResult:
    """frame: one row per (token_set, site) (see RESULT_COLUMNS); probes: {(token_set, site): LinearProbe}
    refit on all images; splits: (token_set, site, fold, image, side) for every image in every fold,
    read off the index arrays each fold trained and tested on (a site using the same rows as an earlier
    site of its token set shares its splits and is not repeated; probes resumed from ``out`` are
    absent); notes: token sets/sites left out and why."""

    config: ProbeConfig
    frame: pd.DataFrame
    probes: dict[tuple[str, str], LinearProbe]
    splits: pd.DataFrame
    notes: list[str]
    store_id: str = ""

    def to_records(self) -> list[dict]:
        """JSON-ready rows (NaN -> None)."""
        from .report.manifest import to_jsonable

        return to_jsonable(self.frame.to_dict(orient="records"))

    def save(self, out: str | os.PathLike, figure: bool = True) -> Path:
        """Write results.json, splits.parquet, probes/ and (figure=True) accuracy_by_layer.png under out."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"config": self.config.to_dict(), "config_hash": self.config.fingerprint(), "store_id": self.store_id,
               "notes": self.notes, "rows": self.to_records()}
        write_text(out / "results.json", json.dumps(doc, indent=2) + "\n")
        for (ts, site), p in self.probes.items():
            p.save(out / "probes" / _probe_name(ts, site))
        write_parquet(out / "splits.parquet", self.splits)
        if figure and len(self.frame):
            fig = accuracy_figure(self)
            fig.savefig(out / "accuracy_by_layer.png", dpi=120)
        return out


RESULT_COLUMNS = ["label", "level", "token_set", "site", "depth", "unit", "aggregate", "metric", "accuracy", "ci_low",
                  "ci_high", "token_accuracy", "control_accuracy", "control_ci_low", "control_ci_high", "selectivity",
                  "majority", "chance", "n_classes", "n_images", "n_units", "n_tokens", "k", "model"]


def _probe_name(token_set: str, site: str) -> str:
    return f"{token_set}__{site}"


# ------------------------------------------------------------------------------------ data


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
    elif name == "cls":
        rows = np.flatnonzero((role == "cls") & ok)
    else:  # mean: one pooled row per (sample, image)
        pool_rows = np.flatnonzero(image)
        keys = index[["sample_idx", "image"]].to_numpy()[pool_rows]
        _, first, pool = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        pool = pool.ravel()
        rows = pool_rows[first]
    if name in ("sinks", "nonsinks") and config.max_tokens_per_image is not None and len(rows):
        rng = np.random.default_rng(config.seed)
        order = rows[rng.permutation(len(rows))]
        keep = pd.Series(lab.group[order]).groupby(lab.group[order]).cumcount().to_numpy() < config.max_tokens_per_image
        rows = np.sort(order[keep])
    if len(rows) == 0:
        return f"{name}: no rows in the cache"
    y, unit, group = lab.y[rows], lab.unit[rows], lab.group[rows]
    control = _control_labels(y, unit, group, lab.level, np.random.default_rng([config.seed, TOKEN_SETS.index(name)]))
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


# ------------------------------------------------------------------------------------ scoring


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


def balanced_accuracy_ci(group, y, correct, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Balanced accuracy of per-unit outcomes with a bootstrap CI that resamples images.

    group, y, correct: [n] image id, true class code and whether the prediction was right, per
    evaluated unit (image or token). Images are resampled whole (a cluster bootstrap), so tokens
    of one image never count as independent evidence. Returns (estimate, low, high).
    """
    from .stats import bootstrap_ci

    gids, g = np.unique(np.asarray(group), return_inverse=True)
    y = np.asarray(y, dtype=np.int64)
    counts, hits = _balanced_counts(g.ravel(), y, np.asarray(correct, bool), len(gids), int(y.max()) + 1)
    n = len(gids)

    def stat(idx, axis=-1):
        idx = np.asarray(idx, dtype=np.int64)
        b, m = idx.shape
        w = np.bincount((np.arange(b)[:, None] * n + idx).ravel(), minlength=b * n).reshape(b, n).astype(float)
        c, h = w @ counts, w @ hits
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(c > 0, h / c, np.nan), axis=1)

    if n < 2:
        est = _balanced(counts, hits)
        return est, float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample can miss a class entirely
        return bootstrap_ci(np.arange(n, dtype=float), stat=stat, n_boot=n_boot, seed=seed, alpha=alpha)


def _aggregate(unit: np.ndarray, scores: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Average token predictions per unit: probabilities (logistic) or scores (ridge).
    Returns (units [u], mean [u, K], aggregate name)."""
    values = _softmax(scores) if kind == "logistic" else scores
    units, inv = np.unique(unit, return_inverse=True)
    sums = np.zeros((len(units), values.shape[1]))
    np.add.at(sums, inv.ravel(), values)
    return units, sums / np.bincount(inv.ravel())[:, None], "mean_proba" if kind == "logistic" else "mean_score"


@dataclass
class _Scored:
    accuracy: tuple[float, float, float]
    token_accuracy: float
    majority: float
    n_units: int
    aggregate: str


def _score(s: _Set, y: np.ndarray, oof: np.ndarray, fold: np.ndarray, n_classes: int, config: ProbeConfig) -> _Scored:
    """Score out-of-fold scores [n, K] against codes y [n] at the unit level."""
    pred_tok = oof.argmax(axis=1)
    one_g = np.zeros(len(y), dtype=np.int64)
    token_acc = _balanced(*_balanced_counts(one_g, y, pred_tok == y, 1, n_classes))
    units, mean, agg = _aggregate(s.unit, oof, config.model)
    first = np.unique(s.unit, return_index=True)[1]
    uy, ug, uf = y[first], s.group[first], fold[first]
    if len(units) == len(y):
        agg = "none"
    pred = mean.argmax(axis=1)
    acc = balanced_accuracy_ci(ug, uy, pred == uy, n_boot=config.n_boot, seed=config.seed)
    # majority baseline: each fold predicts its training units' most frequent class
    maj = np.empty(len(uy), dtype=np.int64)
    for f in np.unique(uf):
        train = uy[uf != f]
        maj[uf == f] = np.bincount(train, minlength=n_classes).argmax() if len(train) else 0
    majority = _balanced(*_balanced_counts(np.zeros(len(uy), np.int64), uy, maj == uy, 1, n_classes))
    return _Scored(acc, token_acc if agg != "none" else float("nan"), majority, len(units), agg)


def _cross_val(x, y, folds, n_classes, config) -> np.ndarray:
    """Out-of-fold scores [n, K]: each fold's rows are scored by a probe fit on the other folds."""
    oof = np.zeros((len(y), n_classes))
    for train, test in folds:
        w, b = fit_linear(x[train], y[train], n_classes, config)
        oof[test] = LinearProbe(w, b, list(range(n_classes)), config.model).scores(x[test])
    return oof


def _site_order(sites: Sequence[str]) -> list[str]:
    def key(s):
        try:
            return (0, Site.parse(s).order, s)
        except SiteError:
            return (1, (), s)
    return sorted(sites, key=key)


# ------------------------------------------------------------------------------------ run


def probe(store, config: ProbeConfig | Mapping[str, Any], out: str | os.PathLike | None = None) -> ProbeResult:
    """Train and score probes for every (token set, site); see the module docstring.

    store: a Store or a cache directory. out: when given, every finished (token set, site) is
    written there at once (its row to rows.jsonl, its probe to probes/) and a rerun with the same
    config skips it, so an interrupted run loses at most the probe in progress; the final
    results.json, splits.parquet and figure are written at the end.
    """
    from .cache import Store

    if not isinstance(config, ProbeConfig):
        config = ProbeConfig.from_dict(config)
    if not isinstance(store, Store):
        store = Store.open(store)
    index = store.index
    sites = list(store.sites) if config.sites is None else list(config.sites)
    missing = [s for s in sites if s not in store.sites]
    if missing:
        raise ProbeError(f"sites {missing} are not in the cache; it has {list(store.sites)}")
    sites = _site_order(sites)
    depth = {s: i for i, s in enumerate(_site_order(store.sites))}
    lab = _labels(index, config)
    n_classes = len(lab.classes)
    done = _resume(out, config, store) if out is not None else {}

    rows, probes, splits, notes = [], {}, [], []
    recorded: dict[str, set[str]] = {}
    for name in config.token_sets:
        s = _token_set(name, index, lab, config)
        if isinstance(s, str):
            notes.append(s)
            log.info("probe: %s", s)
            continue
        fold = lab.fold_of_group[s.group]
        for site in sites:
            key = (name, site)
            if key in done:
                rows.append(done[key][0])
                probes[key] = done[key][1]
                continue
            x = _features(store, s, site)
            finite = np.isfinite(x).all(axis=1)
            if not finite.any():
                notes.append(f"{name} @ {site}: no activations cached for these tokens")
                continue
            sub = _subset(s, finite)
            x, f_sub = x[finite], fold[finite]
            folds = [(np.flatnonzero(f_sub != f), np.flatnonzero(f_sub == f)) for f in range(config.k)]
            folds = [(tr, te) for tr, te in folds if len(te)]
            if len(folds) < 2:
                notes.append(f"{name} @ {site}: its images fall in fewer than 2 folds")
                continue
            used = hashlib.sha256(finite.tobytes()).hexdigest()
            if used not in recorded.setdefault(name, set()):  # sites reading the same rows share splits
                recorded[name].add(used)
                splits += _split_records(name, site, folds, sub.group, lab.group_names)
            real = _score(sub, sub.y, _cross_val(x, sub.y, folds, n_classes, config), f_sub, n_classes, config)
            ctrl = None
            if config.control:
                ctrl = _score(sub, sub.y_control, _cross_val(x, sub.y_control, folds, n_classes, config),
                              f_sub, n_classes, config)
            w, b = fit_linear(x, sub.y, n_classes, config)
            meta = {"label": config.label, "level": lab.level, "token_set": name, "site": site,
                    "aggregate": real.aggregate, "store_id": store.id, "config": config.to_dict(),
                    "n_tokens": int(len(sub.y))}
            probes[key] = LinearProbe(w, b, lab.classes, config.model, meta)
            acc, c_acc = real.accuracy, (ctrl.accuracy if ctrl else (math.nan,) * 3)
            row = {"label": config.label, "level": lab.level, "token_set": name, "site": site, "depth": depth[site],
                   "unit": "image" if lab.level == "image" else "token", "aggregate": real.aggregate,
                   "metric": "balanced_accuracy", "accuracy": acc[0], "ci_low": acc[1], "ci_high": acc[2],
                   "token_accuracy": real.token_accuracy, "control_accuracy": c_acc[0], "control_ci_low": c_acc[1],
                   "control_ci_high": c_acc[2], "selectivity": acc[0] - c_acc[0], "majority": real.majority,
                   "chance": 1.0 / len(np.unique(sub.y)), "n_classes": int(len(np.unique(sub.y))),
                   "n_images": int(len(np.unique(sub.group))), "n_units": real.n_units, "n_tokens": int(len(sub.y)),
                   "k": len(folds), "model": config.model}
            rows.append(row)
            log.info("probe %s @ %s: accuracy %.3f [%.3f, %.3f], control %.3f", name, site, *acc, c_acc[0])
            if out is not None:
                _checkpoint(Path(out), config, row, probes[key])

    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    split_frame = pd.concat(splits, ignore_index=True) if splits else pd.DataFrame(columns=SPLIT_COLUMNS)
    result = ProbeResult(config, frame, probes, split_frame, notes, store.id)
    if out is not None:
        result.save(out)
    return result


SPLIT_COLUMNS = ["token_set", "site", "fold", "image", "side"]


def _split_records(name, site, folds, group, group_names) -> list[pd.DataFrame]:
    """The images on each side of each fold, read off the index arrays the fold trains and tests on."""
    out = []
    for f, (train, test) in enumerate(folds):
        for side, idx in (("train", train), ("test", test)):
            images = group_names[np.unique(group[idx])]
            out.append(pd.DataFrame({"token_set": name, "site": site, "fold": f, "image": images.astype(str),
                                     "side": side}, columns=SPLIT_COLUMNS))
    return out


def _subset(s: _Set, keep: np.ndarray) -> _Set:
    if keep.all():
        return s
    return dataclasses.replace(s, rows=s.rows[keep], y=s.y[keep], y_control=s.y_control[keep], unit=s.unit[keep],
                               group=s.group[keep])


def _resume(out, config: ProbeConfig, store) -> dict:
    """{(token_set, site): (row, probe)} finished by an earlier run of this config into out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = {"config": config.to_dict(), "config_hash": config.fingerprint(), "store_id": store.id}
    cfg = out / "config.json"
    if cfg.exists():
        have = json.loads(cfg.read_text())
        if (have.get("config_hash"), have.get("store_id")) != (run["config_hash"], run["store_id"]):
            raise ProbeError(f"{out} holds probes of another config or cache; use a new output directory")
    else:
        write_text(cfg, json.dumps(run, indent=2) + "\n")
    done = {}
    log_file = out / "rows.jsonl"
    if log_file.exists():
        for line in log_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that probe is redone
            key = (row["token_set"], row["site"])
            try:
                done[key] = (row, load_probe(out / "probes" / _probe_name(*key)))
            except ProbeError:
                continue
    return done


def _checkpoint(out: Path, config: ProbeConfig, row: dict, p: LinearProbe) -> None:
    from .report.manifest import to_jsonable

    p.save(out / "probes" / _probe_name(row["token_set"], row["site"]))
    path = out / "rows.jsonl"
    torn = path.exists() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"  # a kill mid-line
    with open(path, "a") as f:  # after the probe: a row on disk always has its probe
        f.write(("\n" if torn else "") + json.dumps(to_jsonable(row)) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------ figure, CLI


def accuracy_figure(result: ProbeResult | pd.DataFrame, title: str | None = None):
    """Accuracy (with CI band) by site in model order, one line per token set; chance dotted."""
    from .report.figures import CONDITION_COLOURS, accuracy_by_layer

    df = result.frame if isinstance(result, ProbeResult) else result
    if df.empty:
        raise ProbeError("no probe results to plot")
    order = [t for t in TOKEN_SETS if t in set(df["token_set"])]
    chance = float(df["chance"].max())
    label = df["label"].iloc[0]
    palette = {"sinks": CONDITION_COLOURS["sinks"], "nonsinks": CONDITION_COLOURS["nonsinks"], "cls": "#1e8449",
               "mean": "#8e44ad"}
    fig = accuracy_by_layer(df, x="depth", y="accuracy", hue="token_set", low="ci_low", high="ci_high",
                            hue_order=order, palette={t: palette[t] for t in order}, chance=chance,
                            title=title or f"probe accuracy for {label!r}", ylabel="balanced accuracy", xlabel="site")
    ax = fig.axes[0]
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # never over the lines
    ticks = df.drop_duplicates("depth").sort_values("depth")
    ax.set_xticks(ticks["depth"].to_numpy(), ticks["site"].tolist(), rotation=30, ha="right", fontsize=8)
    return fig


def probe_command(cache_dir: str | os.PathLike, label: str, token_sets: Sequence[str] = TOKEN_SETS,
                  sites: Sequence[str] | None = None, *, model: str = "logistic", C: float = 1.0, alpha: float = 1.0,
                  folds: int = 5, n_boot: int = 1000, seed: int = 0, control: bool = True, level: str = "auto",
                  max_tokens_per_image: int | None = 64, out: str | os.PathLike | None = None) -> list[dict]:
    """What ``mechsink probe --cache DIR --label COL --json`` prints: one JSON row per (token set, site)
    with token_set, site, accuracy, ci_low, ci_high, control_accuracy, selectivity, n_images, majority, ..."""
    config = ProbeConfig(label=label, token_sets=tuple(token_sets), sites=None if sites is None else tuple(sites),
                         model=model, C=C, alpha=alpha, k=folds, n_boot=n_boot, seed=seed, control=control,
                         level=level, max_tokens_per_image=max_tokens_per_image)
    return probe(cache_dir, config, out=out).to_records()
