"""The probe fit over blocks of rows: the same probe as scikit-learn's fit of the whole matrix, the
same numbers whether the rows are held in memory or read from the store, and a whole ``probe()``
run that streams (a tiny memory budget) gives the result of one that holds its features."""
from __future__ import annotations

import re
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from mechsink.cache import StoreConfig, StoreWriter
from mechsink.probing import ProbeConfig, ProbeError, columns, features, fit_linear, labels, probe, sets
from mechsink.probing.columns import _Columns
from mechsink.probing.features import _features, _Rows, _take
from mechsink.probing.fit import _moments, fit_batches, fit_rows
from mechsink.probing.sets import _Set, _token_set
from mechsink.probing.labels import _Index, _labels

# Measured (relative to the largest coefficient): the blockwise fits agree with sklearn to 1.2e-15
# (logistic: the same L-BFGS path, only the order of the sums differs) and 4.3e-15 (ridge) on these
# cases, and to 5e-14 / 4e-13 on wider random ones (d > n included). The bounds leave room for a
# rounding that shifts one line search, and still fail on a change of objective or options (a
# tolerance of 1e-6 instead of 1e-4, or l2 over n + 1 rows, fails the logistic cases).
RTOL = {"logistic": 1e-8, "ridge": 1e-10}


def _data(n, d, k, seed, drop=None):
    """Features on very different scales and offsets (as sink activations are), labels from a few dims."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, d) + rng.normal(size=d) * 20
    x[:, -1] = 3.0                                            # a constant feature
    logits = (x[:, :3] - x[:, :3].mean(0)) / x[:, :3].std(0) @ rng.normal(size=(3, k)) + rng.normal(size=(n, k))
    y = logits.argmax(1)
    if drop is not None:
        y[y == drop] = (drop + 1) % k
    return x.astype(np.float32), y


def _sklearn(x, y, n_classes, cfg):
    """The reference: sklearn on the standardised float64 matrix, scaler folded in as fit_rows does."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier

    z = np.array(x, dtype=np.float64)
    mu, sd = z.mean(0), z.std(0)
    sd[sd < 1e-12] = 1.0
    z = (z - mu) / sd
    clf = (LogisticRegression(C=cfg.C, max_iter=cfg.max_iter) if cfg.model == "logistic"
           else RidgeClassifier(alpha=cfg.alpha)).fit(z, y)
    coef, icpt = np.atleast_2d(clf.coef_), np.atleast_1d(clf.intercept_)
    if coef.shape[0] == 1:
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    w, b = np.zeros((n_classes, x.shape[1])), np.full(n_classes, -1e30)
    w[clf.classes_] = coef / sd
    b[clf.classes_] = icpt - (coef / sd) @ mu
    return w, b


@pytest.mark.parametrize("model", ["logistic", "ridge"])
@pytest.mark.parametrize("k, n, d, drop", [(2, 400, 12, None), (3, 600, 20, None), (4, 500, 16, 2), (3, 60, 80, None)])
def test_blockwise_fit_equals_sklearn(model, k, n, d, drop):
    """Binary, 3-class, a class missing from the training rows (never predicted) and d > n."""
    x, y = _data(n, d, k, seed=k * n + d, drop=drop)
    cfg = ProbeConfig(label="y", model=model, C=0.5, alpha=3.0)
    want_w, want_b = _sklearn(x, y, k, cfg)
    rows = _Rows(d, lambda p: x[p])
    rows.block_rows = 37                                      # many blocks, the last one short
    w, b = fit_rows(rows, np.arange(n), y, k, cfg)
    seen = np.unique(y)
    scale = np.abs(want_w).max()
    assert np.abs(w - want_w).max() <= RTOL[model] * scale, np.abs(w - want_w).max() / scale
    assert np.abs(b[seen] - want_b[seen]).max() <= RTOL[model] * max(1.0, np.abs(want_b[seen]).max())
    if drop is not None:
        assert b[drop] == -1e30 and not w[drop].any()
    # the public in-memory entry point is the same fit (one block)
    w1, b1 = fit_linear(x, y, k, cfg)
    assert np.allclose(w1, w, rtol=0, atol=RTOL[model] * scale)


def test_moments_over_blocks_equal_numpy():
    x, _ = _data(1001, 9, 2, seed=3)
    rows = _Rows(9, lambda p: x[p])
    rows.block_rows = 100
    mu, sd = _moments(rows, lambda: ({"pos": np.arange(i, min(i + 100, len(x)))} for i in range(0, len(x), 100)))
    z = x.astype(np.float64)
    assert np.allclose(mu, z.mean(0), rtol=1e-14, atol=1e-12)
    assert np.allclose(sd[:-1], z.std(0)[:-1], rtol=1e-12) and sd[-1] == 1.0   # a constant column: unscaled


def test_one_class_predicts_it():
    x, _ = _data(50, 4, 2, seed=1)
    w, b = fit_linear(x, np.full(50, 1), 3, ProbeConfig(label="y"))
    assert not w.any() and b[1] == 0 and b[0] == b[2] == -1e30


def test_take_is_a_view_only_for_consecutive_rows():
    x = np.arange(20.0).reshape(10, 2)
    assert np.shares_memory(_take(x, np.arange(3, 7)), x)
    for pos in ([1, 2, 4], [4, 3, 2], [5], []):
        assert np.array_equal(_take(x, np.array(pos, dtype=np.int64)), x[pos])


# --------------------------------------------------------------------------------- from a store

N_IMG, PER, D = 60, 12, 16


@pytest.fixture(scope="module", params=["float32", "float16"])
def store(tmp_path_factory, request):
    """60 images of 12 tokens (2 of them sinks) whose label is written, weakly, in a few dims; some
    tokens not cached (NaN) at one site. Float16 rows are read and held as they are (float32 holds
    them exactly)."""
    rng = np.random.default_rng(0)
    label = np.arange(N_IMG) % 3
    img = np.repeat(np.arange(N_IMG), PER)
    x = rng.normal(size=(N_IMG * PER, D)) * 2 + 5
    x[:, :3] += 1.5 * np.eye(3)[label[img]]
    x[:, 3] *= 100                                                        # a feature on another scale
    rows = pd.DataFrame({"sample_idx": img, "token_role": "image", "is_sink": np.tile(np.arange(PER) < 2, N_IMG),
                         "image": 0, "lab": np.array(["a", "b", "c"])[label[img]],
                         "image_path": [f"img{i:03d}.png" for i in img]})
    y = x.copy()
    y[(img % 5 == 0) & (np.tile(np.arange(PER), N_IMG) == 3)] = np.nan   # one token of every 5th image
    w = StoreWriter(tmp_path_factory.mktemp("stream") / "c", StoreConfig(sites=("vit.out", "llm.out")),
                    dtype=request.param)
    w.add(rows, {"vit.out": torch.from_numpy(x).float(), "llm.out": torch.from_numpy(y).float()})
    return w.finalize()


def _set(store, name, cfg):
    index = _Index(store)
    return _token_set(name, index, _labels(index, cfg), cfg)


@pytest.mark.parametrize("name, site", [("image", "vit.out"), ("nonsinks", "llm.out"), ("mean", "vit.out"), ("mean", "llm.out")])
@pytest.mark.parametrize("model", ["logistic", "ridge"])
def test_rows_read_from_the_store_equal_rows_held(store, name, site, model, monkeypatch):
    cfg = ProbeConfig(label="lab", model=model, max_tokens_per_image=None)
    s = _set(store, name, cfg)
    monkeypatch.setattr(features, "BLOCK_BYTES", 8 * D * 23)   # 23-row blocks, whatever the budget
    monkeypatch.setattr(features, "MIN_BLOCK_ROWS", 1)
    held = _features(store, s, site, memory_mb=64)
    fin_h = s.cols.read("ok").copy()
    streamed = _features(store, s, site, memory_mb=0)
    fin_s = s.cols.read("ok")
    assert held.held and not streamed.held and streamed.block_rows == held.block_rows == 23
    assert np.array_equal(fin_h, fin_s)
    pos = np.flatnonzero(fin_h)
    assert len(pos) > 2 * streamed.block_rows and (not fin_h.all()) == (site == "llm.out")
    gathered = []
    real = store.get
    monkeypatch.setattr(store, "get", lambda site_, rows_: gathered.append(len(rows_)) or real(site_, rows_))

    def finite():
        return s.batches(23, lambda c: c["ok"])
    a = fit_batches(streamed, finite, 3, cfg)
    assert gathered and (max(gathered) <= 23 or name == "mean")          # never the whole matrix
    b = fit_batches(held, finite, 3, cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # the same blocks: the same numbers
    assert [len(bt["pos"]) for bt in finite()][:-1] == [23] * (len(pos) // 23 - (len(pos) % 23 == 0))
    # the pooled rows are the images' mean tokens
    x = np.concatenate([held.read(bt) for bt in finite()])
    if name == "mean":
        want = real(site, s.members.read("rows")).astype(np.float64)
        pool = np.repeat(np.arange(s.n), np.diff(s.pool_start))
        want = pd.DataFrame(want).groupby(pool).mean().to_numpy()[pos]
        assert np.allclose(x, want, rtol=1e-6)
        first = s.members.read("rows")[s.pool_start[:-1]]
        assert np.array_equal(np.unique(store.index["sample_idx"].to_numpy()[first]), np.arange(N_IMG))   # one pool per image
    else:
        want = real(site, s.cols.read("rows")[pos])
        assert x.dtype == want.dtype == store.dtype and np.array_equal(x, want)   # held in the store's own type


@pytest.mark.parametrize("model, cap", [("logistic", 64), ("ridge", 64), ("logistic", 5)])
def test_probe_streamed_equals_probe_held(store, model, cap, monkeypatch):
    """Features and token sets held, or read from the store and a scratch folder on every pass
    (also with the per-image cap drawing 5 of each image's 10 non-sink tokens): the same result."""
    cfg = ProbeConfig(label="lab", model=model, token_sets=("sinks", "nonsinks", "mean"), n_boot=200, k=4,
                      max_tokens_per_image=cap)
    monkeypatch.setattr(features, "BLOCK_BYTES", 8 * D * 41)   # several blocks per fit, whatever the budget
    monkeypatch.setattr(features, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(columns, "CHUNK", 50)                  # spilled sets read back 50 rows at a time
    big = probe(store, cfg, memory_mb=1024)      # held, and standardised once per fit
    small = probe(store, cfg, memory_mb=0)       # read from the store on every pass
    pd.testing.assert_frame_equal(small.frame, big.frame, check_exact=False, rtol=1e-12)
    for col in ("accuracy", "ci_low", "ci_high", "control_accuracy", "token_accuracy", "majority"):
        assert np.array_equal(small.frame[col].to_numpy(), big.frame[col].to_numpy(), equal_nan=True), col
    pd.testing.assert_frame_equal(small.splits, big.splits)
    assert set(small.probes) == set(big.probes)
    for key, p in big.probes.items():
        q = small.probes[key]
        assert np.array_equal(q.weight, p.weight) and np.array_equal(q.bias, p.bias)   # the same blocks: the same sums
    assert (big.frame.loc[big.frame["token_set"] == "nonsinks", "accuracy"] > 0.6).all()  # a real signal
    tokens = big.frame.set_index(["token_set", "site"])["n_tokens"]
    assert tokens["nonsinks", "vit.out"] == N_IMG * min(cap, PER - 2)                     # the cap, per image


def _sets(source, cfg, block, names=("image", "sinks", "nonsinks", "cls", "mean")):
    index = _Index(source, block=block)
    lab = _labels(index, cfg)
    return lab, {n: _token_set(n, index, lab, cfg) for n in names}


def test_columns_spill_past_their_budget_and_read_back_the_same(monkeypatch):
    """Held under the budget, in a scratch folder past it (removed with the columns); either way
    every range reads back what was appended, and a column started over holds only its new rows."""
    rng = np.random.default_rng(3)
    pieces = [dict(a=rng.integers(0, 100, n).astype(np.int8), b=rng.integers(0, 10**6, n)) for n in (5, 0, 17, 9)]
    want = {k: np.concatenate([p[k] for p in pieces]) for k in "ab"}
    for budget in (float("inf"), 100):
        c = _Columns({"a": np.int8, "b": np.int64}, budget)
        for p in pieces:
            c.append(**p)
        c.close()
        assert c.spilled == (budget == 100) and c.n == 31
        for k in "ab":
            assert np.array_equal(c.read(k), want[k]) and np.array_equal(c.read(k, 4, 22), want[k][4:22])
        monkeypatch.setattr(columns, "CHUNK", 7)
        got = [(start, ch["a"]) for start, ch in c.chunks(["a"])]
        assert [g[0] for g in got] == [0, 7, 14, 21, 28] and np.array_equal(np.concatenate([g[1] for g in got]), want["a"])
        monkeypatch.undo()
        c.reset("ok", bool)
        c.append(ok=want["a"] > 50)
        c.close()
        assert np.array_equal(c.read("ok"), want["a"] > 50) and np.array_equal(c.read("b"), want["b"])
        folder = c.folder
        del c
        assert folder is None or not folder.exists()


def _index_frame(seed, n_samples=300, sparse=0):
    """Samples of 1-8 rows in shuffled order, 10% unlabelled; an image-level label of 3 classes."""
    rng = np.random.default_rng(seed)
    sample = np.repeat(rng.permutation(n_samples), rng.integers(1, 9, n_samples)).astype(np.int64) + sparse
    labelled = rng.random(len(sample)) > 0.1
    return pd.DataFrame({"sample_idx": sample, "image_path": [f"im{s % 10**6:04d}.png" for s in sample],
                         "token_role": "image", "is_sink": rng.random(len(sample)) < 0.2, "image": 0,
                         "lab": np.where(labelled, pd.Series(sample % 3).map({0: "a", 1: "b", 2: "c"}), None)})


@pytest.mark.parametrize("block", [37, 10**6])
def test_labels_and_folds_read_in_blocks_say_what_pandas_says(block):
    """Scanned block by block, the label's level, each image's first label and the stratified folds
    are what pandas' groupby over the whole index says; set arrays come in small integer types."""
    index = _index_frame(3)
    cfg = ProbeConfig(label="lab", k=4)
    lab, sets = _sets(index, cfg, block, ("image",))
    s = sets["image"]
    rows, y, group, sample = (s.cols.read(c) for c in ("rows", "y", "group", "sample"))
    ok = index["lab"].notna().to_numpy()
    assert lab.level == "image" and lab.classes == ["a", "b", "c"] and lab.fold_of_group.dtype == np.int8
    assert y.dtype == np.int8 and group.dtype == np.int16 and rows.dtype == np.int32   # 3 classes: 1 byte
    assert sample.dtype == np.int16 and s.unit == "sample"                    # image level: the unit is the sample
    assert np.array_equal(rows, np.flatnonzero(ok)) and np.array_equal(sample, index["sample_idx"][ok])
    assert list(lab.group_names) == sorted(index["image_path"].unique())
    assert np.array_equal(lab.group_names[group], index["image_path"][ok])
    first = index[ok].groupby("image_path")["lab"].first()     # each image's label, by pandas
    folds = lab.fold_of_group[np.searchsorted(lab.group_names, first.index)]
    assert (folds >= 0).all()
    for c in ("a", "b", "c"):                   # stratified: each label's images in near-equal shares
        per_fold = np.bincount(folds[first.to_numpy() == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1, per_fold
    many = index.assign(lab=np.where(ok, index["sample_idx"] % 200, -1)).replace({"lab": {-1: None}})
    _, sets = _sets(many, ProbeConfig(label="lab", k=4, level="patch"), block, ("image",))
    assert sets["image"].cols.read("y").dtype == np.int16          # 200 classes: 2 bytes


@pytest.mark.parametrize("sparse", [0, 10**9])
def test_a_label_that_varies_within_a_sample_is_named(sparse):
    """Dense sample ids and sparse ones: the samples named are those pandas finds."""
    index = _index_frame(4, sparse=sparse)
    rng = np.random.default_rng(0)
    flip = rng.random(len(index)) < 0.05
    index.loc[flip & index["lab"].notna(), "lab"] = "c"
    per = index.dropna(subset=["lab"]).groupby("sample_idx")["lab"].nunique()
    bad = per.index[per > 1].to_numpy()
    assert len(bad) >= 3
    with pytest.raises(ProbeError, match=re.escape(f"varies within samples {bad[:3].tolist()}")):
        _labels(_Index(index, block=29), ProbeConfig(label="lab", k=4, level="image"))
    assert _labels(_Index(index, block=29), ProbeConfig(label="lab", k=4)).level == "patch"


def _reference_sets(index: pd.DataFrame, label: str):
    """The token sets from the whole index at once, in pandas: rows, class codes and image codes."""
    ok = index[label].notna()
    classes = sorted(index.loc[ok, label].unique())
    paths = index["image_path"].astype(str)
    if (paths == "").any():
        groups, names = pd.factorize(index["sample_idx"], sort=True)
    else:
        groups, names = pd.factorize(paths, sort=True)
    image, sink = (index["token_role"] == "image") & ok, index["is_sink"].astype(bool)
    want = {"image": image, "sinks": image & sink, "nonsinks": image & ~sink,
            "cls": (index["token_role"] == "cls") & ok}
    code = index[label].map({c: i for i, c in enumerate(classes)})
    return list(names), {k: (np.flatnonzero(m), code[m].to_numpy(int), groups[m.to_numpy()]) for k, m in want.items()}


@pytest.mark.parametrize("paths", ["files", "one_missing", "one_empty"])
def test_token_sets_scanned_from_the_store_in_blocks_equal_pandas_on_the_whole_index(tmp_path, paths):
    """Rows, labels and images of every token set, read from a store's index in 11 blocks (paths and
    roles as the block's categoricals, first seen in any order), are those pandas finds on the whole
    index; a missing path is the path "nan", and one row without a path makes images of samples."""
    rng = np.random.default_rng(5)
    n = 700
    sample = np.sort(rng.integers(0, 90, n))
    path = np.array([f"z{s:03d}.png" if s % 7 else f"a{s:03d}.png" for s in sample], dtype=object)
    if paths == "one_missing":
        path[sample == 13] = None                                      # a sample without an image file
    if paths == "one_empty":
        path[sample == 13] = ""
    role = rng.choice(["image", "cls", "text"], n)
    rows = pd.DataFrame({"sample_idx": sample, "token_role": role, "is_sink": rng.random(n) < 0.3,
                         "image": np.where(role == "text", -1, rng.integers(0, 3, n)),
                         "lab": np.where(rng.random(n) < 0.1, np.nan, rng.integers(0, 4, n)),
                         "per_image": sample % 3, "image_path": path})                   # text tokens belong to no image: -1
    w = StoreWriter(tmp_path / "c", StoreConfig(sites=("vit.out",)))
    w.add(rows, {"vit.out": torch.zeros(n, 4)})
    st = w.finalize()
    cfg = ProbeConfig(label="lab", k=4, level="patch")
    lab, sets = _sets(st, cfg, 64, ("image", "sinks", "nonsinks", "cls"))
    assert sets.pop("cls") == "cls: a patch-level label has no cls token"
    names, want = _reference_sets(st.index, "lab")
    del want["cls"]
    assert list(lab.group_names) == names and lab.classes == [0.0, 1.0, 2.0, 3.0]
    for name, (r, y, g) in want.items():
        s = sets[name]
        assert [s.cols.read(c).tolist() for c in ("rows", "y", "group")] == [r.tolist(), y.tolist(), g.tolist()], name
        assert s.unit == "rows"                                        # patch level: the unit is the row
    _, whole = _sets(st.index, cfg, 10**6, ("image",))                 # the whole frame, one block
    assert np.array_equal(whole["image"].cols.read("group"), sets["image"].cols.read("group"))
    lab, sets = _sets(st, ProbeConfig(label="per_image", k=4), 64, ("cls",))   # image-level: the CLS rows
    r, y, g = _reference_sets(st.index, "per_image")[1]["cls"]
    s = sets["cls"]
    assert lab.level == "image" and [s.cols.read(c).tolist() for c in ("rows", "y", "group")] == [r.tolist(), y.tolist(), g.tolist()]
    assert np.array_equal(s.cols.read("sample"), st.index["sample_idx"].to_numpy()[r])


@pytest.mark.parametrize("k, budget", [(1, float("inf")), (3, 0), (8, float("inf")), (40, 0)])
def test_cap_per_image_keeps_each_images_draw(k, budget, monkeypatch):
    """Capping a token set per image, chunk by chunk (images split across chunks, held or
    spilled), keeps exactly the rows the whole-set reference keeps: of image g's rows in index
    order, those whose rank is in default_rng([seed, g]).choice(count, k, replace=False)."""
    monkeypatch.setattr(columns, "CHUNK", 97)
    rng = np.random.default_rng(k)
    group = rng.integers(0, 50, 3000)                         # 50 images, ~60 rows each, unsorted
    rows = np.flatnonzero(rng.random(3000) < 0.7)
    g = group[rows]
    rank = pd.Series(g).groupby(g).cumcount().to_numpy()
    count = np.bincount(g)
    keep = np.ones(len(rows), dtype=bool)
    for img in np.flatnonzero(count > k):
        chosen = np.random.default_rng([11, img]).choice(count[img], k, replace=False)
        keep[g == img] = np.isin(rank[g == img], chosen)
    schema = {"rows": np.int32, "y": np.int8, "sample": np.int64, "group": np.int16}
    cols = _Columns(schema, budget)
    cols.append(rows=rows, y=np.zeros(len(rows), np.int8), sample=g, group=g)
    got = sets._cap(cols.close(), k, 11, schema, budget)
    assert np.array_equal(got.read("rows"), rows[keep]) and np.array_equal(got.read("group"), g[keep])
    assert np.array_equal(np.bincount(got.read("group")), np.minimum(count, k))
    if k == 40:
        assert sets._cap(cols, 10**6, 11, schema, budget) is None   # nothing over the cap: all of them, nothing drawn


def _old_codes(raw: pd.Series):
    """The label codes as one pd.factorize over the whole column (the reference)."""
    labelled = raw.notna().to_numpy()
    if raw.dtype == object:
        raw = raw.where(~labelled, raw.astype(str))
    codes, classes = pd.factorize(raw, sort=True)
    return np.where(labelled, codes, -1), list(classes)


def _label_source(raw: pd.Series, where, tmp_path):
    """An index of one row per sample holding ``raw`` as its label: a frame, or a store's index."""
    frame = pd.DataFrame({"sample_idx": np.arange(len(raw)), "token_role": "image", "lab": raw,
                          "image_path": [f"{i:03d}.png" for i in range(len(raw))]})
    if where == "frame":
        return frame
    w = StoreWriter(tmp_path / "c", StoreConfig(sites=("vit.out",)))
    w.add(frame, {"vit.out": torch.zeros(len(raw), 2)})
    return w.finalize()


@pytest.mark.parametrize("kind, where", [(k, "frame") for k in ("int", "int_nan", "float", "str", "str_nan", "mixed",
                                                                "bool_nan")]
                         + [(k, "store") for k in ("int_nan", "str_nan", "bool_nan")])
def test_label_codes_in_blocks_equal_one_factorize(kind, where, tmp_path):
    """Classes and codes gathered block by block are those of one sorted factorize of the whole
    column, for every kind of label column an index holds (missing values: code -1), also where a
    store's blocks differ in type from the whole column (booleans or ints with a missing value in
    some blocks only)."""
    rng = np.random.default_rng(1)
    n = 100
    vals = {"int": rng.integers(-3, 9, n), "float": rng.choice([0.5, -2.0, 3.25], n),
            "str": rng.choice(["cat", "Dog", "ant", "b"], n)}
    if kind in vals:
        raw = pd.Series(vals[kind])
    elif kind == "int_nan":
        raw = pd.Series(np.where(np.arange(n) > 90, np.nan, rng.integers(0, 5, n)))
    elif kind == "str_nan":
        raw = pd.Series(np.where(rng.random(n) < 0.2, None, rng.choice(["x", "y", "z"], n)), dtype="str")
    elif kind == "mixed":
        raw = pd.Series(rng.choice(np.array([1, "1", "a", 10, 2], dtype=object), n), dtype=object)
    else:
        raw = pd.Series(np.where(np.arange(n) > 90, None, rng.random(n) < 0.5), dtype=object)
    source = _label_source(raw, where, tmp_path)
    whole = source["lab"] if where == "frame" else source.read_index(["lab"])["lab"]
    index = _Index(source, block=7)
    lab = _labels(index, ProbeConfig(label="lab", k=2, level="patch"))
    codes = np.concatenate([lab.codes(b["lab"]) for _, b in index.blocks(["lab"], text="lab")])
    want_codes, want_classes = _old_codes(whole)
    assert lab.classes == want_classes and np.array_equal(codes, want_codes)


def test_first_label_of_each_image_in_blocks():
    """Each image's fold is dealt (stratified) by the label of its first labelled row in index
    order: here samples of one row each, several samples (questions) per image with labels that
    differ, an image's rows spread over several blocks."""
    rng = np.random.default_rng(2)
    group = rng.integers(0, 40, 500)
    lab = rng.choice(np.array(["a", "b", "c"], dtype=object), 500)
    lab[rng.random(500) < 0.3] = None
    frame = pd.DataFrame({"sample_idx": np.arange(500), "image_path": [f"g{g:02d}" for g in group], "lab": lab})
    cfg = ProbeConfig(label="lab", k=3)
    got = _labels(_Index(frame, block=13), cfg)
    assert got.level == "image"
    first = frame.dropna(subset=["lab"]).groupby("image_path")["lab"].first()
    last = frame.dropna(subset=["lab"]).groupby("image_path")["lab"].last()
    assert (first != last).sum() > 10                       # the first row's label is not just any row's
    have = np.searchsorted(got.group_names, first.index)
    want = labels._deal_folds(have, pd.factorize(first, sort=True)[0], len(got.group_names), "image", cfg)
    assert np.array_equal(got.fold_of_group, want) and (got.fold_of_group[have] >= 0).all()


def test_split_records_are_categorical_and_name_the_images(store):
    res = probe(store, ProbeConfig(label="lab", token_sets=("sinks", "mean"), n_boot=100, k=4))
    sp = res.splits
    assert {c: str(sp[c].dtype) for c in ("token_set", "site", "image", "side")} == dict.fromkeys(
        ("token_set", "site", "image", "side"), "category")
    paths = set(store.index["image_path"])
    for (ts, site, fold), part in sp.groupby(["token_set", "site", "fold"], observed=True):
        train, test = (set(part.loc[part["side"] == s, "image"].astype(str)) for s in ("train", "test"))
        assert train and test and not train & test and train | test <= paths


def _made_set(level, y, sample, group, fold_of_group, budget=float("inf")):
    """A token set of rows 0..n-1 (every one finite), as the probe's scan would make it."""
    schema = {"rows": np.int32, "y": np.int16, "sample": np.int64, "group": np.int32}
    cols = _Columns(schema, budget)
    cols.append(rows=np.arange(len(y)), y=y, sample=sample, group=group)
    cols.reset("ok", bool)
    cols.append(ok=np.ones(len(y), dtype=bool))
    return _Set("image", level, cols.close(), np.asarray(fold_of_group, dtype=np.int8))


@pytest.mark.parametrize("model,k,level", [("logistic", 2, "image"), ("logistic", 3, "image"), ("ridge", 3, "image"),
                                           ("logistic", 3, "patch")])
def test_out_of_fold_counts_equal_those_of_the_whole_score_matrix(model, k, level):
    """_cross_val holds counts per image and class, not the [n, K] scores: they equal those of
    every token's out-of-fold scores computed whole, each unit predicted by its tokens' mean
    probability (score), or at patch level by the token itself."""
    from mechsink.probing.linear import LinearProbe, _softmax
    from mechsink.probing.scoring import _cross_val
    x, _ = _data(600, 6, k, seed=4)
    unit = np.repeat(np.arange(100), 6)                           # 6 tokens per unit (a sample of one image)
    y = np.repeat(np.random.default_rng(5).integers(0, k, 100), 6)
    x[:, :2] += (y[:, None] == [1, 2]) * 3 * x[:, :2].std(0)   # class 1 shifts dim 0, class 2 dim 1
    fold_of_image = np.arange(100) % 4
    fold = fold_of_image[unit]
    cfg = ProbeConfig(label="lab", model=model)
    rows = _Rows(6, partial(_take, x))
    rows.block_rows = 50
    s = _made_set(level, y, unit, unit, fold_of_image)
    got = _cross_val(rows, s, [0, 1, 2, 3], False, k, cfg)
    scores = np.zeros((600, k))
    for f in range(4):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        w, b = fit_rows(rows, train, y[train], k, cfg)
        scores[test] = LinearProbe(w, b, list(range(k)), model).scores(x[test])
    values = _softmax(scores) if model == "logistic" else scores
    if level == "image":
        pred, uy, ug = pd.DataFrame(values).groupby(unit).mean().to_numpy().argmax(1), y[::6], np.arange(100)
    else:
        pred, uy, ug = values.argmax(1), y, unit
    counts, hits = np.zeros((100, k)), np.zeros((100, k))
    np.add.at(counts, (ug, uy), 1)
    np.add.at(hits, (ug, uy), pred == uy)
    assert np.array_equal(got.counts, counts) and np.array_equal(got.hits, hits)
    assert np.array_equal(got.tokens, np.bincount(y, minlength=k))
    assert np.array_equal(got.token_hits, np.bincount(y[scores.argmax(1) == y], minlength=k))
    assert got.n_units == len(uy) and got.n_tokens == 600
    assert np.array_equal(got.by_fold, pd.crosstab(fold_of_image[ug], uy).reindex(columns=range(k), fill_value=0).to_numpy())
    assert hits.sum() / counts.sum() > 0.8                          # a real signal: the argmaxes are not all 0


@pytest.mark.parametrize("order", ["runs", "shuffled"])
@pytest.mark.parametrize("budget", [float("inf"), 0])
def test_mean_pools_are_each_sample_and_image_rows_in_index_order(order, budget, monkeypatch):
    """The mean set's pools: one per (sample, image) in that order, each holding its rows in index
    order, whether the index holds them as runs (found chunk by chunk: nothing sorted) or
    interleaved, held or spilled."""
    monkeypatch.setattr(columns, "CHUNK", 29)                    # runs cut across chunks
    rng = np.random.default_rng(7)
    sample = np.repeat(np.arange(40), 6)
    image = np.tile([0, 0, 0, 1, 1, 1], 40)
    if order == "shuffled":
        p = rng.permutation(len(sample))
        sample, image = sample[p], image[p]
    rows = np.sort(rng.choice(10**5, len(sample), replace=False))
    schema = {"rows": np.int32, "y": np.int8, "sample": np.int64, "group": np.int32}
    cols = _Columns({**schema, "image": np.int64}, budget)
    cols.append(rows=rows, y=np.zeros(len(rows), np.int8), sample=sample, group=sample, image=image)
    out, members, start = sets._pools(cols.close(), schema, budget)
    frame = pd.DataFrame({"s": sample, "i": image, "r": rows})
    want = frame.groupby(["s", "i"], sort=True)
    assert np.array_equal(out.read("rows"), want["r"].first().to_numpy())
    assert np.array_equal(out.read("sample"), want["s"].first().to_numpy())
    assert np.array_equal(start, np.append(0, np.cumsum(want.size().to_numpy())))
    assert np.array_equal(members.read("rows"), np.concatenate([g["r"].to_numpy() for _, g in want]))
    assert out.spilled == members.spilled == (budget == 0)


@pytest.mark.parametrize("level, budget", [("image", float("inf")), ("image", 0), ("patch", float("inf")), ("patch", 0)])
def test_control_labels_looked_up_per_chunk_equal_those_drawn_whole(level, budget, monkeypatch):
    """The control table, built and looked up chunk by chunk, gives every row the label the whole-set
    draw gives: image level, the units' labels permuted across units; patch level, one draw from
    the label frequencies per (image, label) pair in sorted order."""
    monkeypatch.setattr(columns, "CHUNK", 31)
    rng = np.random.default_rng(8)
    n = 500
    sample = np.sort(rng.integers(0, 80, n))
    group = sample // 2
    y = (sample % 3) if level == "image" else rng.integers(0, 4, n)
    s = _made_set(level, y.astype(np.int16), sample, group, np.zeros(40), budget)
    got = sets._Control(s, np.random.default_rng([3, 1]))
    got = np.concatenate([got(c) for _, c in s.cols.chunks(("y", "sample", "group"))])
    want_rng = np.random.default_rng([3, 1])
    if level == "image":
        units, first, inv = np.unique(sample, return_index=True, return_inverse=True)
        want = want_rng.permutation(y[first].astype(np.int16))[inv]
        assert (pd.Series(got).groupby(sample).nunique() == 1).all()       # one control label per unit
    else:
        pairs, inv = np.unique(np.stack([group, y], axis=1), axis=0, return_inverse=True)
        freq = np.bincount(y, minlength=int(y.max()) + 1) / len(y)
        want = want_rng.choice(len(freq), size=len(pairs), p=freq).astype(np.int16)[inv.ravel()]
    assert np.array_equal(got, want) and not np.array_equal(got, y)


def test_a_scratch_folder_that_cannot_be_written_is_one_clear_error(store, tmp_path, monkeypatch):
    """A set past the budget needs a scratch folder: where TMPDIR cannot hold one, the probe stops
    with one line that says what to do, not a traceback from deep inside."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))        # what TMPDIR would set
    with pytest.raises(ProbeError, match=r"cannot write a token set to a scratch folder in .*missing .*set TMPDIR"):
        probe(store, ProbeConfig(label="lab", token_sets=("nonsinks",), n_boot=100, k=4), memory_mb=0)
    assert probe(store, ProbeConfig(label="lab", token_sets=("nonsinks",), n_boot=100, k=4)).frame.shape[0] == 2


def test_an_index_without_a_column_a_token_set_needs_is_one_clear_error():
    """An index written without ``is_sink`` (an older or foreign cache) can still be probed on
    the token sets that do not read it; the sink sets say what is missing in one line."""
    index = _index_frame(5).drop(columns=["is_sink"])
    cfg = ProbeConfig(label="lab", k=4)
    idx = _Index(index, block=50)
    lab = _labels(idx, cfg)
    with pytest.raises(ProbeError, match="has no column 'is_sink', which the token set 'sinks' needs"):
        _token_set("sinks", idx, lab, cfg)
    assert _token_set("image", idx, lab, cfg).n == int(index["lab"].notna().sum())
