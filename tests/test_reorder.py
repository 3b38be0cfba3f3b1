"""Sink-to-the-front on the planted model, checked on what the language model actually receives."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import mechsink
from mechsink.data.core import Sample
from mechsink.interventions.reorder import (ReorderConfig, ReorderError, ReorderResult, evaluate_reorder, permutation,
                                            reorder_inputs, reordered_logits)
from mechsink.report.figures import plot, reorder_figure
from mechsink.trace import llm_inputs
from mechsink.sinks.detect import SinkSpec, detect
from mechsink.zoo.planted import EVAL_DIR, PLANTED_SINKS, PROMPT, load_eval

N = 4
SINK_POS = [1 + p for p in PLANTED_SINKS]        # "USER:" then 36 image tokens in patch order
IMAGE_POS = list(range(1, 37))


@pytest.fixture(scope="module")
def planted():
    return mechsink.load("planted-llava")


@pytest.fixture(scope="module")
def batch(planted):
    images, rows = load_eval(N)
    return planted.prepare(images, [PROMPT] * N, answers=[r["answer"] for r in rows])


@pytest.fixture(scope="module")
def sinks(planted, batch):
    s = detect(planted, batch)
    assert sorted(s.sinks["llm_pos"].unique().tolist()) == SINK_POS      # the planted answer
    return s


class Received:
    """Records the hidden states entering LLM block 0 and the position ids given to the rotary
    embedding and to block 0, i.e. what the language model really computes with."""

    def __init__(self, model):
        lm = model.hf.model.language_model
        self.got = {}
        self.handles = [
            lm.rotary_emb.register_forward_pre_hook(self._rotary, with_kwargs=True),
            lm.layers[0].register_forward_pre_hook(self._layer, with_kwargs=True),
        ]

    def _rotary(self, mod, args, kwargs):
        self.got["rotary_ids"] = (kwargs.get("position_ids") if "position_ids" in kwargs else args[1]).clone()

    def _layer(self, mod, args, kwargs):
        self.got["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()
        self.got["layer_ids"] = kwargs["position_ids"].clone()

    def __enter__(self):
        return self.got

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _expected_order(order: str) -> list[int]:
    rest = [p for p in IMAGE_POS if p not in SINK_POS]
    return SINK_POS + rest if order == "front" else rest + SINK_POS


@pytest.mark.parametrize("order", ["front", "end"])
@pytest.mark.parametrize("positions", ["kept", "reassigned"])
def test_reorder_moves_exactly_the_sinks(planted, batch, sinks, order, positions):
    with Received(planted) as clean:
        planted.forward(batch)
    with Received(planted) as got:
        reordered_logits(planted, batch, sinks, order, positions)
    seq = batch.inputs["input_ids"].shape[1]
    new_order = list(range(1)) + _expected_order(order) + list(range(37, seq))
    # the tokens: slot j now holds the embedding that was at new_order[j]; text untouched
    assert torch.equal(got["hidden"], clean["hidden"][:, new_order])
    ids = got["rotary_ids"].expand(N, seq)
    assert torch.equal(got["layer_ids"].expand(N, seq), ids)
    want = torch.tensor(new_order) if positions == "kept" else torch.arange(seq)
    assert torch.equal(ids, want.expand(N, seq))


def test_sinks_lead_in_their_original_order(sinks):
    perm = permutation(sinks, "front")
    assert perm[:, 1:4].tolist() == [SINK_POS] * N
    assert perm[:, 4:37].tolist() == [[p for p in IMAGE_POS if p not in SINK_POS]] * N
    assert torch.equal(permutation(sinks, "original"), torch.arange(perm.shape[1]).expand_as(perm))


def test_no_sinks_changes_nothing(planted, batch):
    none = detect(planted, batch, SinkSpec(rule="fixed", params={"tau": 1e9}))
    assert not none.patches["is_sink"].any()
    base = planted.forward(batch)
    for order in ("original", "front", "end"):
        for positions in ("kept", "reassigned"):
            assert torch.equal(reordered_logits(planted, batch, none, order, positions), base)


def test_image_without_sinks_is_untouched_in_a_mixed_batch(planted, batch, sinks):
    mixed = detect(planted, batch)
    mixed.patches.loc[mixed.patches["sample"] == 1, "is_sink"] = False
    base = planted.forward(batch)
    out = reordered_logits(planted, batch, mixed, "front", "kept")
    assert torch.equal(out[1], base[1])
    assert not torch.equal(out[0, 1:37], base[0, 1:37])


def test_answers_are_position_invariant_in_the_planted_model(planted, batch, sinks):
    """The planted LLM reads sinks by content and its rotary embedding is the identity, so the
    prediction at the last prompt token survives any reordering (a known answer)."""
    last = batch.last_pos
    base = planted.forward(batch)[torch.arange(N), last]
    for order in ("front", "end"):
        for positions in ("kept", "reassigned"):
            out = reordered_logits(planted, batch, sinks, order, positions)[torch.arange(N), last]
            assert torch.allclose(out, base, atol=1e-4)


def test_evaluate_reorder_reports_accuracy_per_question_type(planted, tmp_path):
    _, rows = load_eval(8)
    data = [Sample(id=r["id"], image_path=str(EVAL_DIR / r["image"]), prompt=PROMPT, answer=r["answer"],
                   question_type="global" if i % 2 else "local") for i, r in enumerate(rows)]
    res = evaluate_reorder(planted, data, batch_size=4)
    assert set(res.frame["condition"]) == {"original", "front/kept", "front/reassigned", "end/kept", "end/reassigned"}
    assert len(res.frame) == 8 * 5 and res.frame["n_sinks"].eq(3).all()
    s = res.table()
    assert set(s["question_type"]) == {"global", "local"}
    assert (s["accuracy"] == 1.0).all() and (s["ci_low"] < 1.0).all()
    assert (s.loc[s["condition"] != "original", "delta"] == 0.0).all()
    assert reorder_figure(res) is not None and plot(res) is not None
    assert res.summary()["front/kept"]["delta"] == 0.0 and res.meta["n_samples"] == 8
    back = ReorderResult.load(res.save(tmp_path / "reorder"))
    pd.testing.assert_frame_equal(back.frame, res.frame)
    assert back.config == res.config == ReorderConfig(batch_size=4)
    # the same run from a config
    again = evaluate_reorder(planted, data, config=ReorderConfig(orders=("front",), positions=("kept",), batch_size=4))
    pd.testing.assert_frame_equal(again.frame.reset_index(drop=True),
                                  res.frame[res.frame["condition"].isin(["original", "front/kept"])].reset_index(drop=True))


def test_reorder_config_round_trips_through_json():
    cfg = ReorderConfig(orders=("end",), positions=("reassigned",), batch_size=2, limit=5)
    back = ReorderConfig.from_json(cfg.to_json())
    assert back == cfg and back.fingerprint() == cfg.fingerprint() and len(cfg.fingerprint()) == 64
    assert ReorderConfig().fingerprint() != cfg.fingerprint()
    with pytest.raises(ReorderError, match="unknown order"):
        ReorderConfig(orders=("middle",))


def test_bad_arguments_fail_clearly(planted, batch, sinks):
    with pytest.raises(ReorderError, match="unknown order"):
        permutation(sinks, "middle")
    with pytest.raises(ReorderError, match="position mode"):
        reorder_inputs(llm_inputs(planted, batch), permutation(sinks, "front"), "shuffled")
