"""Sample and Dataset: an ordered, immutable list of image/question records."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from PIL import Image

from mechsink.data.errors import DataError, ImageError
from mechsink.data.images import DEFAULT_MAX_SIDE, decode_image

_FINGERPRINT_VERSION = b"mechsink.data.fingerprint/1\n"


@dataclass
class Sample:
    """One image with (optionally) a question about it.

    Attributes:
        id: stable and unique within its dataset.
        image_path: absolute path of the image file; None when the image lives inside a
            dataset file (a Hugging Face row, a base64 cell) and `image_loader` provides it.
        prompt: the question text without any chat template (may contain "<image>").
        answer: the reference answer, if any.
        question_type: e.g. "presence", "global", "local", "mixed", or a benchmark category.
        labels: every other column, JSON-serialisable (probe targets, metadata).
        image_loader: zero-argument callable returning the encoded image bytes; used only
            when `image_path` is None.
    """

    id: str
    image_path: str | None
    prompt: str | None = None
    answer: str | None = None
    question_type: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    image_loader: Callable[[], bytes] | None = field(default=None, repr=False, compare=False)

    def image_bytes(self) -> bytes:
        """The encoded image bytes. Raises ImageError if they cannot be had."""
        if self.image_path is not None:
            _regular_file(self.image_path)
            try:
                with open(self.image_path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ImageError(
                    f"cannot read image {self.image_path}: {e.strerror or e}", kind="missing", path=self.image_path
                ) from None
        return self._loaded_bytes()

    def load_image(self, max_side: int | None = DEFAULT_MAX_SIDE) -> Image.Image:
        """The image as RGB, longest side at most `max_side`. Raises ImageError if unreadable."""
        if self.image_path is not None:
            return decode_image(self.image_path, max_side=max_side)
        return decode_image(self._loaded_bytes(), max_side=max_side, where=f"of sample {self.id!r}")

    def _loaded_bytes(self) -> bytes:
        if self.image_loader is None:
            raise ImageError(f"sample {self.id!r} has no image", kind="no_image")
        try:
            data = self.image_loader()
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad cell (e.g. invalid base64) spoils one sample only
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ImageError(f"cannot read image of sample {self.id!r}: {msg}", kind="corrupt") from None
        if data is None:
            raise ImageError(f"sample {self.id!r} has no image", kind="no_image")
        return bytes(data)

    def image_digest(self) -> str:
        """sha256 of the image bytes, or a marker saying why there are none (for fingerprints)."""
        if self.image_path is not None:
            h = hashlib.sha256()
            try:
                _regular_file(self.image_path)
            except ImageError as e:
                return e.kind
            try:
                with open(self.image_path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            except OSError:
                return "missing"
            return h.hexdigest()
        try:
            return hashlib.sha256(self._loaded_bytes()).hexdigest()
        except ImageError as e:
            return e.kind


def _regular_file(path: str) -> None:
    """Only regular files are read: a device (/dev/zero) or a FIFO would never end."""
    import os
    import stat
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e.strerror or e}", kind="missing", path=path) from None
    if not stat.S_ISREG(mode):
        what = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise ImageError(f"cannot read image {path}: {what}, not an image file", kind="not_a_file", path=path)


class Dataset(Sequence[Sample]):
    """An ordered collection of Samples with unique ids.

    Attributes:
        name: short human name (bundled name, file stem or folder name).
        format: how it was read ("folder", "jsonl", "hf", "pope", "mme", "mmstar", ...).
        source: where it was read from (a path or a bundled name), for manifests.
    """

    def __init__(self, samples: Iterable[Sample], *, name: str, format: str = "memory", source: str | None = None):
        self._samples: list[Sample] = list(samples)
        self.name = name
        self.format = format
        self.source = source
        seen: set[str] = set()
        for s in self._samples:
            if not isinstance(s.id, str):
                raise DataError(f"dataset {name!r}: sample id {s.id!r} is not a string")
            if s.id in seen:
                raise DataError(f"dataset {name!r}: duplicate sample id {s.id!r}")
            seen.add(s.id)

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> Dataset: ...
    def __getitem__(self, i: int | slice) -> Sample | Dataset:
        if isinstance(i, slice):
            return self._derive(self._samples[i])
        return self._samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, format={self.format!r}, n={len(self)})"

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self._samples]

    def _derive(self, samples: Iterable[Sample]) -> Dataset:
        return Dataset(samples, name=self.name, format=self.format, source=self.source)

    def fingerprint(self) -> str:
        """sha256 hex over every sample's id, text fields, labels and image bytes, in order.

        Independent of where the files live; changes when any image byte changes. Reads
        every image, so it costs one pass over the data.
        """
        h = hashlib.sha256(_FINGERPRINT_VERSION)
        digests: dict[str, str] = {}  # several questions often share one image file
        for s in self._samples:
            meta = [s.id, s.prompt, s.answer, s.question_type, s.labels]
            h.update(json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode())
            if s.image_path is None:
                digest = s.image_digest()
            elif (digest := digests.get(s.image_path)) is None:
                digest = digests[s.image_path] = s.image_digest()
            h.update(b"\0" + digest.encode() + b"\n")
        return h.hexdigest()

    def label_columns(self) -> list[str]:
        """Label keys across all samples, in order of first appearance."""
        cols: dict[str, None] = {}
        for s in self._samples:
            cols.update(dict.fromkeys(s.labels))
        return list(cols)

    def subset(self, n: int | None = None, seed: int = 0) -> Dataset:
        """A random `n` samples (all if n is None or >= len), drawn with `seed`, kept in dataset order."""
        if n is None or n >= len(self):
            return self._derive(self._samples)
        if n < 0:
            raise DataError(f"subset size must be >= 0, got {n}")
        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return self._derive(self._samples[i] for i in keep)

    def to_frame(self):
        """A pandas DataFrame: id, image_path, prompt, answer, question_type, then one column per label."""
        import pandas as pd

        labels = self.label_columns()
        base = ["id", "image_path", "prompt", "answer", "question_type"]
        clash = [c for c in labels if c in base]
        rows = []
        for s in self._samples:
            row = {"id": s.id, "image_path": s.image_path, "prompt": s.prompt, "answer": s.answer,
                   "question_type": s.question_type}
            row.update({(f"label_{k}" if k in clash else k): s.labels.get(k) for k in labels})
            rows.append(row)
        cols = base + [f"label_{k}" if k in clash else k for k in labels]
        return pd.DataFrame(rows, columns=cols)


def jsonable(v: Any) -> Any:
    """Convert a cell value to plain JSON types (numpy/arrow scalars, NaN -> None, nested containers)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return jsonable(v.tolist())
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)
