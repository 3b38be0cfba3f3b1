"""Decoding images robustly, and keeping a record of the ones that could not be read.

Every image leaves here as 8-bit RGB, with its pixels as stored (no EXIF rotation), because
that is what the published LVLM evaluation code feeds its processors. Very large images are
downscaled so that their longer side is at most `max_side`; the model's processor resizes further.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from mechsink.data.errors import ImageError



class _HasImage(Protocol):
    """What iter_images needs of a sample (mechsink.data.core.Sample is one); a protocol, so that
    this module does not import core, which imports it."""
    id: str
    image_path: str | None

    def load_image(self, max_side: int | None = ...) -> Image.Image: ...

log = logging.getLogger("mechsink.data")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
DEFAULT_MAX_SIDE = 4096


def decode_image(
    source: bytes | str | os.PathLike, *, max_side: int | None = DEFAULT_MAX_SIDE, where: str | None = None
) -> Image.Image:
    """Decode an encoded image (a file path or its bytes) to an RGB PIL image.

    Args:
        source: path of an image file, or the encoded bytes of one.
        max_side: longest side allowed; larger images are downscaled keeping the aspect ratio.
            None keeps the stored size.
        where: how to name the image in error messages (defaults to the path, or "<bytes>").
    Raises:
        ImageError: the image is missing, empty, not an image, truncated, too large or corrupt.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = where or "<bytes>"
        path = None
        if len(source) == 0:
            raise ImageError(f"cannot read image {where}: empty (0 bytes)", kind="empty")
        fp: Any = io.BytesIO(source)
    else:
        path = os.fspath(source)
        where = where or path
        try:
            size = os.stat(path).st_size
        except OSError:
            raise ImageError(f"cannot read image {where}: file not found", kind="missing", path=path) from None
        if not os.path.isfile(path):      # a directory, a device such as /dev/zero or a FIFO never ends
            raise ImageError(f"cannot read image {where}: not a regular file", kind="not_a_file", path=path)
        if size == 0:
            raise ImageError(f"cannot read image {where}: empty file (0 bytes)", kind="empty", path=path)
        fp = path
    try:
        with warnings.catch_warnings():
            # Big-but-legal images only warn; we downscale them below, so the warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                if max_side is not None and max(img.size) > max_side:
                    # thumbnail() lets JPEG decode at reduced scale: cheap for huge photos.
                    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
                else:
                    img.load()
                return _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageError(f"cannot read image {where}: too large ({_first_line(e)})", kind="too_large", path=path) from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {where}: not an image file", kind="not_an_image", path=path) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure means this one image is unusable
        msg = _first_line(e)
        kind = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise ImageError(f"cannot read image {where}: {kind} ({type(e).__name__}: {msg})", kind=kind, path=path) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High-bit-depth grey: convert('L') would clip everything above 255 to white.
        a = np.asarray(img, dtype=np.float64)
        if a.size and a.max() > 255:
            a = a * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return img.convert("RGB")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class SkippedImage:
    """One sample whose image could not be read."""

    sample_id: str
    image_path: str | None
    reason: str
    kind: str


class ErrorLog:
    """Samples skipped because their image was unreadable: who, where, why.

    `iter_images` fills it; `write` saves it as errors.jsonl; `summary` is a small dict for manifests.
    """

    def __init__(self) -> None:
        self.records: list[SkippedImage] = []
        self.n_seen = 0  # samples looked at by iter_images, good or bad

    def add(self, sample_id: str, image_path: str | None, error: ImageError | str) -> None:
        reason = str(error)
        kind = getattr(error, "kind", "corrupt")
        self.records.append(SkippedImage(sample_id, image_path, reason, kind))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SkippedImage]:
        return iter(self.records)

    def summary(self) -> dict[str, Any]:
        """{"n_seen", "n_loaded", "n_skipped", "by_kind": {kind: count}}."""
        by_kind = Counter(r.kind for r in self.records)
        return {
            "n_seen": self.n_seen,
            "n_loaded": max(self.n_seen - len(self.records), 0),
            "n_skipped": len(self.records),
            "by_kind": dict(sorted(by_kind.items())),
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write one JSON line per skipped sample. A directory, or a path without a suffix, gets
        errors.jsonl inside it.

        The file is replaced atomically, so a crash never leaves half a log. Returns the file path.
        """
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "errors.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in self.records:
                    f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def __repr__(self) -> str:
        return f"ErrorLog(n_skipped={len(self)}, n_seen={self.n_seen})"


def iter_images(
    ds: Iterable[_HasImage], *, errors: ErrorLog | None = None, max_side: int | None = DEFAULT_MAX_SIDE
) -> Iterator[tuple[_HasImage, Image.Image]]:
    """Yield (sample, RGB image) for every readable image; skip and record the rest.

    A skipped sample is logged at WARNING level and, when `errors` is given, recorded there.
    """
    for sample in ds:
        if errors is not None:
            errors.n_seen += 1
        try:
            image = sample.load_image(max_side=max_side)
        except ImageError as e:
            log.warning("skipping sample %r: %s", sample.id, e)
            if errors is not None:
                errors.add(sample.id, sample.image_path, e)
            continue
        yield sample, image


def test_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: a bright square on a dark, mildly textured background."""
    rng = np.random.default_rng(seed)
    a = (rng.random((size, size, 3)) * 40).astype("uint8")
    q = size // 4
    a[q:2 * q + q // 2, q:2 * q + q // 2] = [220, 180, 40]
    return Image.fromarray(a)
