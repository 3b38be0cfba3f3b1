"""Dataset -> model batches, skipping unreadable images (logged) and showing progress."""
from __future__ import annotations

from typing import Iterator, Sequence

from tqdm.auto import tqdm

from .data import Dataset, ErrorLog, Sample, iter_images


def batches(model, dataset: Dataset | Sequence[Sample], batch_size: int = 8, *, errors: ErrorLog | None = None,
            answers: bool = False, progress: bool | str = True) -> Iterator[tuple[list[Sample], "object"]]:
    """Yield (samples, Batch) over `dataset`. Bad images are skipped and recorded in `errors`;
    with `answers=True` the gold answers are appended (teacher forcing, role "answer")."""
    desc = progress if isinstance(progress, str) else f"{getattr(model, 'name', 'model')}"
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, leave=False)
    buf: list[tuple[Sample, object]] = []

    def flush():
        samples = [s for s, _ in buf]
        batch = model.prepare([im for _, im in buf], [s.prompt for s in samples],
                              [s.answer for s in samples] if answers else None)
        bar.update(len(buf))
        buf.clear()
        return samples, batch

    try:
        for sample, image in iter_images(dataset, errors=errors):
            buf.append((sample, image))
            if len(buf) == batch_size:
                yield flush()
        if buf:
            yield flush()
    finally:
        bar.close()
