"""Values of the analysis layer: every Config round-trips through JSON with its fingerprint, every
Result saves and loads to an equal frame, token selections resolve to known answers, and the one
batching loop skips (and lists) what the processor refuses."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import mechsink
from mechsink import selection
from mechsink.batching import BatchingError, batches
from mechsink.config import Config, ConfigError
from mechsink.data import ErrorLog, Sample
from mechsink.results import Result, ResultError
from mechsink.zoo import planted

PLANTED = sorted(planted.PLANTED_SINKS)

# Settings for configs that have required fields.
EXAMPLES = {"ProbeConfig": dict(label="planted_label")}


def _all_subclasses(base):
    for info in pkgutil.walk_packages(mechsink.__path__, "mechsink."):
        if info.name.endswith("__main__") or ".zoo." in info.name:
            continue
        importlib.import_module(info.name)
    out, todo = [], [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("mechsink."):
                out.append(sub)
    return sorted(set(out), key=lambda c: c.__qualname__)


CONFIGS = _all_subclasses(Config)
RESULTS = _all_subclasses(Result)


def test_the_analyses_use_the_one_config_base():
    names = {c.__name__ for c in CONFIGS}
    assert {"SinkSpec", "Selection", "ReportConfig", "NormConfig", "AblationConfig", "PatchConfig"} <= names, names


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_round_trips_through_json(cls):
    cfg = cls(**EXAMPLES.get(cls.__name__, {}))
    back = cls.from_json(cfg.to_json())
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert back.fingerprint() == cfg.fingerprint() and len(cfg.fingerprint()) == 64
    changed = [f for f in dataclasses.fields(cls) if isinstance(getattr(cfg, f.name), (bool, int, float))
               and not isinstance(getattr(cfg, f.name), bool) and f.name not in ("alpha",)]
    if changed:                                   # any change of a number changes the fingerprint
        f = changed[0]
        try:
            other = cfg.replace(**{f.name: getattr(cfg, f.name) + 1})
        except mechsink.MechsinkError:
            return
        assert other.fingerprint() != cfg.fingerprint()
    with pytest.raises(ConfigError, match="no setting"):
        cls.from_dict({**cfg.to_dict(), "no_such_setting": 1})


def test_config_json_errors_are_one_line():
    from mechsink.report.pipeline import ReportConfig
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        ReportConfig.from_json("{model: toy")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cls", RESULTS, ids=lambda c: c.__name__)
def test_every_result_saves_and_loads_an_equal_frame(cls, tmp_path):
    cfg_cls = cls.config_class
    cfg = cfg_cls(**EXAMPLES.get(cfg_cls.__name__, {})) if cfg_cls is not None else None
    frame = pd.DataFrame({"sample": [0, 1, 2], "value": [0.5, np.nan, -1.25], "label": ["a", "b", "c"]})
    res = cls(frame, cfg, {"model": "m"})
    res.save(tmp_path / "r", summary=False)
    back = cls.load(tmp_path / "r")
    pd.testing.assert_frame_equal(back.frame, frame)
    assert back.config == cfg and back.meta.get("model") == "m"
    with pytest.raises(ResultError, match="holds no saved result"):
        cls.load(tmp_path / "nothing")


def test_sinkset_follows_the_result_protocol(tmp_path):
    m = mechsink.load("planted-llava")
    images, _ = planted.load_eval(limit=3)
    found = mechsink.sinks.detect(m, m.prepare(images, [planted.PROMPT] * 3))
    assert found.frame is found.patches and found.config == found.spec
    s = found.summary()
    assert s["images"] == 3 and s["images_with_sinks"] == 3 and s["mean_per_image"] == len(PLANTED)
    back = type(found).load(found.save(tmp_path / "s"))
    pd.testing.assert_frame_equal(back.frame, found.frame)


# -- selections ---------------------------------------------------------------------------------------
def test_selection_names_parse_and_print():
    for text in ["sinks", "nonsinks", "image", "random", "random(k=3)", "random(match=border+row)",
                 "random(norm_band=0.5-1)", "cls", "text", "answer"]:
        assert str(selection.Selection.parse(text)) == text
    assert selection.parse_all("sinks, random(k=2, match=row),image") == (
        selection.sinks, selection.random(k=2, match=("row",)), selection.image)
    for bad, needle in [("all", "unknown token selection"), ("full", "unknown token selection"),
                        ("random(z=1)", "unknown argument"), ("random(match=left)", "matching key")]:
        with pytest.raises(selection.SelectionError, match=needle):
            selection.Selection.parse(bad)
    with pytest.raises(selection.SelectionError, match="apply to random"):
        selection.Selection("sinks", k=2)


@pytest.fixture(scope="module")
def planted_batch():
    m = mechsink.load("planted-llava")
    images, _ = planted.load_eval(limit=6)
    return m, m.prepare(images, [planted.PROMPT] * 6)


def test_selections_resolve_to_the_planted_sinks_and_disjoint_random_sets(planted_batch):
    m, b = planted_batch
    tm = b.token_map
    table = selection.sink_table(m, b, PLANTED)
    r = selection.resolve(["sinks", "nonsinks", "image", selection.random(match=("border",))], table, tm,
                          axis="proj", n_draws=5, seed=3)
    assert r.names == ["sinks", "nonsinks", "image"] + ["random(match=border)"] * 5 and r.valid.all()
    patch, sample = table["patch"].to_numpy(), table["sample"].to_numpy()
    for s in range(b.size):
        own = sample == s
        assert sorted(patch[r.select[0] & own]) == PLANTED
        assert sorted(patch[r.select[1] & own]) == sorted(set(range(36)) - set(PLANTED))
        assert r.select[2][own].all()
        for d in range(5):
            drawn = patch[r.select[3 + d] & own]
            assert len(drawn) == len(PLANTED) and not set(drawn) & set(PLANTED)
    # a sample's draws depend on (seed, its global index) only, never on the batch it is in
    sub = m.prepare(b.images[4:6], b.prompts[4:6])
    r2 = selection.resolve([selection.random()], selection.sink_table(m, sub, PLANTED), sub.token_map, axis="proj",
                           n_draws=5, seed=3, sample_ids=[4, 5])
    r1 = selection.resolve([selection.random()], table, tm, axis="proj", n_draws=5, seed=3)
    assert np.array_equal(r2.select, r1.select[:, sample >= 4])
    # k tokens per sample, whatever the sinks
    rk = selection.resolve([selection.random(k=7)], table, tm, axis="proj", n_draws=2)
    assert all((rk.select[d] & (sample == s)).sum() == 7 for d in range(2) for s in range(b.size))
    # masks on every axis pick the tokens the TokenMap indexes
    x = m.run(b, read=["proj.out"])["proj.out"]
    mask = tm.mask("proj", r.select[:1], tuple(x.shape[:-1]))[0]
    rows = table[r.select[0]]
    assert mask.sum() == len(rows) and bool(mask[tm.index("proj", rows)].all())
    assert np.allclose(tm.gather(x, "proj", rows).numpy(), x[tm.index("proj", rows)].numpy())


def test_role_selections_are_rows_of_the_token_map(planted_batch):
    m, b = planted_batch
    tm = b.token_map
    text = selection.rows("text", tm)
    assert len(text) == int((tm.roles == 1).sum()) and set(text["role"]) == {"text"}
    with pytest.raises(selection.SelectionError, match="sink table"):
        selection.rows("sinks", tm)
    with pytest.raises(selection.SelectionError, match="not image patches"):
        selection.resolve(["text"], selection.sink_table(m, b, PLANTED), tm)


# -- batching -----------------------------------------------------------------------------------------
def _sample(i, image, answer=None):
    import io
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    return Sample(id=f"s{i}", image_path=None, prompt="Is there an object?", answer=answer, image_loader=lambda: data)


@pytest.mark.parametrize("name", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_batching_skips_and_lists_what_the_processor_refuses(name):
    m = mechsink.load(name)
    good = Image.new("RGB", (64, 48), (90, 40, 10))
    data = [_sample(0, good), _sample(1, Image.new("RGB", (1000, 1))), _sample(2, good), _sample(3, good)]
    log = ErrorLog()
    chunks = list(batches(m, data, batch_size=2, errors=log))
    assert [c.ids for c in chunks] == [["s0"], ["s2", "s3"]]
    assert [c.start for c in chunks] == [0, 1]
    assert [r.sample_id for r in log] == ["s1"] and log.records[0].kind == "processing"
    assert "refused" in log.records[0].reason and "\n" not in log.records[0].reason


def test_batching_answers_and_bad_sizes():
    m = mechsink.load("planted-llava")
    images, rows = planted.load_eval(limit=3)
    data = [_sample(i, im, answer=r["answer"]) for i, (im, r) in enumerate(zip(images, rows))]
    (c,) = list(batches(m, data, batch_size=3, answers=True))
    assert c.batch.answers == [r["answer"] for r in rows]
    (c,) = list(batches(m, data, batch_size=3, answers=False))
    assert c.batch.answers is None
    with pytest.raises(BatchingError, match="gold answer"):
        list(batches(m, [*data, _sample(9, images[0])], answers=True))
    with pytest.raises(BatchingError, match="at least 1"):
        list(batches(m, data, batch_size=0))
    given = list(batches(m, [c.batch, c.batch]))
    assert [g.start for g in given] == [0, 3] and given[1].ids == ["3", "4", "5"]
