"""Test-time registers: the register-neuron search finds the planted neuron, and shifting it to an
extra token removes the sinks, breaks the planted model's answer and leaves the null twin alone."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import mechsink
from mechsink.interventions.registers import RegisterConfig, RegisterError, RegisterResult, register_neurons, registers
from mechsink.metrics import Metric
from mechsink.models import wrap
from mechsink.zoo import planted as P

N = 48
ACC = Metric("accuracy", answers=P.COLORS)
FAST = dict(batch_size=N, n_boot=300, n_perm=1000, metric=ACC)


@pytest.fixture(scope="module")
def data():
    return P.load_eval(N)


def batch(m, data):
    images, rows = data
    return m.prepare(images, [r["prompt"] for r in rows], answers=[r["answer"] for r in rows])


def moved_neuron(layer=1, neuron=17, sinks=(5, 30)):
    """A planted checkpoint variant in the hidden style: the one sink-making MLP neuron (layer 0,
    neuron 0 in planted-llava) moved to another neuron of another early block, other sinks."""
    hf, proc = P.planted_llava(sinks=sinks)
    layers = hf.model.vision_tower.encoder.layers
    with torch.no_grad():
        src, dst = layers[0].mlp, layers[layer].mlp
        w1, w2 = src.fc1.weight[0].clone(), src.fc2.weight[:, 0].clone()
        src.fc1.weight[0] = 0
        src.fc2.weight[:, 0] = 0
        dst.fc1.weight[neuron] = w1
        dst.fc2.weight[:, neuron] = w2
    return wrap(hf, proc, name="planted-llava-moved", source="test")


def test_search_ranks_the_planted_neuron_first(data):
    m = mechsink.load("planted-llava")
    f = register_neurons(m, [batch(m, data)], RegisterConfig(**FAST))
    assert (f.loc[0, "layer"], f.loc[0, "neuron"]) == (0, 0)
    assert f.loc[0, "outlier_mean"] == pytest.approx(P.FLAG_GAIN, rel=1e-4)     # GELU(10) at every sink
    assert f["register"].sum() == 1 and f.loc[0, "register"]
    v = moved_neuron()
    b = batch(v, data)
    from mechsink.sinks.detect import SinkSpec
    assert sorted(set(SinkSpec().detect(v, b).patches.query("is_sink")["patch"])) == [5, 30]
    f = register_neurons(v, [b], RegisterConfig(**FAST))
    assert (f.loc[0, "layer"], f.loc[0, "neuron"]) == (1, 17) and f["register"].sum() == 1


def test_shift_removes_sinks_and_the_planted_answer(data):
    """After the shift the massive dim is zero everywhere: the LLM's reading head attends
    uniformly, so its answer is the strongest channel of 3 x corner colour (the three sinks still
    hold it in their label dims) + the other 33 patches' own colours -- predicted per image from
    the pixels. That is not quite chance (1/3): the corner's weight 3/36 leaves a bias towards the
    right answer (0.60 on these 48 images), which the per-image prediction pins down exactly."""
    m = mechsink.load("planted-llava")
    res = registers(m, [batch(m, data)], RegisterConfig(**FAST))
    s = res.summary()
    assert s["neurons"] == [[0, 0]] and s["sinks_before"] == 3.0 and s["sinks_after"] == 0.0
    assert s["norm_before"]["q1"] > 250 and s["norm_after"]["q1"] < 10
    assert s["clean"]["mean"] == 1.0 and s["shifted"]["mean"] < 0.7 and s["diff"]["ci_high"] < 0
    images, rows = data
    pred = []
    for im in images:
        c = P.patch_colors(im)
        total = 3 * c[P.LABEL_PATCH] + np.delete(c, P.PLANTED_SINKS, axis=0).sum(0)
        pred.append(P.COLORS[int(np.argmax(total))] == P.label_of(im))
    assert np.array_equal(res.per_sample()["shifted"].to_numpy(), np.asarray(pred, dtype=float))
    from mechsink.report.figures import plot
    assert plot(res).axes
    again = RegisterResult._from_saved(res.frame, res.config, res.meta)
    assert again.summary() == s


def test_null_twin_stays(data):
    m = mechsink.load("planted-llava-null")
    lp = RegisterConfig(**{**FAST, "metric": Metric("logprob")})
    res = registers(m, [batch(m, data)], lp)
    s = res.summary()
    assert s["sinks_after"] == 0.0
    ps = res.per_sample()
    assert np.allclose(ps["shifted"], ps["clean"], atol=1e-4)        # the null LLM never read the massive dim


def test_no_outliers_is_an_error(data):
    m = mechsink.load("planted-llava")
    with pytest.raises(RegisterError):
        register_neurons(m, [batch(m, data)], RegisterConfig(**FAST), sinks=[])
