"""Sink vs matched-random ablation: known answers on the planted models, calibration on the null
twin, and every mode checked against an independent reference run."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

import mechsink
from mechsink.ablation import AblationConfig, AblationError, AblationResult, ablate, cell_means
from mechsink.engine import Plan, clean, execute
from mechsink.metrics import Metric, MetricError, gather_logits
from mechsink.report.figures import ablation_figure
from mechsink.selection import SelectionError, draw_random, sink_table
from mechsink.stats import paired_permutation_test
from mechsink.testing import test_image as make_image
from mechsink.trace import zero_tokens
from mechsink.zoo import planted as P

SINKS = P.PLANTED_SINKS




@pytest.fixture(scope="module")
def planted():
    images, rows = P.load_eval(16)
    m = mechsink.load("planted-llava")
    b = m.prepare(images, [r["prompt"] for r in rows], answers=[r["answer"] for r in rows])
    return m, b


@pytest.fixture(scope="module")
def tiny():
    m = mechsink.load("tiny-llava")
    b = m.prepare([make_image(seed=0), make_image(seed=1)], ["is there a cat ?", "what color is the cat in this picture ?"],
                  answers=["yes", "no"])
    return m, b


# -- known answers on the planted models ----------------------------------------------------------
@pytest.mark.parametrize("mode", ["zero", "mean", "resample", "drop", "knockout"])
def test_sinks_move_the_answer_far_more_than_matched_random(planted, mode):
    m, b = planted
    cfg = AblationConfig(mode=mode, n_draws=16, metric=Metric("logprob"), batch_size=16, match=("border",))
    res = ablate(m, [b], cfg, sinks=SINKS)
    s = res.comparison()
    assert s.n == 16 and s.n_draws == 16
    assert s.sink.ci_low > s.random.ci_high          # the CIs separate
    assert s.p_value < 0.01
    assert s.sink.mean > 0.5 and abs(s.random.mean) < 1e-3    # the LLM reads the answer from the sinks only
    f = res.frame
    assert set(f["condition"]) == {"sink", "random"}
    assert (f.loc[f["condition"] == "sink", "patches"] == "0 14 21").all()
    assert (f["n_tokens"] == 3).all()


def test_sink_ablation_drops_accuracy_to_chance(planted):
    m, b = planted
    res = ablate(m, [b], AblationConfig(n_draws=4, metric=Metric("accuracy", answers=P.COLORS), batch_size=16), sinks=SINKS)
    f = res.frame
    assert (f["clean"] == 1.0).all()                                 # the planted model is always right
    assert f.loc[f["condition"] == "random", "value"].mean() == 1.0
    assert f.loc[f["condition"] == "sink", "value"].mean() < 0.6     # chance is 1/3


def test_null_twin_false_positive_rate_is_nominal():
    """On the null twin the sinks are exchangeable with any three other patches: the test of
    "sink effect > random effect" must reject at about alpha. Effects of 512 fresh images are
    computed once; 2000 experiments of 12 images x 8 draws are re-drawn from them."""
    m = mechsink.load("planted-llava-null")
    rng = np.random.default_rng(2024)
    images = [P.make_image(rng) for _ in range(512)]
    batches = [m.prepare(images[i:i + 64], [P.PROMPT] * 64, answers=[P.label_of(im) for im in images[i:i + 64]])
               for i in range(0, 512, 64)]
    res = ablate(m, batches, AblationConfig(n_draws=16, rows_per_forward=512), sinks=SINKS)
    sink, rand, _ = res.effects()
    assert sink.shape == (512,) and rand.shape == (512, 16)
    assert np.std(sink) > 0.05                      # the null's effects are real, just not sink-specific
    g = np.random.default_rng(1)
    p = []
    for rep in range(2000):
        idx = g.choice(512, 12, replace=False)
        draws = g.choice(16, 8, replace=False)
        p.append(paired_permutation_test(sink[idx], rand[idx][:, draws].mean(1)))
    p = np.asarray(p)
    assert 0.03 <= (p < 0.05).mean() <= 0.075
    assert (p < 0.01).mean() <= 0.02


# -- modes against independent references -----------------------------------------------------------
def _logprob(m, logits, targets):
    return Metric("logprob").score(gather_logits(logits, targets.keep(logits.shape[1])), targets)


def test_batched_draws_equal_one_run_per_draw(tiny):
    """Stacked copies (ViT path, projector path, LLM path) give what separate edited runs give."""
    m, b = tiny
    cfg_sets = {"vit.blocks.1.hook_resid_post": "vit", "proj.out": "proj", "llm.blocks.1.hook_resid_pre": "llm"}
    for site, axis in cfg_sets.items():
        res = ablate(m, [b], AblationConfig(site=site, n_draws=3, batch_size=2), sinks=(0, 5, 10))
        t = Metric("logprob").targets(m, b)
        for r in res.frame.itertuples():
            s = r.sample
            patches = [int(p) for p in r.patches.split()]
            tm = b.token_map
            rows = tm.patches[(tm.patches["sample"] == s) & (tm.patches["row"] * 4 + tm.patches["col"]).isin(patches)]
            ref = _logprob(m, m.run(b, write={site: zero_tokens(tm.index(axis, rows))})["llm.logits"], t)[s]
            assert abs(r.value - float(ref)) < 1e-5, (site, r)


def _shortened(m, b, sample, drop_pos):
    """The sample's LLM input embeddings (read through the trace) without ``drop_pos``, plus the
    original positions of the kept tokens."""
    emb = m.run(b, read=["llm.embed"])["llm.embed"][sample]
    keep = b.inputs["attention_mask"][sample].bool().clone()
    keep[list(drop_pos)] = False
    return emb[keep][None], torch.nonzero(keep)[:, 0][None]


def _lm(m, embeds, position_ids=None):
    with torch.no_grad():
        h = m.hf.model.language_model(inputs_embeds=embeds, position_ids=position_ids).last_hidden_state
        return m.hf.lm_head(h)


def test_drop_equals_the_prompt_built_without_the_image(tiny):
    m, b0 = tiny
    b = m.prepare([make_image(seed=3)], ["is there a cat ?"], answers=["yes"])
    metric = Metric("logprob", teacher_forced=True)
    base = clean(m, b, metric)
    everything = np.ones((1, len(b.token_map.patches)), dtype=bool)
    drop = b.token_map.mask("llm", everything, tuple(b.inputs["input_ids"].shape))
    out = execute(m, b, Plan(1, drop=drop), metric, base["targets"], inputs=base["inputs"], want_next=True)
    text = b.prompts[0].replace("<image>", "")
    ids = m.processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    keep = b.inputs["input_ids"][0] != m.hf.config.image_token_id
    assert torch.equal(ids[0], b.inputs["input_ids"][0][keep])     # the same prompt, no image tokens
    with torch.no_grad():
        ref = m.hf(input_ids=ids).logits
    t = base["targets"].shifted(torch.tensor([-16]))
    assert torch.allclose(out["next"][0, 0], ref[0, t.pos[0]], atol=1e-5)
    assert abs(float(out["value"][0, 0]) - float(Metric("logprob", teacher_forced=True).score(
        gather_logits(ref, t.keep(ref.shape[1])), t)[0])) < 1e-5


def test_drop_and_knockout_against_shortened_sequences(tiny):
    """drop = the LLM on the sequence without the tokens (positions re-indexed); knockout at every
    layer = the same sequence keeping the original positions. Sample 1 is left-padded."""
    m, b = tiny
    t = Metric("logprob").targets(m, b)
    for mode in ("drop", "knockout"):
        res = ablate(m, [b], AblationConfig(mode=mode, n_draws=2, batch_size=2), sinks=(0, 5, 10))
        for r in res.frame.itertuples():
            tm = b.token_map
            p = tm.patches[(tm.patches["sample"] == r.sample)]
            pos = p.loc[(p["row"] * 4 + p["col"]).isin([int(x) for x in r.patches.split()]), "llm_pos"].tolist()
            emb, orig = _shortened(m, b, r.sample, pos)
            logits = _lm(m, emb, orig if mode == "knockout" else None)
            last = int(t.pos[r.sample]) - sum(q < int(t.pos[r.sample]) for q in pos) - int((~b.inputs["attention_mask"][r.sample].bool()).sum())
            ref = torch.log_softmax(logits[0, last], -1)[int(t.ids[r.sample, 0])]
            assert abs(r.value - float(ref)) < 1e-4, (mode, r)


def test_knockout_at_chosen_layers_only(tiny):
    m, b = tiny
    full = ablate(m, [b], AblationConfig(mode="knockout", n_draws=1, batch_size=2), sinks=(0, 5, 10))
    first = ablate(m, [b], AblationConfig(mode="knockout", layers=(0,), n_draws=1, batch_size=2), sinks=(0, 5, 10))
    none = ablate(m, [b], AblationConfig(mode="knockout", layers=(), n_draws=1, batch_size=2), sinks=(0, 5, 10))
    assert np.abs(none.frame["effect"]).max() < 1e-6
    assert not np.allclose(full.frame["value"], first.frame["value"])
    before = m.forward(b)
    ablate(m, [b], AblationConfig(mode="knockout", n_draws=1, batch_size=2), sinks=(0, 5, 10))
    assert torch.equal(before, m.forward(b))                          # no hook left behind
    for impl in ("eager", "sdpa"):
        with m.attention(impl):
            other = ablate(m, [b], AblationConfig(mode="knockout", n_draws=1, batch_size=2), sinks=(0, 5, 10))
        assert np.allclose(other.frame["value"], full.frame["value"], atol=1e-5)


def test_mean_mode_uses_the_dataset_mean_per_cell(tiny):
    m, b = tiny
    b2 = m.prepare([make_image(seed=5)], ["is there a dog ?"], answers=["no"])
    means = cell_means(m, [b, b2], "proj.out")
    x1, x2 = m.run(b, read=["proj.out"])["proj.out"], m.run(b2, read=["proj.out"])["proj.out"]
    assert torch.allclose(means[(0, 0, 1, 2)], (x1[0, 6] + x1[1, 6] + x2[0, 6]) / 3, atol=1e-6)
    res = ablate(m, [b, b2], AblationConfig(mode="mean", n_draws=1, batch_size=2), sinks=(6,))
    t = Metric("logprob").targets(m, b)
    idx = b.token_map.index("proj", b.token_map.patches.iloc[[6]])
    from mechsink.trace import set_tokens
    ref = _logprob(m, m.run(b, write={"proj.out": set_tokens(idx, means[(0, 0, 1, 2)][None])})["llm.logits"], t)[0]
    got = res.frame.query("sample == 0 and condition == 'sink'")["value"].item()
    assert abs(got - float(ref)) < 1e-5


def test_resampling_every_token_gives_the_other_image(planted):
    """Resampling all image tokens at proj.out from the donor = running the donor image with this
    prompt: the planted model then answers the donor's colour."""
    m, b = planted
    cfg = AblationConfig(mode="resample", n_draws=1, batch_size=16)
    sinks = tuple(range(P.N_PATCHES))                           # "sinks" = every patch
    res = ablate(m, [b], cfg, sinks=sinks)
    assert not res.frame["valid"].any()                         # no non-sink patches left for controls
    # the donor permutation is seeded: recover it from the values
    from mechsink.ablation import _values
    x, v = _values(m, b, cfg, None, seed=cfg.seed)
    donors = [int(torch.nonzero((x[:, 0] == v[i, 0]).all(-1))[0]) for i in range(b.size)]
    assert all(d != i for i, d in enumerate(donors))
    swapped = m.prepare([b.images[d] for d in donors], b.prompts)
    ref = m.forward(swapped)[torch.arange(b.size), b.last_pos]
    value = torch.tensor(res.frame.query("condition == 'sink'").sort_values("sample")["value"].to_numpy())
    ids = b.inputs["input_ids"][torch.arange(b.size), b.last_pos + 1]
    assert torch.allclose(value, torch.log_softmax(ref, -1)[torch.arange(b.size), ids].double(), atol=1e-4)


# -- matched controls ---------------------------------------------------------------------------------
def test_controls_are_matched_and_reproducible(planted):
    m, b = planted
    tm = b.token_map
    table = sink_table(m, b, SINKS)
    table["foreground"] = table["patch"] % 2 == 0
    table["norm"] = np.arange(len(table), dtype=float) % 36
    sel, valid, reason = draw_random(table, tm, 50, axis="proj", match=("border", "row", "foreground"), seed=3)
    assert valid.all() and reason == [""] * 16
    border = lambda p: (p // 6 in (0, 5)) or (p % 6 in (0, 5))   # noqa: E731
    for k in range(1, 51):
        for s in range(16):
            picked = table.loc[sel[k] & (table["sample"] == s).to_numpy(), "patch"].tolist()
            assert len(picked) == 3 and not set(picked) & set(SINKS)
            assert sorted(border(p) for p in picked) == sorted(border(p) for p in SINKS)
            assert sorted(p // 6 for p in picked) == sorted(p // 6 for p in SINKS)
            assert sorted(p % 2 == 0 for p in picked) == sorted(p % 2 == 0 for p in SINKS)
    # draws depend on (seed, global sample index) only, not on how samples are batched
    sub = m.prepare(b.images[4:6], b.prompts[4:6], answers=b.answers[4:6])
    st = sink_table(m, sub, SINKS)
    sel2, _, _ = draw_random(st, sub.token_map, 5, axis="proj", seed=3, sample_ids=[4, 5])
    sel1, _, _ = draw_random(table, tm, 5, axis="proj", seed=3)
    a = table.loc[sel1[2] & table["sample"].isin([4, 5]).to_numpy(), "patch"].to_numpy()
    assert np.array_equal(a, st.loc[sel2[2], "patch"].to_numpy())
    # norm band: only the top quarter of each image's non-sink norms
    sel, _, _ = draw_random(table, tm, 20, axis="proj", norm_band=(0.75, 1.0), seed=0)
    picked = table.loc[sel[1:].any(0)]
    assert picked["norm"].min() >= 26
    # impossible matching marks the sample invalid instead of drawing unmatched controls
    sel, valid, reason = draw_random(table.assign(foreground=table["patch"].isin(SINKS)), tm, 2, axis="proj",
                                     match=("foreground",))
    assert not valid.any() and "too few" in reason[0] and not sel[1:].any()


def test_detected_sinks_are_used_by_default(planted):
    m, b = planted
    from mechsink.sinks.detect import SinkSpec, detect
    spec = SinkSpec(site="vit.out", rule="fixed", params={"tau": 100.0})
    t1 = sink_table(m, b, spec)
    assert sorted(set(t1.loc[t1["is_sink"], "patch"])) == list(SINKS)
    t2 = sink_table(m, b, detect(m, b, spec))
    assert t1["is_sink"].equals(t2["is_sink"]) and "norm" in t2
    with pytest.raises(SelectionError, match="does not match"):
        sink_table(m, m.prepare(b.images[:2], b.prompts[:2]), detect(m, b, spec))


# -- config, results, command -------------------------------------------------------------------------
def test_config_roundtrip_and_bad_input():
    cfg = AblationConfig(site="vit.blocks.0.hook_resid_post", mode="mean", match=("border",), norm_band=(0.5, 1),
                         metric=Metric("logit_diff", answers=("yes", "no")), layers=(0, 1))
    back = AblationConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.fingerprint() == cfg.fingerprint()
    for bad, msg in [(dict(mode="erase"), "unknown ablation mode"), (dict(mode="drop", site="vit.out"), "drop deletes"),
                     (dict(match=("colour",)), "matching key"), (dict(norm_band=(0.9, 0.1)), "norm_band"),
                     (dict(site="llm.blocks.0.attn.hook_pattern"), "patterns"), (dict(n_draws=0), "n_draws"),
                     (dict(mode="resample", batch_size=1), "batch_size"), (dict(site="llm.blocks.x"), "unknown site")]:
        with pytest.raises(mechsink.MechsinkError, match=msg):
            AblationConfig(**bad)
    with pytest.raises(MetricError, match="answers"):
        Metric("accuracy", answers=("yes",))


def test_metric_errors_are_one_line(tiny):
    m, _ = tiny
    b = m.prepare([make_image()], ["is there a cat ?"])
    with pytest.raises(MetricError, match="answers="):
        ablate(m, [b], AblationConfig(n_draws=1), sinks=(0,))
    b = m.prepare([make_image()], ["is there a cat ?"], answers=["maybe"])
    with pytest.raises(MetricError, match="candidates"):
        ablate(m, [b], AblationConfig(n_draws=1, metric=Metric("accuracy")), sinks=(0,))


def test_kl_metric_and_effects(planted):
    m, b = planted
    res = ablate(m, [b], AblationConfig(n_draws=2, metric="kl", batch_size=16), sinks=SINKS)
    f = res.frame
    assert (f["clean"].abs() < 1e-6).all()                  # KL of the clean run with itself
    assert (f.loc[f["condition"] == "sink", "effect"] > 0.05).all()


def test_results_save_load_figure_and_command(planted, tmp_path):
    m, b = planted
    res = ablate(m, [b], AblationConfig(n_draws=4, batch_size=16), sinks=SINKS, out=tmp_path / "run")
    back = AblationResult.load(tmp_path / "run")
    pd.testing.assert_frame_equal(back.frame, res.frame)
    assert back.config == res.config
    summary = json.loads((tmp_path / "run" / "result.json").read_text())["summary"]
    assert summary["n"] == 16 and summary["p_value"] < 0.01
    fig = ablation_figure(res)
    assert len(fig.axes[0].lines) > 0
    from mechsink.data import open_dataset
    d = ablate(m, open_dataset(P.EVAL_DIR / "samples.jsonl", limit=12), AblationConfig(n_draws=4, batch_size=6),
               sinks=SINKS).to_dict()
    json.dumps(d)
    for key in ("sink_effect", "random_effect"):
        assert set(d[key]) == {"mean", "ci_low", "ci_high"}
    assert d["n"] == 12 and d["p_value"] < 0.01 and d["sink_effect"]["ci_low"] > d["random_effect"]["ci_high"]
    from typer.testing import CliRunner
    from mechsink.cli import app
    out = CliRunner().invoke(app, ["ablate", "--model", "planted-llava", "--data", str(P.EVAL_DIR / "samples.jsonl"),
                                   "--limit", "12", "--draws", "4", "--rule", "llava-1.5", "--batch-size", "12",
                                   "--out", str(tmp_path / "cli"), "--json"])
    assert out.exit_code == 0, out.output
    d2 = json.loads(out.stdout)
    assert d2["mean_sinks"] == 3 and d2["p_value"] < 0.01
    assert d2["n_unreadable"] == 0 and (tmp_path / "cli" / "errors.jsonl").exists()


def test_config_json_roundtrip_and_result_reload(planted, tmp_path):
    cfg = AblationConfig(site="llm.blocks.0.hook_resid_pre", mode="resample", metric=Metric("accuracy", answers=P.COLORS),
                         match=("border", "row"), norm_band=(0.25, 1.0), layers=(1,), n_draws=3)
    back = AblationConfig.from_json(cfg.to_json())
    assert back == cfg and back.fingerprint() == cfg.fingerprint() and len(cfg.fingerprint()) == 64
    assert str(cfg.controls) == "random(match=border+row, norm_band=0.25-1)"
    with pytest.raises(mechsink.MechsinkError, match="no setting"):
        AblationConfig.from_dict({**cfg.to_dict(), "draws": 3})
    m, b = planted
    res = ablate(m, [b], AblationConfig(n_draws=2, batch_size=16), sinks=SINKS)
    res.save(tmp_path / "r")
    again = AblationResult.load(tmp_path / "r")
    pd.testing.assert_frame_equal(again.frame, res.frame)
    assert again.config.fingerprint() == res.config.fingerprint() and again.to_dict() == res.to_dict()


def test_contrast_foreground_flags_the_object_cells():
    """A bright square on a black image covers known grid cells; only those are foreground."""
    import numpy as np
    from PIL import Image

    import mechsink
    from mechsink.ablation import contrast_foreground
    m = mechsink.load("tiny-llava")                      # 32 px, patch 8 -> 4x4 grid
    a = np.zeros((32, 32, 3), np.uint8)
    a[8:24, 16:32] = 255                                 # rows 1-2, cols 2-3
    b = m.prepare([Image.fromarray(a)], [None])
    fg = contrast_foreground()(m, b)
    p = b.token_map.patches
    expected = p["row"].isin([1, 2]) & p["col"].isin([2, 3])
    assert fg.tolist() == expected.tolist()


def test_null_twin_with_three_questions_per_image_is_calibrated_by_image_only():
    """Three questions per image on the null twin (the same image asked thrice, each question with
    its own random draws): the image-level test (questions averaged within their image, sign flips
    over images) keeps its size over 1,200 re-drawn experiments of 12 images; the question-level
    test, which counts the three correlated questions as independent, does not."""
    from mechsink.stats import unit_means
    m = mechsink.load("planted-llava-null")
    rng = np.random.default_rng(7)
    n_img, per = 160, 3
    images = [P.make_image(rng) for _ in range(n_img)]
    rep_images = [im for im in images for _ in range(per)]
    batches = [m.prepare(rep_images[i:i + 96], [P.PROMPT] * len(rep_images[i:i + 96]),
                         answers=[P.label_of(im) for im in rep_images[i:i + 96]]) for i in range(0, len(rep_images), 96)]
    res = ablate(m, batches, AblationConfig(n_draws=8, rows_per_forward=512), sinks=SINKS)
    sink, rand, idx = res.effects()
    units = res.units()
    assert len(set(units)) == n_img and len(units) == n_img * per
    assert (units[::per] == units[1::per]).all()                # questions on one image share its key
    s = res.summary()
    assert (s["n_images"], s["n_questions"]) == (n_img, n_img * per)
    assert res.comparison(by="question").n == n_img * per
    d = sink - rand.mean(1)
    img_of = np.asarray([list(dict.fromkeys(units)).index(u) for u in units])
    g = np.random.default_rng(3)
    p_img, p_q = [], []
    for _ in range(1200):
        chosen = g.choice(n_img, 12, replace=False)
        rows = np.flatnonzero(np.isin(img_of, chosen))
        p_img.append(paired_permutation_test(unit_means(d[rows], img_of[rows]), np.zeros(12)))
        p_q.append(paired_permutation_test(d[rows], np.zeros(rows.size), n_perm=1000, seed=int(g.integers(1 << 30))))
    fpr_img, fpr_q = np.mean(np.asarray(p_img) < 0.05), np.mean(np.asarray(p_q) < 0.05)
    assert 0.03 <= fpr_img <= 0.07, fpr_img
    assert fpr_q > 0.09, fpr_q                                   # pseudo-replication: too many false positives


def _quarters(m):
    """The planted eval set as four batches of four samples."""
    images, rows = P.load_eval(16)
    return [m.prepare(images[k:k + 4], [r["prompt"] for r in rows[k:k + 4]], answers=[r["answer"] for r in rows[k:k + 4]])
            for k in range(0, 16, 4)]


def _sinks_with_invalid(model, batch):
    """The planted sinks, except that sample 1 of every batch has nothing but sinks: no controls."""
    t = sink_table(model, batch, SINKS)
    t.loc[t["sample"] == 1, "is_sink"] = True
    return t


@pytest.mark.parametrize("checkpoint_s, parts", [(30.0, ["part-000000000.parquet"]),
                                                 (0.0, ["part-000000000.parquet", "part-000000001.parquet"])])
def test_an_interrupted_run_keeps_the_batches_it_finished(planted, tmp_path, monkeypatch, checkpoint_s, parts):
    """The rows stream to disk, a part closed every CHECKPOINT_S seconds and when the run stops: a KeyboardInterrupt in the third batch leaves exactly the first two
    batches' rows in ``out`` (one part, or one per batch when every batch closes a part), equal to
    a full run's, with a partial result.json."""
    import pyarrow.parquet as pq
    from mechsink import ablation
    m, _ = planted
    monkeypatch.setattr(ablation, "CHECKPOINT_S", checkpoint_s)
    halves = _quarters(m)
    calls = []

    def sinks(model, batch):                        # the planted sinks, until the third batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return sink_table(model, batch, SINKS)

    cfg = AblationConfig(n_draws=2, batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        ablate(m, halves, cfg, sinks=sinks, out=tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "rows").iterdir()) == parts     # no half-written part left
    assert sum(pq.ParquetFile(tmp_path / "run" / "rows" / p).metadata.num_rows for p in parts) == 2 * 4 * 3
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["partial"] and "summary" not in saved
    kept = AblationResult.load(tmp_path / "run").frame
    full = ablate(m, halves[:2], cfg, sinks=SINKS).frame
    assert len(kept) == len(full) == 2 * 4 * 3
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), full.reset_index(drop=True))


def test_a_streamed_run_equals_the_in_memory_run(planted, tmp_path, monkeypatch):
    """ablate(out=) keeps no rows in memory (the statistics read theirs from disk, a row group
    -- here a batch -- at a time) and gives the frame, effects, units, comparison and summary of
    the in-memory run, exactly; so does its reload, and a copy saved elsewhere; an in-memory
    result saved over it replaces its rows."""
    from mechsink import ablation
    monkeypatch.setattr(ablation, "ROW_GROUP", 1)
    m, _ = planted
    data = _quarters(m)
    cfg = AblationConfig(n_draws=3, batch_size=16)
    eager = ablate(m, data, cfg, sinks=_sinks_with_invalid)
    lazy = ablate(m, data, cfg, sinks=_sinks_with_invalid, out=tmp_path / "run")
    s = eager.summary()
    assert s["n_skipped"] == 4 and s["n"] == 12
    assert lazy.summary() == s and "rows in" in repr(lazy) and lazy._frame is None   # statistics without the frame
    assert lazy.comparison(by="question") == eager.comparison(by="question")
    assert json.loads((tmp_path / "run" / "result.json").read_text())["summary"] == json.loads(json.dumps(s))
    f = eager.frame
    assert {c for c in f if isinstance(f[c].dtype, pd.CategoricalDtype)} == {"id", "image_key", "condition", "reason"}
    assert len(f) == 16 * 4 and f["batch"].tolist() == sorted(f["batch"])
    back = AblationResult.load(tmp_path / "run")
    back.save(tmp_path / "copy")
    copy = AblationResult.load(tmp_path / "copy")
    for r in (lazy, back, copy):
        assert r.summary() == s and r.to_dict() == eager.to_dict()
        for a, b in zip(r.effects(), eager.effects()):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(r.units(), eager.units())
        pd.testing.assert_frame_equal(r.frame, f)
    eager.save(tmp_path / "copy")                                            # frame.parquet, no rows/ left
    assert not (tmp_path / "copy" / "rows").exists()
    pd.testing.assert_frame_equal(AblationResult.load(tmp_path / "copy").frame, f)


def test_comparison_from_per_sample_means_equals_the_draw_matrix(tmp_path, monkeypatch):
    """comparison() pairs each sample's sink effect with the mean of its random draws, reduced a
    batch at a time; it must equal stats.compare_paired of the whole [samples, draws] matrix of
    effects(), to the last bit: 40 images x 2 questions (units, sampled sign flips, BCa), in
    batches of 12 so that an image's questions fall in different batches, streamed to disk."""
    from mechsink import ablation
    from mechsink.stats import compare_paired
    monkeypatch.setattr(ablation, "ROW_GROUP", 1)
    m = mechsink.load("planted-llava-null")
    rng = np.random.default_rng(11)
    images = [im for im in (P.make_image(rng) for _ in range(40)) for _ in range(2)]
    batches = [m.prepare(images[i:i + 12], [P.PROMPT] * len(images[i:i + 12]),
                         answers=[P.label_of(im) for im in images[i:i + 12]]) for i in range(0, 80, 12)]
    cfg = AblationConfig(n_draws=12, batch_size=16, n_boot=500, n_perm=2000)     # > 8: pairwise sums
    res = ablate(m, batches, cfg, sinks=SINKS, out=tmp_path / "run")
    sink, rand, _ = res.effects()
    args = dict(n_boot=500, n_perm=2000, alpha=cfg.alpha, alternative=cfg.alternative, seed=cfg.seed)
    assert res.comparison() == compare_paired(sink, rand, units=res.units(), **args)
    assert res.comparison(by="question") == compare_paired(sink, rand, **args)
    assert res.comparison().n == 40 and res.comparison().n_draws == 12 and len(set(res.units())) == 40
