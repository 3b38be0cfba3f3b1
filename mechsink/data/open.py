"""open_dataset: one entry point that recognises every supported dataset layout."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mechsink.data.benchmarks import is_mmstar_columns, is_pope_record, mme_categories, read_mme, read_mmstar, read_pope
from mechsink.data.core import Dataset
from mechsink.data.errors import DataError
from mechsink.data.hf import is_hf_dir, read_hf
from mechsink.data.local import is_image_file, read_folder, read_single_image, read_table

FORMATS = ("folder", "image", "jsonl", "json", "csv", "tsv", "parquet", "hf", "pope", "mme", "mmstar")

# Bundled names -> JSONL files inside the mechsink package.
BUNDLED_DATASETS: dict[str, str] = {
    "toy-llava-eval": "zoo/toy_llava/eval/samples.jsonl",
    "planted-llava-eval": "zoo/planted_eval/samples.jsonl",
}

# The evaluation set each zoo model uses when a command is given no --data.
MODEL_DEFAULT_DATA: dict[str, str] = {
    "toy-llava": "toy-llava-eval",
    "planted-llava": "planted-llava-eval",
    "planted-llava-null": "planted-llava-eval",
}


def default_data(model_name: str) -> str:
    """The bundled evaluation set for a model (tiny zoo models use the planted set's images)."""
    if model_name in MODEL_DEFAULT_DATA:
        return MODEL_DEFAULT_DATA[model_name]
    if model_name.startswith("tiny-"):
        return "planted-llava-eval"
    raise DataError(f"model {model_name!r} has no bundled evaluation set; pass --data")

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_PREFIX = re.compile(r"^([a-z]{2,}):(.+)$")


def open_dataset(
    spec: str | os.PathLike,
    *,
    format: str | None = None,
    limit: int | None = None,
    images_root: str | os.PathLike | None = None,
    split: str | None = None,
    name: str | None = None,
) -> Dataset:
    """Open a dataset from a path, a "format:path" string, or a bundled name.

    Args:
        spec: a bundled name (see BUNDLED_DATASETS), a path, or "<format>:<path>" such as
            "pope:coco_pope_random.json". Formats: folder, image, jsonl, json, csv, tsv, parquet,
            hf (datasets.save_to_disk), pope, mme, mmstar; detected from the path when not given.
        format: the format, instead of a prefix in `spec`.
        limit: keep only the first `limit` samples (in the dataset's own order).
        images_root: folder that relative image paths are resolved against (tables, POPE, HF
            path columns); default: the folder of the table file.
        split: the split of a saved Hugging Face DatasetDict (needed when it has several).
        name: the Dataset's name (default: bundled name, file stem or folder name).
    Raises:
        DataError: the spec cannot be resolved or the files are malformed (one-line message).
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative integer, got {limit!r}")
    path, fmt, default_name = _resolve(spec, format)
    if not path.exists():
        known = ", ".join(sorted(BUNDLED_DATASETS))
        raise DataError(f"no such file or directory: {path} (bundled datasets: {known})")
    fmt = fmt or detect_format(path)
    root = Path(images_root).expanduser().resolve() if images_root is not None else None
    if root is not None and fmt not in ("jsonl", "json", "csv", "tsv", "parquet", "hf", "pope"):
        raise DataError(f"images_root does not apply to format {fmt!r}")
    if split is not None and fmt != "hf":
        raise DataError(f"split applies only to Hugging Face datasets, not to format {fmt!r}")
    _check_kind(path, fmt)

    if fmt == "folder":
        samples = read_folder(path, limit=limit)
    elif fmt == "image":
        samples = read_single_image(path)[:limit]
    elif fmt in ("jsonl", "json", "csv", "tsv", "parquet"):
        samples = read_table(path, fmt, limit=limit, images_root=root)
    elif fmt == "hf":
        samples = read_hf(path, split=split, limit=limit, images_root=root)
    elif fmt == "pope":
        samples = read_pope(path, images_root=root, limit=limit)
    elif fmt == "mme":
        samples = read_mme(path, limit=limit)
    else:
        samples = read_mmstar(path, limit=limit)
    name = name or default_name or (path.stem if path.is_file() else path.resolve().name)
    return Dataset(samples, name=name, format=fmt, source=default_name or str(path))


def _resolve(spec: str | os.PathLike, format: str | None) -> tuple[Path, str | None, str | None]:
    """(path, explicit format or None, bundled name or None)."""
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown dataset format {format!r}; known: {', '.join(FORMATS)}")
    if isinstance(spec, str) and spec in BUNDLED_DATASETS:
        path = _PACKAGE_DIR / BUNDLED_DATASETS[spec]
        if not path.is_file():
            raise DataError(f"bundled dataset {spec!r} is not installed (missing {path})")
        return path, format or "jsonl", spec
    text = os.fspath(spec)
    m = _PREFIX.match(text) if isinstance(text, str) else None
    if m and m.group(1) in FORMATS:
        if format is not None and format != m.group(1):
            raise DataError(f"format {format!r} contradicts the prefix in {text!r}")
        return Path(m.group(2)).expanduser(), m.group(1), None
    if m and not Path(text).exists():
        raise DataError(f"unknown dataset format {m.group(1)!r} in {text!r}; known: {', '.join(FORMATS)}")
    return Path(text).expanduser(), format, None


def _check_kind(path: Path, fmt: str) -> None:
    wants_dir = fmt in ("folder", "hf", "mme")
    if wants_dir and not path.is_dir():
        raise DataError(f"format {fmt!r} needs a directory, got a file: {path}")
    if fmt not in ("folder", "hf", "mme", "pope") and not path.is_file():
        raise DataError(f"format {fmt!r} needs a file, got a directory: {path}")


def detect_format(path: Path) -> str:
    """Guess the format of an existing path (see open_dataset)."""
    if path.is_dir():
        if is_hf_dir(path):
            return "hf"
        if mme_categories(path):
            return "mme"
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        first = _first_json_record(path)
        return "pope" if first is not None and is_pope_record(first) else suffix[1:]
    if suffix in (".csv", ".tsv", ".parquet"):
        if suffix != ".csv" and is_mmstar_columns(_columns(path)):
            return "mmstar"
        return suffix[1:]
    if is_image_file(path):
        return "image"
    raise DataError(f"cannot tell the dataset format of {path}; pass format= (one of {', '.join(FORMATS)})")


def _first_json_record(path: Path) -> dict | None:
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("["):
                return None  # a JSON array: a generic table
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return None  # let the table reader report the bad line
            return row if isinstance(row, dict) else None
    return None


def _columns(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception:  # noqa: BLE001 - the reader will report the bad file
            return []
    with open(path, encoding="utf-8-sig") as f:
        return f.readline().rstrip("\r\n").split("\t")
