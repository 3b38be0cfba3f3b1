"""VAR attention redistribution: p = 0 is the clean run, and on planted-llava the metric moves as
the wiring predicts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import mechsink
from mechsink.engine import clean
from mechsink.interventions.var import VarConfig, VarError, VarResult, redistribute, var
from mechsink.metrics import Metric
from mechsink.trace import edit_attention
from mechsink.zoo import planted as P

FAST = dict(batch_size=16, n_boot=300, n_perm=1000)


@pytest.fixture(scope="module")
def planted():
    images, rows = P.load_eval(16)
    m = mechsink.load("planted-llava")
    return m, m.prepare(images, [r["prompt"] for r in rows], answers=[r["answer"] for r in rows])


def test_redistribute_moves_p_of_sink_attention_to_the_other_image_tokens():
    w = torch.tensor([[[[0.1, 0.4, 0.2, 0.2, 0.1]]]])           # keys: text, sink, image, image, text
    image = torch.tensor([[False, True, True, True, False]])
    sink = torch.tensor([[False, True, False, False, False]])
    new, rows = redistribute(w, image, sink, torch.tensor([[True]]), 0.5, 0.2, 1.0)
    assert rows.all()
    assert torch.allclose(new, torch.tensor([[[[0.1, 0.2, 0.3, 0.3, 0.1]]]]))
    new, rows = redistribute(w, image, sink, torch.tensor([[True]]), 0.5, 0.2, 0.4)    # sink share 0.5 > rho
    assert not rows.any() and torch.equal(new, w)


def test_p_zero_is_bit_identical_and_an_identity_edit_is_eager_exact(planted):
    m, b = planted
    met = Metric("logprob")
    res = var(m, [b], VarConfig(p=0.0, rho=1.0, metric=met, **FAST), sinks=P.PLANTED_SINKS)
    base = clean(m, b, met)["value"]
    assert np.array_equal(res.frame["value"].to_numpy(), np.asarray(base, dtype=float))
    assert (res.frame["effect"] == 0).all()
    with edit_attention(m, {0: lambda w: w, 1: lambda w: w}):     # the edit path itself: eager numerics
        again = clean(m, b, met)["value"]
    assert torch.allclose(torch.as_tensor(again), torch.as_tensor(base), atol=1e-5)


def test_planted_metric_moves_as_the_wiring_predicts(planted):
    """The layer-0 reading head puts ~all its image attention on the three sinks: with the
    paper's rho = 0.5 it is not image-centric and VAR changes nothing that matters (layer 1 is a
    zero layer); with rho = 1 moving sink attention onto patches whose label dims hold their own
    colours dilutes the corner colour: log-prob falls monotonically in p, and at p = 1 accuracy
    falls towards chance."""
    m, b = planted
    lp = Metric("logprob")
    default = var(m, [b], VarConfig(p=0.6, metric=lp, **FAST), sinks=P.PLANTED_SINKS).summary()
    assert abs(default["diff"]["mean"]) < 1e-5
    diffs = [var(m, [b], VarConfig(p=p, rho=1.0, metric=lp, **FAST), sinks=P.PLANTED_SINKS).summary()["diff"]
             for p in (0.3, 0.6, 1.0)]
    means = [d["mean"] for d in diffs]
    assert means[0] > means[1] > means[2] and all(d["ci_high"] < 0 for d in diffs)
    acc = var(m, [b], VarConfig(p=1.0, rho=1.0, metric=Metric("accuracy", answers=P.COLORS), **FAST),
              sinks=P.PLANTED_SINKS)
    assert acc.summary()["clean"]["mean"] == 1.0 and acc.summary()["var"]["mean"] < 0.6
    from mechsink.report.figures import plot
    assert plot(acc).axes
    again = VarResult._from_saved(acc.frame, acc.config, acc.meta)
    assert again.summary() == acc.summary()


def test_config_checks():
    with pytest.raises(VarError):
        VarConfig(p=1.5)
