"""Published benchmark layouts: POPE, MME and MMStar, read as they are distributed.

POPE    JSON lines {"question_id", "image", "text", "label"} (the POPE repo's coco_pope_{random,
        popular,adversarial}.json) or LLaVA's merged test file with a "category" field. Images are
        COCO val2014 files, found under `images_root` (default: the file's folder).
MME     the eval_tool release: one folder per category, either `images/` + `questions_answers_YN/`
        or image files next to same-named .txt files; every .txt line is "question<TAB>Yes|No".
MMStar  mmstar.parquet (index, question, image, answer, category, l2_category, meta_info) or the
        VLMEvalKit MMStar.tsv (same columns, image as base64).
"""

from __future__ import annotations

import base64
import functools
import re
from pathlib import Path
from typing import Any

from mechsink.data.core import Sample, jsonable
from mechsink.data.errors import DataError
from mechsink.data.images import IMAGE_EXTENSIONS
from mechsink.data.local import image_ref, read_json_records, read_table_rows, text_or_none

# ---------------------------------------------------------------- POPE

POPE_KEYS = ("question_id", "image", "text")
_POPE_OBJECT = re.compile(r"^\s*is there an? (.+?) in the (?:image|picture)\s*\?", re.IGNORECASE)
_POPE_CATEGORY = re.compile(r"pope_([a-z]+)$", re.IGNORECASE)


def is_pope_record(row: dict[str, Any]) -> bool:
    return all(k in row for k in POPE_KEYS) and "prompt" not in row and "question" not in row


def pope_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
    if not files:
        raise DataError(f"{path}: no POPE .json/.jsonl files in this folder")
    return files


def read_pope(path: Path, *, images_root: Path | None = None, limit: int | None = None) -> list[Sample]:
    """POPE questions; question_type "presence"; labels: category (random/popular/adversarial),
    object (parsed from "Is there a X in the image?") and any other field.

    ids are the question_id; when several files are read (a folder) or ids repeat, they are
    prefixed by the category: "random/17".
    """
    files = pope_files(path)
    records: list[tuple[dict[str, Any], str | None, Path]] = []
    for f in files:
        m = _POPE_CATEGORY.search(f.stem)
        file_category = m.group(1).lower() if m else None
        for row in read_json_records(f, limit=None if limit is None else limit - len(records)):
            if not all(k in row for k in POPE_KEYS):
                missing = [k for k in POPE_KEYS if k not in row]
                raise DataError(f"{f}: not a POPE record (missing {', '.join(missing)}): {str(row)[:80]}")
            records.append((row, text_or_none(row.get("category")) or file_category, f))
        if limit is not None and len(records) >= limit:
            break
    qids = [str(r["question_id"]) for r, _, _ in records]
    prefixed = len(files) > 1 or len(set(qids)) < len(qids)
    samples = []
    for (row, category, f), qid in zip(records, qids):
        base = images_root or f.resolve().parent
        image_path, _ = image_ref(row["image"], base)
        m = _POPE_OBJECT.match(row["text"])
        labels = {"category": category, "object": m.group(1).strip() if m else None}
        labels.update({k: jsonable(v) for k, v in row.items() if k not in (*POPE_KEYS, "label", "category")})
        answer = text_or_none(row.get("label", row.get("answer")))
        samples.append(Sample(
            id=f"{category or f.stem}/{qid}" if prefixed else qid,
            image_path=image_path,
            prompt=row["text"],
            answer=answer.strip().lower() if answer is not None else None,
            question_type="presence",
            labels=labels,
        ))
    return samples


# ---------------------------------------------------------------- MME

MME_EVAL_TYPE = {
    **dict.fromkeys(
        ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"],
        "Perception",
    ),
    **dict.fromkeys(["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"], "Cognition"),
}
_MME_LINE = re.compile(r"^.+\t\s*(yes|no)\s*$", re.IGNORECASE)


def _is_mme_category(d: Path) -> bool:
    if (d / "questions_answers_YN").is_dir():
        return True
    for txt in sorted(d.glob("*.txt"))[:3]:  # image + .txt pairs: the .txt must look like MME Q/A lines
        lines = [ln for ln in txt.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        if lines and _MME_LINE.match(lines[0]):
            return True
    return False


def mme_categories(root: Path) -> list[Path]:
    """Category folders of an MME release: `root` itself, its children, or its grandchildren
    (the release nests them as MME_Benchmark_release_version/MME_Benchmark/<category>)."""
    if _is_mme_category(root):
        return [root]
    for depth in (1, 2):
        dirs = sorted(root.glob("/".join(["*"] * depth)))
        cats = [d for d in dirs if d.is_dir() and not d.name.startswith(".") and _is_mme_category(d)]
        if cats:
            return cats
    return []


def read_mme(root: Path, *, limit: int | None = None) -> list[Sample]:
    """MME questions; id "<category>/<image stem>#<k>" (k: line in the .txt, 0 = usually the "Yes"
    question); question_type = category; labels: category, eval_type (Perception/Cognition),
    image_file, question_index."""
    cats = mme_categories(root)
    if not cats:
        raise DataError(f"{root}: not an MME release (no category folder with questions_answers_YN/ or Q/A .txt files)")
    samples: list[Sample] = []
    for cat_dir in cats:
        cat = cat_dir.name
        qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "questions_answers_YN").is_dir() else cat_dir
        img_dir = cat_dir / "images" if (cat_dir / "images").is_dir() else cat_dir
        images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        for txt in sorted(qa_dir.glob("*.txt")):
            image = images.get(txt.stem)
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for k, line in enumerate(lines):
                if limit is not None and len(samples) >= limit:
                    return samples
                if "\t" not in line:
                    raise DataError(f"{txt}:{k + 1}: expected 'question<TAB>answer', got {line[:60]!r}")
                question, answer = (x.strip() for x in line.rsplit("\t", 1))
                samples.append(Sample(
                    id=f"{cat}/{txt.stem}#{k}",
                    image_path=str(image.resolve()) if image else None,
                    prompt=question,
                    answer=answer,
                    question_type=cat,
                    labels={"category": cat, "eval_type": MME_EVAL_TYPE.get(cat),
                            "image_file": image.name if image else None, "question_index": k},
                ))
    return samples


# ---------------------------------------------------------------- MMStar

MMSTAR_COLUMNS = ("index", "question", "answer", "category", "l2_category")


def is_mmstar_columns(columns: Any) -> bool:
    return all(c in columns for c in MMSTAR_COLUMNS) and "image" in columns


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=False)


def read_mmstar(path: Path, *, limit: int | None = None) -> list[Sample]:
    """MMStar questions; id = index; question_type = category (e.g. "coarse perception");
    answer = the option letter; labels: category, l2_category, meta_info and any other column."""
    fmt = {".parquet": "parquet", ".tsv": "tsv"}.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: MMStar is read from mmstar.parquet or MMStar.tsv")
    rows = read_table_rows(path, fmt, infer_numbers=False)
    if rows and not is_mmstar_columns(rows[0]):
        raise DataError(f"{path}: not MMStar (needs columns {', '.join(MMSTAR_COLUMNS)}, image)")
    by_index = {text_or_none(r["index"]): r["image"] for r in rows}
    if limit is not None:
        rows = rows[:limit]
    samples = []
    for r in rows:
        image = r["image"]
        if isinstance(image, str):
            # VLMEvalKit stores a repeated image once: other rows hold the index of that row.
            if len(image) <= 64 and image in by_index and isinstance(by_index[image], str):
                image = by_index[image]
            image_path, loader = None, functools.partial(_b64decode, image) if image else None
        else:
            image_path, loader = image_ref(image, path.resolve().parent)
        samples.append(Sample(
            id=text_or_none(r["index"]),
            image_path=image_path,
            prompt=text_or_none(r["question"]),
            answer=text_or_none(r["answer"]),
            question_type=text_or_none(r["category"]),
            labels={k: jsonable(v) for k, v in r.items() if k not in ("index", "question", "answer", "image")},
            image_loader=loader,
        ))
    return samples
