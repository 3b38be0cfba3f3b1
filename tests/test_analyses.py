"""The paper's analyses on the planted model, whose answers are known by construction."""
from __future__ import annotations

import numpy as np
import pytest

import mechsink
import pandas as pd

from mechsink.analyses import (AnalysisError, DecodingConfig, DecodingResult, RelevanceConfig, RelevanceMaps,
                               SubsetConfig, SubsetResult, decode_isolated, decoding_summary, relevance_maps,
                               removal_masks, subset_scores, visual_subsets)
from mechsink.report.figures import plot, relevance_figure, subset_figure
from mechsink.data.core import Sample
from mechsink.sinks.detect import detect
from mechsink.zoo.planted import EVAL_DIR, LABEL_PATCH, PLANTED_SINKS, PROMPT, load_eval

N = 6


@pytest.fixture(scope="module")
def planted():
    return mechsink.load("planted-llava")


@pytest.fixture(scope="module")
def data():
    images, rows = load_eval(N)
    return images, rows


@pytest.fixture(scope="module")
def batch(planted, data):
    return planted.prepare(data[0], [PROMPT] * N)


@pytest.fixture(scope="module")
def sinks(planted, batch):
    s = detect(planted, batch)
    assert sorted(s.sinks["patch"].unique().tolist()) == list(PLANTED_SINKS)
    return s


def test_sink_rows_at_vit_layer_0_look_at_the_corner(planted, batch, sinks, tmp_path):
    rm = relevance_maps(planted, batch, sinks, layer=0)
    f = rm.frame
    assert len(f) == N * 36 and rm.maps.shape == (N * 36, 6, 6)
    assert np.allclose(rm.maps.reshape(len(f), -1).sum(1), 1.0)
    sink = f[f["is_sink"]]
    # by construction every sink query puts (almost) all its attention on patch 0
    assert (sink["peak_patch"] == LABEL_PATCH).all() and (sink["peak_weight"] > 0.99).all()
    assert np.all(rm.maps[sink.index, 0, 0] > 0.99)
    # ordinary patches attend to themselves
    other = f[~f["is_sink"]]
    assert (other["peak_patch"] == other["patch"]).all()
    assert (f["spread"] < 0.01).all() and (f["special_mass"] < 1e-6).all()
    fig = relevance_figure(rm, batch.images)
    fig.savefig(tmp_path / "relevance.png")
    assert (tmp_path / "relevance.png").stat().st_size > 1000
    assert plot(rm) is not None                                        # the maps alone
    # the result saves and loads to an equal frame and equal maps
    back = RelevanceMaps.load(rm.save(tmp_path / "rm"))
    pd.testing.assert_frame_equal(back.frame, rm.frame)
    assert np.array_equal(back.maps, rm.maps) and back.config == rm.config == RelevanceConfig(layer=0)
    t = rm.table().set_index(["token_set", "measure"])
    assert t.loc[("sinks", "peak_weight"), "mean"] > 0.99 and rm.summary()["sinks"]["peak_weight"] > 0.99


def test_column_direction_is_the_attention_received(planted, batch, sinks):
    rm = relevance_maps(planted, batch, sinks, layer=0, direction="column", tokens="sinks")
    # patch 0 (a sink) receives attention from itself and from the two other sinks: 3 queries
    corner = rm.frame["patch"] == LABEL_PATCH
    assert corner.sum() == N
    assert np.allclose(np.sort(rm.maps[corner.to_numpy()].reshape(N, -1), axis=1)[:, -3:], 1 / 3, atol=1e-3)
    with pytest.raises(AnalysisError, match="direction"):
        relevance_maps(planted, batch, sinks, layer=0, direction="diagonal")
    with pytest.raises(AnalysisError, match="out of range"):
        relevance_maps(planted, batch, sinks, layer=7)
    # one word per token set: every image token is "image"; the old words fail naming it
    with pytest.raises(AnalysisError, match="'image'"):
        relevance_maps(planted, batch, sinks, layer=0, tokens="all")
    same = relevance_maps(planted, batch, sinks, config=RelevanceConfig(layer=0, direction="column", tokens="sinks"))
    pd.testing.assert_frame_equal(same.frame, rm.frame)


def test_isolated_sinks_decode_to_the_planted_label(planted, batch, sinks, data, tmp_path):
    res = decode_isolated(planted, batch, sinks, k=3)
    words = res.frame
    assert set(words["rank"]) == {0, 1, 2} and len(words) == N * 36 * 3
    labels = [r["planted_label"] for r in data[1]]
    top = words[(words["rank"] == 0) & words["is_sink"]]
    assert (top["word"].to_numpy() == np.array(labels)[top["sample"].to_numpy()]).all()
    summary = decoding_summary(words, labels).set_index("token_set")
    assert summary.loc["sinks", "label_rate"] == 1.0
    pd.testing.assert_frame_equal(res.table(labels).set_index("token_set"), summary)
    back = DecodingResult.load(res.save(tmp_path / "words"))
    pd.testing.assert_frame_equal(back.frame, words)
    assert back.config == res.config == DecodingConfig(k=3)
    with pytest.raises(AnalysisError, match="'image'"):
        decode_isolated(planted, batch, sinks, tokens="all")
    # a non-sink carries its own patch colour: right only when it happens to match (about 1/3)
    assert summary.loc["nonsinks", "label_rate"] < 0.6


def test_sink_only_input_keeps_the_answer_and_nonsink_only_loses_it(planted, data, tmp_path):
    samples = [Sample(id=r["id"], image_path=str(EVAL_DIR / r["image"]), prompt=PROMPT, answer=r["answer"],
                      question_type="global") for r in data[1]]
    for mode in ("drop", "knockout"):
        res = visual_subsets(planted, samples, mode=mode, batch_size=N)
        s = res.table().set_index("subset")
        assert s.loc["image", "accuracy"] == 1.0 and s.loc["sinks", "accuracy"] == 1.0
        assert s.loc["nonsinks", "accuracy"] < 1.0
        assert s.loc["sinks", "mean_visual"] == 3 and s.loc["nonsinks", "mean_visual"] == 33
        # with the sinks alone the planted LLM computes exactly what it computes with every token
        per = res.frame.pivot(index="id", columns="subset", values="logprob")
        assert np.allclose(per["sinks"], per["image"], atol=1e-4)
    assert subset_figure(res) is not None and plot(res) is not None
    assert res.summary()["image"]["accuracy"] == 1.0 and res.config.mode == "knockout"
    back = SubsetResult.load(res.save(tmp_path / "subsets"))
    pd.testing.assert_frame_equal(back.frame, res.frame)
    assert back.config == res.config and back.config.fingerprint() == res.config.fingerprint()


def test_removal_masks_cover_the_right_tokens(planted, batch, sinks):
    m = removal_masks(sinks)
    assert m.shape[0] == 3 and not m[0].any()
    assert m[1].sum(1).tolist() == [33] * N and m[2].sum(1).tolist() == [3] * N
    assert not (m[1] & m[2]).any()
    with pytest.raises(AnalysisError, match="unknown visual subsets"):
        removal_masks(sinks, ["everything"])
    with pytest.raises(AnalysisError, match="now called 'image'"):
        removal_masks(sinks, ["full"])
    with pytest.raises(AnalysisError, match="drop' or 'knockout"):
        subset_scores(planted, batch, sinks, mode="erase")


@pytest.mark.parametrize("config", [RelevanceConfig(layer=-1, direction="column", tokens="sinks", head=2),
                                    DecodingConfig(tokens="nonsinks", k=3), SubsetConfig(subsets=("sinks",), mode="knockout",
                                                                                         batch_size=4, limit=10)])
def test_configs_round_trip_through_json(config):
    back = type(config).from_json(config.to_json())
    assert back == config and back.fingerprint() == config.fingerprint() and len(config.fingerprint()) == 64
    with pytest.raises(ValueError, match="no setting"):
        type(config).from_dict({**config.to_dict(), "spec": {}})
