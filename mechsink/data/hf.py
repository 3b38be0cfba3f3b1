"""Local Hugging Face datasets written with `datasets.save_to_disk` (needs the `datasets` package).

Columns map as for tables (see mechsink.data.local). The image column is the first column with an
Image feature (else a string column named image/image_path holding paths); images are decoded
only when a Sample asks for them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mechsink.data.core import Sample
from mechsink.data.errors import DataError
from mechsink.data.local import IMAGE_COLUMNS, guess_columns, row_to_sample


def is_hf_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


class _RowImage:
    """Loads one row's encoded image bytes from an undecoded Image column (picklable)."""

    def __init__(self, table: Any, column: str, row: int):
        self.table, self.column, self.row = table, column, row

    def __call__(self) -> bytes | None:
        cell = self.table[self.row][self.column]
        if cell is None:
            return None
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            with open(cell["path"], "rb") as f:
                return f.read()
        return None


def read_hf(
    path: Path, *, split: str | None = None, limit: int | None = None, images_root: Path | None = None
) -> list[Sample]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face dataset; install the `datasets` package to read it") from None

    try:
        ds = datasets.load_from_disk(os.fspath(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad directory
        raise DataError(f"{path}: cannot load Hugging Face dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            want = "pass split=" if split is None else f"no split {split!r};"
            raise DataError(f"{path}: {want} one of {', '.join(splits)}")
        ds = ds[split]
    elif split is not None and split != str(ds.split or split):
        raise DataError(f"{path}: holds a single split {str(ds.split)!r}, not {split!r}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))

    image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None and "Image(" in repr(ds.features.get("image")):
        raise DataError(f"{path}: multi-image rows are not supported (column 'image' holds a list of images)")
    columns = guess_columns(dict.fromkeys(ds.column_names))
    if image_col is not None:
        columns["image"] = image_col
    elif columns["image"] is None:
        raise DataError(f"{path}: no Image feature and no image path column ({', '.join(IMAGE_COLUMNS)})")

    base_dir = images_root or path.resolve()
    if image_col is None:  # image paths in a string column
        return [row_to_sample(r, row_number=i, base_dir=base_dir, columns=columns) for i, r in enumerate(ds.to_list())]

    # Decode nothing now: metadata comes from the other columns, image bytes on demand.
    images = ds.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))
    meta = ds.remove_columns([image_col]).to_list()
    no_image = {**columns, "image": None}
    samples = []
    for i, r in enumerate(meta):
        s = row_to_sample(r, row_number=i, base_dir=base_dir, columns=no_image)
        s.image_loader = _RowImage(images, image_col, i)
        samples.append(s)
    return samples
