"""The fixed inputs: seeded test images written once as PNG files and read back like a dataset."""
from __future__ import annotations

from pathlib import Path

from mechsink.data import Dataset, Sample
from mechsink.testing import test_image


def image_set(folder: str | Path, n: int, size: int = 64, labels: bool = False) -> Dataset:
    """``n`` seeded test images (``size`` px) under ``folder`` as a Dataset; files already there are
    reused. Every variant reads and decodes them from disk, as a run over a real dataset would.
    labels: give every sample an image-level ``label`` (k mod 2; becomes an index column of a cache,
    for the probe driver)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for k in range(n):
        path = folder / f"{size}px-{k:05d}.png"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            test_image(size=size, seed=k).save(tmp, format="PNG")
            tmp.replace(path)
        samples.append(Sample(f"img{k:05d}", str(path), labels={"label": k % 2} if labels else {}))
    return Dataset(samples, name=f"bench-{size}px-{n}")


def image_size(model) -> int:
    """The side the model's processor works at (the images are made this size, so no resizing
    dominates the cost)."""
    return int(model.hf.config.vision_config.image_size)


def batches(dataset: Dataset, batch_size: int):
    for k in range(0, len(dataset), batch_size):
        yield [dataset[i] for i in range(k, min(len(dataset), k + batch_size))]
