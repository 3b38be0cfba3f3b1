"""Plain local datasets: an image folder, or a table (JSONL, JSON, CSV, TSV, Parquet) of rows.

A table row maps to a Sample by column name:
    id             <- id | question_id            (else the 0-based row number)
    image          <- image | image_path          (a path relative to the table file, or bytes)
    prompt         <- prompt | question
    answer         <- answer
    question_type  <- question_type | type
and every other column goes into `labels`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mechsink.data.core import Sample, jsonable
from mechsink.data.errors import DataError
from mechsink.data.images import IMAGE_EXTENSIONS

ID_COLUMNS = ("id", "question_id")
IMAGE_COLUMNS = ("image", "image_path")
PROMPT_COLUMNS = ("prompt", "question")
ANSWER_COLUMNS = ("answer",)
TYPE_COLUMNS = ("question_type", "type")


# ---------------------------------------------------------------- folders


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def iter_image_files(root: Path) -> Iterator[Path]:
    """Image files under `root`, recursively, hidden entries skipped, in sorted relative-path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if is_image_file(Path(f))]
    yield from sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_folder(root: Path, *, limit: int | None = None) -> list[Sample]:
    """One sample per image; id = path relative to `root`; labels = {"folder": parent dir name},
    "" for images directly in `root` (so the labels do not depend on where the folder lives)."""
    root = root.resolve()
    samples = []
    for p in iter_image_files(root):
        if limit is not None and len(samples) >= limit:
            break
        folder = p.parent.name if p.parent != root else ""
        samples.append(Sample(id=p.relative_to(root).as_posix(), image_path=str(p), labels={"folder": folder}))
    if not samples and limit != 0:
        raise DataError(f"no image files found under {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return samples


def read_single_image(path: Path) -> list[Sample]:
    path = path.resolve()
    return [Sample(id=path.name, image_path=str(path), labels={"folder": ""})]


# ---------------------------------------------------------------- reading table files


def read_json_records(path: Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file, or of a .json file holding one array (or JSON lines, as POPE ships)."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected an array of objects")
        return rows[:limit] if limit is not None else rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_delimited(
    path: Path, *, sep: str, limit: int | None = None, infer_numbers: bool = True
) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV file. Text fields stay text ("007", "NA" and "None" included); only empty
    cells become None; with `infer_numbers`, label columns that are entirely numeric become numbers."""
    import pandas as pd

    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""], nrows=limit)
    except (ValueError, pd.errors.ParserError) as e:
        kind = "TSV" if sep == "\t" else "CSV"
        raise DataError(f"{path}: cannot parse as {kind} ({str(e).splitlines()[0]})") from None
    text_cols = set(ID_COLUMNS + IMAGE_COLUMNS + PROMPT_COLUMNS + ANSWER_COLUMNS + TYPE_COLUMNS)
    for c in df.columns if infer_numbers else ():
        if c not in text_cols:
            try:
                df[c] = pd.to_numeric(df[c])
            except (ValueError, TypeError):
                pass
    df = df.astype(object).where(df.notna(), None)
    return df.to_dict(orient="records")


def read_parquet(path: Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read as Parquet ({str(e).splitlines()[0]})") from None
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def read_table_rows(
    path: Path, fmt: str, *, limit: int | None = None, infer_numbers: bool = True
) -> list[dict[str, Any]]:
    if fmt in ("jsonl", "json"):
        return read_json_records(path, limit=limit)
    if fmt in ("csv", "tsv"):
        return read_delimited(path, sep="," if fmt == "csv" else "\t", limit=limit, infer_numbers=infer_numbers)
    if fmt == "parquet":
        return read_parquet(path, limit=limit)
    raise DataError(f"not a table format: {fmt!r}")


# ---------------------------------------------------------------- rows -> samples


def _bytes_of(data: bytes) -> bytes:
    return data


def first_present(row: dict[str, Any], names: Iterable[str]) -> str | None:
    for n in names:
        if n in row:
            return n
    return None


def text_or_none(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return v if isinstance(v, str) else str(v)


def image_ref(value: Any, base_dir: Path) -> tuple[str | None, Any]:
    """(absolute image path, bytes loader) for an image cell: a path, raw bytes or {"bytes", "path"}."""
    if isinstance(value, dict):  # Hugging Face Image feature as stored in Parquet/Arrow
        if value.get("bytes"):
            return None, functools.partial(_bytes_of, bytes(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return None, functools.partial(_bytes_of, bytes(value))
    value = text_or_none(value)
    if not value:
        return None, None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve()), None


def row_to_sample(
    row: dict[str, Any],
    *,
    row_number: int,
    base_dir: Path,
    columns: dict[str, str | None] | None = None,
) -> Sample:
    """Map one row to a Sample. `columns` names the column for id/image/prompt/answer/question_type
    (None: no such column); when omitted they are looked up by the usual names."""
    if columns is None:
        columns = guess_columns(row)
    used = {c for c in columns.values() if c}
    image_path, loader = (None, None)
    if columns.get("image"):
        image_path, loader = image_ref(row.get(columns["image"]), base_dir)
    sid = text_or_none(row.get(columns["id"])) if columns.get("id") else None
    labels = {k: jsonable(v) for k, v in row.items() if k not in used and not isinstance(v, (bytes, bytearray))}
    return Sample(
        id=sid if sid is not None else str(row_number),
        image_path=image_path,
        prompt=text_or_none(row.get(columns["prompt"])) if columns.get("prompt") else None,
        answer=text_or_none(row.get(columns["answer"])) if columns.get("answer") else None,
        question_type=text_or_none(row.get(columns["question_type"])) if columns.get("question_type") else None,
        labels=labels,
        image_loader=loader,
    )


def guess_columns(row: dict[str, Any]) -> dict[str, str | None]:
    return {
        "id": first_present(row, ID_COLUMNS),
        "image": first_present(row, IMAGE_COLUMNS),
        "prompt": first_present(row, PROMPT_COLUMNS),
        "answer": first_present(row, ANSWER_COLUMNS),
        "question_type": first_present(row, TYPE_COLUMNS),
    }


def rows_to_samples(
    rows: list[dict[str, Any]], *, base_dir: Path, where: str, columns: dict[str, str | None] | None = None
) -> list[Sample]:
    """Samples from table rows; the column mapping is fixed from the union of all rows' keys."""
    if columns is None:
        keys: dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(r))
        columns = guess_columns(keys)
    if rows and not columns.get("image"):
        raise DataError(f"{where}: no image column (expected one of: {', '.join(IMAGE_COLUMNS)})")
    return [row_to_sample(r, row_number=i, base_dir=base_dir, columns=columns) for i, r in enumerate(rows)]


def read_table(path: Path, fmt: str, *, limit: int | None = None, images_root: Path | None = None) -> list[Sample]:
    rows = read_table_rows(path, fmt, limit=limit)
    return rows_to_samples(rows, base_dir=images_root or path.resolve().parent, where=str(path))
