"""Ranking selections (fastv, vit_attention, norm_topk): known answers from the planted weights."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

import mechsink
from mechsink.importance import score_table
from mechsink.selection import (Selection, SelectionError, fastv, norm_topk, parse_all, resolve, top_rows,
                                vit_attention)
from mechsink.zoo import planted as P


def jaccard(a, b):
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


@pytest.fixture(scope="module")
def planted():
    images, rows = P.load_eval(6)
    m = mechsink.load("planted-llava")
    b = m.prepare(images, [r["prompt"] for r in rows], answers=[r["answer"] for r in rows])
    return m, b


def test_parse_and_names():
    assert str(fastv(2, 0.5)) == "fastv(layer=2, ratio=0.5)"
    assert Selection.parse("fastv(2, 0.5)") == fastv(2, 0.5)
    assert Selection.parse("vit_attention(k=3, layer=0)") == vit_attention(k=3, layer=0)
    assert Selection.parse("norm_topk(3)") == norm_topk(3)
    assert parse_all("sinks, fastv(2, 0.5), random(k=3)")[1].score_column == "fastv@2"
    assert vit_attention(0.1).score_column == "vit_attention@last"
    for bad in [lambda: Selection("fastv", ratio=0.5), lambda: Selection("norm_topk"),
                lambda: fastv(1, 0.5, k=3), lambda: fastv(1, 1.5), lambda: Selection("sinks", ratio=0.5)]:
        with pytest.raises(SelectionError):
            bad()


def test_top_rows_ties_go_to_the_earlier_patch():
    import pandas as pd
    t = pd.DataFrame({"sample": [0] * 4 + [1] * 4, "llm_pos": range(8), "s": [1, 2, 2, 0, 5, 5, 5, 5]})
    assert top_rows(t, "s", k=2).tolist() == [False, True, True, False, True, True, False, False]
    assert top_rows(t, "s", ratio=0.25).sum() == 2
    with pytest.raises(SelectionError):
        top_rows(t, "missing", k=1)


def test_planted_overlaps_follow_the_weights(planted):
    """Expected from the weights: the LLM layer-0 text query has logit 25 on the three sinks
    (massive dim 300) and 0 elsewhere, so fastv at layer 0 picks exactly the sinks (Jaccard 1),
    each with attention e^25 / (3 e^25 + n_others). LLM layer 1 and ViT layer 1 are all zeros:
    uniform attention, exact ties, the first patches 0, 1, 2 (Jaccard 1/5). In ViT layer 0 the CLS
    query has logit 30 on itself and 0 on every patch: ties again, each patch getting
    1 / (e^30 + 36). norm_topk(3) is the sinks (norm 300 vs < 10)."""
    m, b = planted
    sels = [fastv(0, k=3), fastv(1, k=3), vit_attention(k=3), vit_attention(k=3, layer=0), norm_topk(3)]
    t = score_table(m, b, sels, sinks=P.PLANTED_SINKS)
    r = resolve([*sels, "sinks"], t, b.token_map)
    expect = {"fastv(layer=0, k=3)": 1.0, "fastv(layer=1, k=3)": 0.2, "vit_attention(k=3)": 0.2,
              "vit_attention(layer=0, k=3)": 0.2, "norm_topk(k=3)": 1.0}
    patch, sample = t["patch"].to_numpy(), t["sample"].to_numpy()
    for name, row in zip(r.names[:-1], r.select[:-1]):
        for s in range(b.size):
            got = jaccard(patch[row & (sample == s)], P.PLANTED_SINKS)
            assert got == expect[name], (name, s, got)
    s0 = t[t["sample"] == 0]
    n_seq = int(b.last_pos[0]) + 1                           # keys the last prompt token sees
    sink_share = math.exp(25) / (3 * math.exp(25) + n_seq - 3)
    assert np.allclose(s0.loc[s0["is_sink"], "fastv@0"], sink_share, rtol=1e-4)
    assert np.allclose(s0["vit_attention@0"], 1 / (math.exp(30) + 36), rtol=1e-3)
    assert np.allclose(s0["vit_attention@last"], 1 / 37, rtol=1e-5)


def test_ratio_counts_patches(planted):
    m, b = planted
    t = score_table(m, b, [fastv(0, 0.1)], sinks=P.PLANTED_SINKS)
    r = resolve([fastv(0, 0.1)], t, b.token_map)
    assert r.select[0].sum() == b.size * round(0.1 * 36)


# -- compare_selections ---------------------------------------------------------------------------
def _compare(name, n):
    from mechsink.analyses.compare import CompareConfig, compare_selections
    from mechsink.metrics import Metric
    images, rows = P.load_eval(n)
    m = mechsink.load(name)
    b = m.prepare(images, [r["prompt"] for r in rows], answers=[r["answer"] for r in rows])
    cfg = CompareConfig(selections=("sinks", "fastv(0, 0.5)", "vit_attention(0.5)", "norm_topk(3)"), n_draws=8,
                        batch_size=n, metric=Metric("logprob"), n_boot=500, n_perm=2000)
    return compare_selections(m, [b], cfg, sinks=P.PLANTED_SINKS)


def test_compare_separates_sinks_on_planted():
    res = _compare("planted-llava", 16)
    t = res.table().set_index("selection")
    for sel in ["sinks", "fastv(layer=0, ratio=0.5)", "norm_topk(k=3)"]:     # the same three patches
        assert t.loc[sel, "diff_low"] > 0.5 and t.loc[sel, "p_value"] < 0.01
        assert t.loc[sel, "J:sinks"] == 1.0
    assert abs(t.loc["vit_attention(ratio=0.5)", "effect"]) < 1e-5             # patches 0, 1, 2 at equal count...
    assert t.loc["vit_attention(ratio=0.5)", "J:sinks"] == 0.2                   # ...share only patch 0 with the sinks
    assert (res.frame.loc[res.frame["set"] == "random", "n_tokens"] == 3).all()
    from mechsink.report.figures import plot
    assert len(plot(res).axes) >= 2
    s = res.summary()
    assert s["n"] == 16 and set(s["selections"]) == set(t.index)
    from mechsink.analyses.compare import CompareResult
    assert CompareResult._from_saved(res.frame, res.config, res.meta).table().equals(res.table())


def test_compare_does_not_separate_on_the_null_twin():
    """One fixed data set (the first 64 bundled images) is one draw of the null; the test's
    false-positive rate over many draws is checked in test_ablation."""
    t = _compare("planted-llava-null", 64).table().set_index("selection")
    assert (t["p_value"] > 0.05).all()
    assert ((t["diff_low"] < 0) & (t["diff_high"] > 0)).all()
    assert (t["diff"].abs() < 0.1).all()


def test_compare_config_refuses_sinks_at_a_fixed_count():
    from mechsink.analyses.compare import CompareConfig, CompareError
    with pytest.raises(CompareError, match="norm_topk"):
        CompareConfig(selections=("sinks", "fastv(0, 0.5)"), k=3)
    with pytest.raises(CompareError):
        CompareConfig(selections=("random",))
    assert CompareConfig(selections=("norm_topk(3)",), k=3).k == 3
