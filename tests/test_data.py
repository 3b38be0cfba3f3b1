"""mechsink.data: every format read back from real files, bad images skipped and logged."""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mechsink.data import (
    BUNDLED_DATASETS,
    DataError,
    Dataset,
    ErrorLog,
    ImageError,
    Sample,
    decode_image,
    detect_format,
    iter_images,
    open_dataset,
)
from mechsink.errors import MechsinkError


def pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB array (h, w, 3) uint8."""
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def save(path: Path, w: int = 16, h: int = 12, seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern(w, h, seed)).save(path, fmt)
    return path


def encoded(w: int = 16, h: int = 12, seed: int = 0, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pattern(w, h, seed)).save(buf, fmt)
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "mode, value, rgb",
    [
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 0), (100, 100, 100)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, value, rgb):
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    Image.new(mode, (5, 3), value).save(path)
    img = decode_image(path)
    assert img.mode == "RGB" and img.size == (5, 3)
    assert img.getpixel((2, 1)) == rgb


def test_palette_with_transparency_becomes_rgb_without_warning(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    img.save(tmp_path / "p.png", transparency=bytes([0, 128]))  # per-entry alpha: Pillow warns on convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_image(tmp_path / "p.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (200, 10, 20)


def test_huge_images_are_downscaled_keeping_aspect(tmp_path):
    out = decode_image(save(tmp_path / "wide.png", 300, 100), max_side=64)
    assert out.size == (64, 21)
    out = decode_image(save(tmp_path / "big.jpg", 2000, 1000), max_side=500)  # JPEG draft path
    assert out.size == (500, 250)
    assert decode_image(tmp_path / "big.jpg", max_side=None).size == (2000, 1000)
    Image.new("L", (5000, 10)).save(tmp_path / "strip.png")
    assert decode_image(tmp_path / "strip.png").size == (4096, 8)  # default max_side
    assert decode_image(save(tmp_path / "small.png", 30, 20), max_side=64).size == (30, 20)


def test_decompression_bomb_warning_does_not_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    warn = save(tmp_path / "warn.png", 150, 100)  # 1.5x the limit: Pillow warns
    bomb = save(tmp_path / "bomb.png", 300, 100)  # 3x the limit: Pillow refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(warn, max_side=None).size == (150, 100)
    with pytest.raises(ImageError) as e:
        decode_image(bomb)
    assert e.value.kind == "too_large"


def test_decoded_pixels_match_the_file(tmp_path):
    path = save(tmp_path / "a.png", 7, 5, seed=3)
    assert np.array_equal(np.asarray(decode_image(path)), pattern(7, 5, seed=3))


# ---------------------------------------------------------------- corrupt images


def make_corrupt_folder(root: Path) -> dict[str, str]:
    """Writes good and bad images; returns {relative path: expected kind} for the bad ones."""
    save(root / "good" / "a.png", seed=1)
    save(root / "good" / "b.jpg", seed=2)
    Image.new("L", (8, 8), 50).save(root / "good" / "c_gray.png")
    jpg = encoded(64, 64, fmt="JPEG")
    (root / "bad").mkdir()
    (root / "bad" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = encoded(64, 64, fmt="PNG")
    (root / "bad" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "bad" / "text.jpg").write_text("this is not an image\n")
    (root / "bad" / "empty.png").write_bytes(b"")
    broken = bytearray(png)  # valid header, scrambled compressed data
    broken[100:160] = bytes(60)
    (root / "bad" / "scrambled.png").write_bytes(bytes(broken))
    return {
        "bad/truncated.jpg": "truncated",
        "bad/truncated.png": "truncated",
        "bad/text.jpg": "not_an_image",
        "bad/empty.png": "empty",
        "bad/scrambled.png": "corrupt",
    }


def test_iter_images_skips_and_logs_every_kind_of_bad_image(tmp_path):
    bad = make_corrupt_folder(tmp_path / "imgs")
    ds = open_dataset(tmp_path / "imgs")
    assert len(ds) == 8
    log = ErrorLog()
    got = list(iter_images(ds, errors=log))
    assert [s.id for s, _ in got] == ["good/a.png", "good/b.jpg", "good/c_gray.png"]
    assert all(img.mode == "RGB" for _, img in got)
    assert {r.sample_id: r.kind for r in log} == bad
    for r in log:
        assert r.image_path == str(tmp_path / "imgs" / r.sample_id)
        assert "\n" not in r.reason and r.image_path in r.reason
    assert log.summary() == {
        "n_seen": 8, "n_loaded": 3, "n_skipped": 5,
        "by_kind": {"corrupt": 1, "empty": 1, "not_an_image": 1, "truncated": 2},
    }
    written = log.write(tmp_path / "run")
    assert written == tmp_path / "run" / "errors.jsonl"
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == [r.sample_id for r in log]
    assert set(rows[0]) == {"sample_id", "image_path", "reason", "kind"}


def test_error_log_write_into_existing_dir(tmp_path):
    log = ErrorLog()
    log.add("x", None, ImageError("boom", kind="missing"))
    out = log.write(tmp_path)
    assert out == tmp_path / "errors.jsonl"
    assert log.write(tmp_path / "named.jsonl") == tmp_path / "named.jsonl"
    assert json.loads(out.read_text()) == {"sample_id": "x", "image_path": None, "reason": "boom", "kind": "missing"}
    assert not list(tmp_path.glob(".*tmp"))


def test_missing_image_and_no_image_are_skipped(tmp_path):
    save(tmp_path / "ok.png")
    write_jsonl(tmp_path / "d.jsonl", [
        {"id": "ok", "image": "ok.png", "prompt": "q"},
        {"id": "gone", "image": "nowhere/gone.png", "prompt": "q"},
        {"id": "none", "image": None, "prompt": "text only"},
    ])
    ds = open_dataset(tmp_path / "d.jsonl")
    log = ErrorLog()
    assert [s.id for s, _ in iter_images(ds, errors=log)] == ["ok"]
    assert [(r.sample_id, r.kind) for r in log] == [("gone", "missing"), ("none", "no_image")]
    with pytest.raises(ImageError, match="file not found"):
        ds[1].load_image()
    assert isinstance(ImageError("x"), MechsinkError) and isinstance(ImageError("x"), ValueError)


# ---------------------------------------------------------------- folders


def test_image_folder(tmp_path):
    root = tmp_path / "classes"
    save(root / "dog" / "2.png", seed=2)
    save(root / "cat" / "b.JPG", seed=1, fmt="JPEG")
    save(root / "cat" / "a.png", seed=0)
    save(root / "cat" / "sub" / "z.webp", seed=3)
    save(root / "top.bmp", seed=4)
    save(root / ".hidden" / "x.png")
    save(root / "cat" / ".x.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    ds = open_dataset(root)
    assert ds.format == "folder" and ds.name == "classes"
    assert ds.ids == ["cat/a.png", "cat/b.JPG", "cat/sub/z.webp", "dog/2.png", "top.bmp"]
    assert [s.labels["folder"] for s in ds] == ["cat", "cat", "sub", "dog", ""]
    assert ds.label_columns() == ["folder"]
    assert all(Path(s.image_path).is_absolute() and s.prompt is None for s in ds)
    assert np.array_equal(np.asarray(ds[0].load_image()), pattern(16, 12, 0))
    assert open_dataset(root, limit=2).ids == ["cat/a.png", "cat/b.JPG"]


def test_single_image_and_empty_folder(tmp_path):
    ds = open_dataset(save(tmp_path / "one.png"))
    assert ds.format == "image" and ds.ids == ["one.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        open_dataset(tmp_path / "empty")


# ---------------------------------------------------------------- tables


def test_jsonl_round_trip(tmp_path):
    save(tmp_path / "imgs" / "a.png", seed=1)
    save(tmp_path / "imgs" / "b.png", seed=2)
    rows = [
        {"id": 7, "image": "imgs/a.png", "question": "What <image> is this?", "answer": "a cat",
         "type": "global", "color": "red", "n": 3, "tags": ["x", "y"]},
        {"id": "b", "image": str(tmp_path / "imgs" / "b.png"), "question": "Left?", "answer": "no",
         "type": "local", "color": "blue", "n": 4, "tags": []},
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    ds = open_dataset(path)
    assert ds.format == "jsonl" and ds.name == "qa"
    a, b = ds
    assert (a.id, a.prompt, a.answer, a.question_type) == ("7", "What <image> is this?", "a cat", "global")
    assert a.image_path == str((tmp_path / "imgs" / "a.png").resolve())
    assert a.labels == {"color": "red", "n": 3, "tags": ["x", "y"]}
    assert b.image_path == str(tmp_path / "imgs" / "b.png")
    assert ds.label_columns() == ["color", "n", "tags"]
    assert np.array_equal(np.asarray(b.load_image()), pattern(16, 12, 2))
    json.dumps([s.labels for s in ds])  # JSON-serialisable


def test_table_without_ids_uses_row_numbers_and_images_root(tmp_path):
    save(tmp_path / "pics" / "a.png")
    (tmp_path / "meta").mkdir()
    write_jsonl(tmp_path / "meta" / "x.jsonl", [{"image": "a.png", "prompt": "p1"}, {"image": "a.png", "prompt": "p2", "extra": 1}])
    ds = open_dataset(tmp_path / "meta" / "x.jsonl", images_root=tmp_path / "pics")
    assert ds.ids == ["0", "1"]
    assert ds[0].image_path == str((tmp_path / "pics" / "a.png").resolve())
    assert ds[0].labels == {} and ds[1].labels == {"extra": 1}


def test_json_array_file(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps([{"id": "x", "image": "a.png", "prompt": "hi"}], indent=2))
    ds = open_dataset(tmp_path / "d.json")
    assert ds.format == "json" and ds.ids == ["x"] and ds[0].prompt == "hi"


def test_csv_round_trip_keeps_text_as_text(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text(
        "id,image,prompt,answer,question_type,score,label\n"
        '007,a.png,"Is it red, or blue?",NA,mixed,0.5,1\n'
        "008,a.png,Count?,,global,2,0\n"
    )
    ds = open_dataset(tmp_path / "d.csv")
    a, b = ds
    assert (a.id, a.prompt, a.answer, a.question_type) == ("007", "Is it red, or blue?", "NA", "mixed")
    assert b.answer is None
    assert a.labels == {"score": 0.5, "label": 1} and isinstance(a.labels["label"], int)


def test_tsv_and_parquet_tables(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "d.tsv").write_text("image\tquestion\tanswer\tcolor\na.png\tWhat colour?\tred\tred\n")
    ds = open_dataset(tmp_path / "d.tsv")
    assert ds.format == "tsv" and ds[0].prompt == "What colour?" and ds[0].labels == {"color": "red"}

    png = encoded(seed=5)
    table = pa.table({
        "id": ["p0", "p1"],
        "image": [{"bytes": png, "path": None}, {"bytes": None, "path": "a.png"}],
        "prompt": ["q0", "q1"],
        "label": [0, 1],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    ds = open_dataset(tmp_path / "d.parquet")
    assert ds.format == "parquet" and ds.ids == ["p0", "p1"]
    assert ds[0].image_path is None and np.array_equal(np.asarray(ds[0].load_image()), pattern(16, 12, 5))
    assert ds[1].image_path == str((tmp_path / "a.png").resolve())
    assert [s.labels for s in ds] == [{"label": 0}, {"label": 1}]


def test_bad_tables_give_one_line_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{"image": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON") as e:
        open_dataset(tmp_path / "bad.jsonl")
    assert "\n" not in str(e.value)
    write_jsonl(tmp_path / "noimg.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match="no image column"):
        open_dataset(tmp_path / "noimg.jsonl")
    write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "image": "a"}, {"id": "1", "image": "b"}])
    with pytest.raises(DataError, match="duplicate sample id '1'"):
        open_dataset(tmp_path / "dup.jsonl")


def test_spec_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        open_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown dataset format 'xml'"):
        open_dataset(tmp_path / "a.jsonl", format="xml")
    with pytest.raises(DataError, match="unknown dataset format 'foo'"):
        open_dataset("foo:bar")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        open_dataset(tmp_path / "a.txt")
    with pytest.raises(DataError, match="limit"):
        open_dataset(tmp_path / "a.txt", limit=-1)
    save(tmp_path / "f" / "a.png")
    with pytest.raises(DataError, match="needs a file"):
        open_dataset(f"jsonl:{tmp_path / 'f'}")
    with pytest.raises(DataError, match="images_root does not apply"):
        open_dataset(tmp_path / "f", images_root=tmp_path)


# ---------------------------------------------------------------- Hugging Face save_to_disk


def test_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
    imgs = [Image.fromarray(pattern(10, 8, seed=i)) for i in range(3)]
    ds_hf = datasets.Dataset.from_dict(
        {"image": imgs, "question": ["q0", "q1", "q2"], "answer": ["a", "b", "c"], "category": ["x", "y", "x"]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string"), "category": datasets.Value("string")}),
    )
    ds_hf.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds_hf, "test": ds_hf.select([2])}).save_to_disk(str(tmp_path / "dict"))

    ds = open_dataset(tmp_path / "single")
    assert ds.format == "hf" and ds.ids == ["0", "1", "2"]
    assert [s.prompt for s in ds] == ["q0", "q1", "q2"] and ds[1].answer == "b"
    assert ds[0].image_path is None and ds.label_columns() == ["category"]
    for i, s in enumerate(ds):
        assert np.array_equal(np.asarray(s.load_image()), pattern(10, 8, seed=i))
    assert pickle.loads(pickle.dumps(ds[2])).load_image().size == (10, 8)
    assert open_dataset(tmp_path / "single", limit=2).ids == ["0", "1"]

    with pytest.raises(DataError, match="pass split=.*train"):
        open_dataset(tmp_path / "dict")
    test = open_dataset(tmp_path / "dict", split="test")
    assert [s.prompt for s in test] == ["q2"]
    assert np.array_equal(np.asarray(test[0].load_image()), pattern(10, 8, seed=2))
    assert ds.fingerprint() == open_dataset(tmp_path / "single").fingerprint() != ds[:2].fingerprint()


def test_hf_with_path_column(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
    save(tmp_path / "imgs" / "a.png", seed=9)
    datasets.Dataset.from_dict({"image_path": ["a.png"], "prompt": ["p"]}).save_to_disk(str(tmp_path / "hf"))
    ds = open_dataset(f"hf:{tmp_path / 'hf'}", images_root=tmp_path / "imgs")
    assert np.array_equal(np.asarray(ds[0].load_image()), pattern(16, 12, 9))


# ---------------------------------------------------------------- POPE


def make_pope(root: Path) -> Path:
    """The POPE repo layout: output/coco/coco_pope_<split>.json (JSON lines) + COCO val2014 images."""
    coco = root / "val2014"
    for i in (42, 73):
        save(coco / f"COCO_val2014_{i:012d}.jpg", seed=i, fmt="JPEG")
    out = root / "output" / "coco"
    out.mkdir(parents=True)
    for split in ("random", "popular", "adversarial"):
        write_jsonl(out / f"coco_pope_{split}.json", [
            {"question_id": 1, "image": "COCO_val2014_000000000042.jpg",
             "text": "Is there a dining table in the image?", "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000000073.jpg",
             "text": "Is there an elephant in the image?", "label": "no"},
        ])
    return out


def test_pope_file(tmp_path):
    out = make_pope(tmp_path)
    path = out / "coco_pope_adversarial.json"
    assert detect_format(path) == "pope"
    ds = open_dataset(path, images_root=tmp_path / "val2014")
    assert ds.format == "pope" and ds.ids == ["1", "2"]
    s = ds[0]
    assert (s.prompt, s.answer, s.question_type) == ("Is there a dining table in the image?", "yes", "presence")
    assert s.labels == {"category": "adversarial", "object": "dining table"}
    assert ds[1].labels["object"] == "elephant"
    assert s.image_path == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert [s.id for s, _ in iter_images(ds, errors=None)] == ["1", "2"]
    # The same via the prefix, without images_root: images are looked for next to the file.
    ds2 = open_dataset(f"pope:{path}")
    log = ErrorLog()
    assert list(iter_images(ds2, errors=log)) == [] and len(log) == 2


def test_pope_folder_and_llava_merged_file(tmp_path):
    out = make_pope(tmp_path)
    ds = open_dataset(f"pope:{out}", images_root=tmp_path / "val2014")
    assert ds.ids == ["adversarial/1", "adversarial/2", "popular/1", "popular/2", "random/1", "random/2"]
    assert open_dataset(f"pope:{out}", limit=3).ids == ["adversarial/1", "adversarial/2", "popular/1"]
    # LLaVA's llava_pope_test.jsonl: one file, category per line, no label.
    merged = write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "category": "random"},
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "category": "popular"},
    ])
    ds = open_dataset(merged)
    assert ds.format == "pope" and ds.ids == ["random/1", "popular/1"] and ds[0].answer is None


# ---------------------------------------------------------------- MME


def make_mme(root: Path) -> Path:
    """MME_Benchmark_release_version: images/ + questions_answers_YN/ folders, or pairs side by side."""
    base = root / "MME_Benchmark_release_version"
    art = base / "artwork"
    save(art / "images" / "10002.jpg", seed=1, fmt="JPEG")
    save(art / "images" / "10049.jpg", seed=2, fmt="JPEG")
    (art / "questions_answers_YN").mkdir()
    (art / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n")
    (art / "questions_answers_YN" / "10049.txt").write_text(
        "Is this artwork created by Goya? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n\n")
    code = base / "code_reasoning"
    save(code / "0020.png", seed=3)
    (code / "0020.txt").write_text("The image shows a python code. Is the output of the code 'Hello'? "
                                   "Please answer yes or no.\tYes\nIs the output 'World'? Please answer yes or no.\tNo\n")
    return base


def test_mme_release_layout(tmp_path):
    base = make_mme(tmp_path)
    assert detect_format(base) == "mme"
    ds = open_dataset(base)
    assert ds.format == "mme"
    assert ds.ids == ["artwork/10002#0", "artwork/10002#1", "artwork/10049#0", "artwork/10049#1",
                      "code_reasoning/0020#0", "code_reasoning/0020#1"]
    assert [s.answer for s in ds] == ["Yes", "No"] * 3
    s = ds[3]
    assert s.prompt == "Is this artwork created by Monet? Please answer yes or no."
    assert s.question_type == "artwork"
    assert s.labels == {"category": "artwork", "eval_type": "Perception", "image_file": "10049.jpg", "question_index": 1}
    assert ds[4].labels["eval_type"] == "Cognition"
    assert ds[4].image_path == str((base / "code_reasoning" / "0020.png").resolve())
    assert len(list(iter_images(ds))) == 6
    # A wrapper folder above, or one category folder alone, work too.
    assert open_dataset(tmp_path).ids == ds.ids
    assert open_dataset(f"mme:{base / 'code_reasoning'}").ids == ["code_reasoning/0020#0", "code_reasoning/0020#1"]


def test_mme_caption_txt_is_not_mme_and_bad_lines_fail(tmp_path):
    save(tmp_path / "caps" / "a.png")
    (tmp_path / "caps" / "a.txt").write_text("a caption without a tab\n")
    assert detect_format(tmp_path / "caps") == "folder"
    base = make_mme(tmp_path / "m")
    (base / "artwork" / "questions_answers_YN" / "10049.txt").write_text("no tab here\n")
    with pytest.raises(DataError, match=r"10049\.txt:1: expected 'question<TAB>answer'"):
        open_dataset(base)


# ---------------------------------------------------------------- MMStar


MMSTAR_ROWS = [
    {"index": 0, "question": "Which option describes the object relationship in the image correctly?\n"
                             "Options: A: The suitcase is on the book., B: The suitcase is beneath the cat.",
     "answer": "A", "category": "coarse perception", "l2_category": "image scene and topic"},
    {"index": 1, "question": "What is the main feature in the background?\nOptions: A: tree, B: sky",
     "answer": "B", "category": "fine-grained perception", "l2_category": "localization"},
    {"index": 2, "question": "Same picture, other question?\nOptions: A: 1, B: 2",
     "answer": "A", "category": "math", "l2_category": "numeric commonsense and calculation"},
]


def test_mmstar_parquet(tmp_path):
    pngs = [encoded(seed=10 + i) for i in range(3)]
    table = pa.table({
        "index": [r["index"] for r in MMSTAR_ROWS],
        "question": [r["question"] for r in MMSTAR_ROWS],
        "image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(pngs)],
        "answer": [r["answer"] for r in MMSTAR_ROWS],
        "category": [r["category"] for r in MMSTAR_ROWS],
        "l2_category": [r["l2_category"] for r in MMSTAR_ROWS],
        "meta_info": [{"source": "MMBench", "split": "val", "image_path": f"images/{i}.jpg"} for i in range(3)],
    })
    pq.write_table(table, tmp_path / "mmstar.parquet")
    ds = open_dataset(tmp_path / "mmstar.parquet")
    assert ds.format == "mmstar" and ds.ids == ["0", "1", "2"]
    s = ds[1]
    assert (s.prompt, s.answer, s.question_type) == (MMSTAR_ROWS[1]["question"], "B", "fine-grained perception")
    assert s.labels == {"category": "fine-grained perception", "l2_category": "localization",
                        "meta_info": {"source": "MMBench", "split": "val", "image_path": "images/1.jpg"}}
    for i, s in enumerate(ds):
        assert np.array_equal(np.asarray(s.load_image()), pattern(16, 12, 10 + i))


def test_mmstar_vlmevalkit_tsv(tmp_path):
    b64 = [base64.b64encode(encoded(seed=20 + i)).decode() for i in range(2)]
    lines = ["index\tquestion\tanswer\tcategory\tl2_category\timage"]
    images = [b64[0], b64[1], "1"]  # row 2 reuses row 1's image by index, as VLMEvalKit does
    for r, img in zip(MMSTAR_ROWS, images):
        q = r["question"].replace("\n", "\\n")
        lines.append(f"{r['index']}\t{q}\t{r['answer']}\t{r['category']}\t{r['l2_category']}\t{img}")
    lines.append("3\tBroken image?\tA\tmath\tx\tnot*base64*at*all!!")
    (tmp_path / "MMStar.tsv").write_text("\n".join(lines) + "\n")
    ds = open_dataset(tmp_path / "MMStar.tsv")
    assert ds.format == "mmstar" and ds.ids == ["0", "1", "2", "3"]
    assert ds[2].labels == {"category": "math", "l2_category": "numeric commonsense and calculation"}
    log = ErrorLog()
    got = {s.id: np.asarray(img) for s, img in iter_images(ds, errors=log)}
    assert np.array_equal(got["0"], pattern(16, 12, 20))
    assert np.array_equal(got["2"], pattern(16, 12, 21))
    assert [r.sample_id for r in log] == ["3"]
    assert pickle.loads(pickle.dumps(ds[0])).load_image().size == (16, 12)
    assert open_dataset(f"mmstar:{tmp_path / 'MMStar.tsv'}", limit=1).ids == ["0"]


# ---------------------------------------------------------------- fingerprint, subset


def test_fingerprint_stable_location_free_and_byte_sensitive(tmp_path):
    root = tmp_path / "a"
    for i in range(4):
        save(root / f"{i}.png", seed=i)
    ds = open_dataset(root)
    fp = ds.fingerprint()
    assert len(fp) == 64 and fp == ds.fingerprint() == open_dataset(root).fingerprint()
    shutil.copytree(root, tmp_path / "b")
    assert open_dataset(tmp_path / "b").fingerprint() == fp

    # Flip one pixel byte without changing the file size.
    raw = bytearray((root / "2.png").read_bytes())
    Image.fromarray(pattern(16, 12, 2) ^ np.eye(12, 16, dtype=np.uint8)[:, :, None]).save(root / "2.png")
    assert open_dataset(root).fingerprint() != fp
    (root / "2.png").write_bytes(bytes(raw))
    assert open_dataset(root).fingerprint() == fp
    raw[-1] ^= 1  # a byte of the trailing IEND CRC: same size, same pixels
    (root / "2.png").write_bytes(bytes(raw))
    assert open_dataset(root).fingerprint() != fp

    assert ds.subset(3).fingerprint() != fp
    changed = Dataset([Sample(s.id, s.image_path, prompt="other") for s in ds], name="x")
    assert changed.fingerprint() != Dataset(list(ds), name="x").fingerprint()


def test_subset_is_deterministic_and_ordered(tmp_path):
    ds = Dataset([Sample(f"s{i:02d}", None) for i in range(50)], name="mem")
    a = ds.subset(10, seed=1)
    assert a.ids == ds.subset(10, seed=1).ids
    assert a.ids == sorted(a.ids) and len(set(a.ids)) == 10
    assert a.ids != ds.subset(10, seed=2).ids
    # Pinned: a subset drawn today must be the same subset next year.
    assert a.ids == ["s04", "s07", "s08", "s16", "s24", "s28", "s30", "s31", "s36", "s41"]
    assert ds.subset().ids == ds.ids and ds.subset(500).ids == ds.ids
    assert ds.subset(0).ids == []
    assert a.name == "mem" and isinstance(a, Dataset)
    with pytest.raises(DataError):
        ds.subset(-1)
    assert ds[3:6].ids == ["s03", "s04", "s05"]


def test_to_frame_and_label_columns():
    ds = Dataset([Sample("a", None, "p", labels={"x": 1, "id": "clash"}), Sample("b", None, labels={"y": 2})], name="m")
    assert ds.label_columns() == ["x", "id", "y"]
    df = ds.to_frame()
    assert list(df.columns) == ["id", "image_path", "prompt", "answer", "question_type", "x", "label_id", "y"]
    assert df["label_id"].iloc[0] == "clash" and df["label_id"].isna().iloc[1]
    assert df["x"].iloc[0] == 1 and df["id"].tolist() == ["a", "b"]


# ---------------------------------------------------------------- bundled


def test_bundled_toy_llava_eval():
    from mechsink.data.open import _PACKAGE_DIR

    if not (_PACKAGE_DIR / BUNDLED_DATASETS["toy-llava-eval"]).is_file():
        pytest.skip("the bundled toy-llava-eval samples are not built in this checkout")
    ds = open_dataset("toy-llava-eval", limit=6)
    assert ds.name == "toy-llava-eval" and ds.format == "jsonl" and len(ds) == 6
    assert {s.question_type for s in ds} <= {"presence", "global", "local", "mixed"}
    assert ds[0].load_image().mode == "RGB"
