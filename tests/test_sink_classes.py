"""LLM sink classes: propagated ViT sinks vs LLM-emerged sinks (Kang et al.) and their cross-check."""
import math

import numpy as np
import pytest
import torch

import mechsink
from mechsink import testing
from mechsink.sinks import SinkError, SinkSpec, classify_acts, detect_acts, kang_score, rms_normalize, sink_classes
from mechsink.zoo import planted

PLANTED = set(planted.PLANTED_SINKS)


@pytest.fixture(scope="module")
def planted_run():
    m = mechsink.load("planted-llava")
    images, _ = planted.load_eval(limit=4)
    b = m.prepare(images, prompts=[planted.PROMPT] * 4)
    return m, b


@pytest.fixture(scope="module")
def deep_tiny():
    """tiny-llava with 5 LLM layers, so that 'from layer 2 on' has layers on both sides."""
    m = testing.build("tiny-llava", text={"num_hidden_layers": 5})
    b = m.prepare([testing.test_image(), testing.test_image(seed=1)])
    return m, b


def test_rms_normalisation_and_kang_score_by_hand():
    h = torch.zeros(2, 100)
    h[0, 3] = 7.0                      # one dim carries everything: rms = 0.7, normalised value = 10
    h[1] = 1.0
    h[1, 5] = -3.0
    assert rms_normalize(h)[0, 3].item() == pytest.approx(10.0, rel=1e-5)
    rms1 = math.sqrt((99 + 9) / 100)
    assert kang_score(h, [3, 5]).tolist() == pytest.approx([10.0, 3 / rms1], rel=1e-5)
    assert kang_score(h, []).tolist() == [0.0, 0.0]
    with pytest.raises(SinkError, match="out of range"):
        kang_score(h, [100])


def test_planted_vit_sinks_are_propagated_class_in_every_llm_layer(planted_run):
    m, b = planted_run
    sc = sink_classes(m, b)
    t = sc.tokens
    assert sorted(t["layer"].unique()) == list(range(m.n_llm_layers))
    sinks = t[t["cls"] == "vit"]
    assert set(sinks["llm_pos"] - sinks["sample"].map(lambda s: int(np.flatnonzero(b.token_map.roles[s] == 2)[0]))) == PLANTED
    assert (t.loc[t["cls"] != "vit", "cls"] == "none").all()
    s = sc.table()
    assert s["n_vit"].tolist() == [3 * b.size] * m.n_llm_layers
    assert s["frac_vit"].tolist() == pytest.approx([3 / 36] * m.n_llm_layers)
    # the hidden-size-64 LLM cannot reach Kang's tau = 20 (max of an RMS-normalised value is sqrt(64) = 8)
    assert sc.tokens["llm_score"].max() <= 8.0 + 1e-4 and not sc.tokens["llm_sink"].any()


def test_written_massive_dim_makes_an_llm_sink_from_that_layer_on(deep_tiny):
    m, b = deep_tiny
    tm = b.token_map
    row = tm.patches[(tm.patches["sample"] == 1) & (tm.patches["row"] == 2) & (tm.patches["col"] == 1)]
    pos = int(row["llm_pos"].iloc[0])

    def edit(x):
        x = x.clone()
        x[1, pos, 7] = 5000.0
        return x
    # hidden size 32: an RMS-normalised value is at most sqrt(32) = 5.66, so tau is scaled down from 20
    sc = sink_classes(m, b, write={"llm.blocks.2.hook_resid_post": edit}, tau=4.0, from_layer=1)
    assert sc.dims == [7]                                      # discovered with massive_dims
    t = sc.tokens
    flagged = t[t["cls"] != "none"]
    assert flagged[["layer", "sample", "llm_pos", "cls"]].values.tolist() == [[l, 1, pos, "llm"] for l in (2, 3, 4)]
    assert t.loc[(t["layer"] == 2) & (t["llm_pos"] == pos) & (t["sample"] == 1), "llm_score"].item() == pytest.approx(32 ** 0.5, rel=1e-3)
    # cross-check: the written token is also the only high-norm LLM token; it is no ViT sink
    ag = sc.agreement()
    for layer in (2, 3, 4):
        llm_ref = ag[(ag["layer"] == layer) & (ag["reference"] == "llm_norm")].iloc[0]
        vit_ref = ag[(ag["layer"] == layer) & (ag["reference"] == "vit_norm")].iloc[0]
        assert (llm_ref["n_kang"], llm_ref["n_ref"], llm_ref["n_both"], llm_ref["jaccard"]) == (1, 1, 1, 1.0)
        assert (vit_ref["n_ref"], vit_ref["kang_only"], vit_ref["precision"]) == (0, 1, 0.0)
    assert ag.loc[ag["layer"] == 1, "n_kang"].tolist() == [0, 0]


def test_both_class_and_from_layer(deep_tiny):
    """A ViT sink that also lights up a sink dim is 'both'; below from_layer nothing is 'llm'."""
    m, b = deep_tiny
    tm = b.token_map
    target = tm.patches[(tm.patches["sample"] == 0) & (tm.patches["row"] == 0) & (tm.patches["col"] == 0)]
    idx = tm.index("vit_out", target)

    def spike(x):
        x = x.clone()
        x[idx] = 0.0
        x[idx + (torch.tensor([4]),)] = 400.0       # a ViT sink, carried by the projector into the LLM
        return x
    acts = m.run(b, read=["vit.out"] + [f"llm.blocks.{l}.hook_resid_post" for l in range(5)], write={"vit.out": spike})
    sinks = detect_acts(acts, tm, SinkSpec(rule="fixed", params={"tau": 100}))
    assert sinks.sinks[["sample", "patch"]].values.tolist() == [[0, 0]]
    hidden = {l: acts[f"llm.blocks.{l}.hook_resid_post"] for l in range(5)}
    pos = int(target["llm_pos"].iloc[0])
    dim = int(rms_normalize(hidden[3][0, pos]).abs().argmax())
    tau = 0.9 * min(float(kang_score(hidden[l][0, pos], [dim])) for l in range(5))   # the token passes at every layer
    sc = classify_acts(hidden, sinks, dims=[dim], tau=tau, from_layer=3, roles=tm.roles)
    t = sc.tokens[(sc.tokens["sample"] == 0) & (sc.tokens["llm_pos"] == pos)].set_index("layer")["cls"]
    assert t.tolist() == ["vit", "vit", "vit", "both", "both"]


def test_bad_layers_fail_clearly(deep_tiny):
    m, b = deep_tiny
    with pytest.raises(SinkError, match="out of range"):
        sink_classes(m, b, layers=[7])
