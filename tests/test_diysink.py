"""DIYSink on the planted model: exact initialisation, training lowers the loss, routing."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import mechsink
from mechsink.data.core import Sample
from mechsink.interventions.diysink import (DIYSinkError, DualEvalConfig, DualProjector, DualResult, DualTrainConfig,
                                            QuestionEncoder, ReweightConfig, Reweighter, ReweightPolicy, RuleRouter,
                                            evaluate_dual, mean_loss, route, train_dual, train_reweighter)
from mechsink.sinks.detect import SinkSpec, detect
from mechsink.zoo.planted import EVAL_DIR, PLANTED_SINKS, PROMPT, load_eval

# Hand-set weights with a massive value of 300 make the planted model stiff: Adam steps must be small.
LR = 1e-5


@pytest.fixture(scope="module")
def planted():
    return mechsink.load("planted-llava")


def _samples(n: int, **labels) -> list[Sample]:
    _, rows = load_eval(n)
    return [Sample(id=r["id"], image_path=str(EVAL_DIR / r["image"]), prompt=PROMPT, answer=r["answer"],
                   question_type=labels.get("question_type", "global"),
                   labels={k: v for k, v in labels.items() if k != "question_type"}) for r in rows]


@pytest.fixture(scope="module")
def batch(planted):
    images, rows = load_eval(4)
    return planted.prepare(images, [PROMPT] * 4, answers=[r["answer"] for r in rows])


@pytest.mark.parametrize("name", ["planted-llava", "tiny-llava"])
def test_dual_projector_starts_as_the_original(name):
    model = mechsink.load(name)
    images, _ = load_eval(3)
    b = model.prepare([im.resize((32, 32)) if name == "tiny-llava" else im for im in images], [PROMPT] * 3)
    base = model.forward(b)
    dual = DualProjector.from_model(model)
    with dual.attach(model):
        out = model.forward(b)
    assert torch.allclose(out, base, atol=1e-6, rtol=0)
    assert torch.equal(model.forward(b), base)            # detached again


def test_dual_routes_tokens_by_the_detected_sinks(planted, batch):
    dual = DualProjector.from_model(planted)
    x = planted.run(batch, read=["vit.out", "proj.out"])
    mask = dual.sink_mask(x["vit.out"])
    assert [torch.nonzero(m).flatten().tolist() for m in mask] == [list(PLANTED_SINKS)] * 4
    sinks = detect(planted, batch)
    assert mask.flatten().tolist() == sinks.patches.sort_values(["sample", "patch"])["is_sink"].tolist()
    with torch.no_grad():
        with dual.weighting(batch, None, "sink"):
            only_sinks = dual(x["vit.out"])
        with dual.weighting(batch, torch.tensor([[2.0, 0.5]] * 4)):
            scaled = dual(x["vit.out"])
    assert torch.equal(only_sinks[mask], x["proj.out"][mask]) and not only_sinks[~mask].any()
    assert torch.allclose(scaled[mask], 2 * x["proj.out"][mask])
    assert torch.allclose(scaled[~mask], 0.5 * x["proj.out"][~mask])


def test_stage_1_and_stage_2_lower_the_loss(planted):
    """Each stage, from the original projector, lowers the loss it optimises on its (full) batch."""
    train = _samples(20)

    def losses(dual):
        return {m: mean_loss(planted, dual, train, m, batch_size=20) for m in ("sink", "nonsink", "both")}

    dual = DualProjector.from_model(planted)
    before = losses(dual)
    assert before["both"] == before["sink"] < before["nonsink"]     # the planted LLM reads the sinks only
    log1 = train_dual(planted, dual, train, stage=1, epochs=3, lr=LR, batch_size=20)
    after1 = losses(dual)
    assert list(log1["mode"]) == ["sink", "nonsink"] * 3
    assert after1["sink"] < before["sink"] and after1["nonsink"] < before["nonsink"]

    dual2 = DualProjector.from_model(planted)
    log2 = train_dual(planted, dual2, train, stage=2, epochs=3, lr=LR, batch_size=20)
    after2 = losses(dual2)
    assert set(log2["mode"]) == {"both"} and after2["both"] < before["both"]
    assert all(p.grad is None for p in planted.hf.parameters())     # the model itself never learns
    print("DIYSink losses: before", before, "after stage 1", after1, "after stage 2", after2)


@pytest.fixture(scope="module")
def encoder():
    return QuestionEncoder()


def test_question_encoder_is_frozen_and_deterministic(encoder):
    q = ["how many items ?", "what is in the top-left corner ?", "how many items ?"]
    e = encoder.encode(q)
    assert e.shape == (3, encoder.dim) == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(e[0], e[2]) and not torch.allclose(e[0], e[1])
    assert not e.requires_grad


def test_reweighter_trains_on_frozen_question_embeddings(planted, encoder, tmp_path):
    train = _samples(20)
    dual = DualProjector.from_model(planted)
    rw = Reweighter(encoder.dim)
    policy = ReweightPolicy(rw, encoder)
    assert torch.equal(policy(train[:2]), torch.ones(2, 2))       # starts as the plain dual projector
    before = mean_loss(planted, dual, train, weights=policy, batch_size=20)
    state = {k: v.clone() for k, v in dual.state_dict().items()}
    log = train_reweighter(planted, dual, rw, encoder, train, epochs=10, lr=1e-2, batch_size=20)
    after = mean_loss(planted, dual, train, weights=policy, batch_size=20)
    assert len(log) == 10 and after < before
    assert log["w_sink"].iloc[-1] > 1.0              # sharper sinks sharpen the planted answer
    assert all(torch.equal(v, dual.state_dict()[k]) for k, v in state.items())    # projectors frozen
    rw2 = Reweighter.load(rw.save(tmp_path / "rw"))
    emb = encoder.encode([PROMPT])
    assert torch.equal(rw2(emb), rw(emb))
    print("reweighter loss", before, "->", after)


def test_rule_router_and_its_effect(planted, tmp_path):
    assert route("simple", "global") == (1.0, 0.0) and route("symbolic", "global") == (1.0, 0.0)
    assert route("complex", "local") == (0.0, 1.0)
    assert route("complex", "global") == route("simple", "local") == route("simple", "mixed") == (1.0, 1.0)
    with pytest.raises(DIYSinkError, match="image kind"):
        route("busy", "global")
    dual = DualProjector.from_model(planted)
    router = RuleRouter()
    res = evaluate_dual(planted, dual, _samples(8, image_kind="simple"), weights=router)
    sinks_only = res.frame
    local = _samples(8, image_kind="complex", question_type="local")
    nonsinks_only = evaluate_dual(planted, dual, local, weights=router).frame
    assert (sinks_only[["w_sink", "w_nonsink"]].to_numpy() == [1, 0]).all() and sinks_only["correct"].all()
    assert (nonsinks_only[["w_sink", "w_nonsink"]].to_numpy() == [0, 1]).all()
    assert nonsinks_only["correct"].mean() < 1.0
    assert res.summary()["accuracy"] == 1.0 and res.meta["weights"] == "RuleRouter"
    back = DualResult.load(res.save(tmp_path / "dual_eval"))
    pd.testing.assert_frame_equal(back.frame, res.frame)
    assert back.config == res.config == DualEvalConfig()
    # without an image_kind label the router measures the image
    flat = Sample(id="flat", image_path=None, prompt="q", question_type="global",
                  image_loader=lambda: _png(np.zeros((32, 32, 3), np.uint8)))
    assert router([flat]).tolist() == [[1.0, 0.0]]


def _png(a: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_save_load_and_bad_input(planted, batch, tmp_path):
    dual = DualProjector.from_model(planted)
    with torch.no_grad():
        dual.f_sink.linear_2.bias.add_(0.5)
    loaded = DualProjector.load(dual.save(tmp_path / "dual"), planted)
    with dual.attach(planted):
        a = planted.forward(batch)
    with loaded.attach(planted):
        b = planted.forward(batch)
    assert torch.equal(a, b)
    with pytest.raises(DIYSinkError, match="vit.out"):
        DualProjector.from_model(planted, SinkSpec(site="vit.blocks.0.hook_resid_post"))
    with pytest.raises(DIYSinkError, match="stage"):
        train_dual(planted, dual, _samples(2), stage=3)
    with pytest.raises(DIYSinkError, match="no saved dual"):
        DualProjector.load(tmp_path, planted)


@pytest.mark.parametrize("config", [DualTrainConfig(stage=2, epochs=3, lr=0.1, batch_size=4, max_steps=7, seed=1),
                                    ReweightConfig(epochs=2, lr=0.5, batch_size=5, seed=3),
                                    DualEvalConfig(mode="sink", batch_size=2)])
def test_diysink_configs_round_trip_through_json(config):
    back = type(config).from_json(config.to_json())
    assert back == config and back.fingerprint() == config.fingerprint() and len(config.fingerprint()) == 64
    assert type(config)().fingerprint() != config.fingerprint()
    with pytest.raises(ValueError, match="no setting"):
        type(config).from_dict({**config.to_dict(), "steps": 1})
    with pytest.raises(DIYSinkError, match="mode"):
        DualEvalConfig(mode="neither")
