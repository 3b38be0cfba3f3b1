"""Peak memory of one variant, measured in this (fresh) process; prints one JSON line.

    python -m benchmarks.rss cache VARIANT MODEL IMAGES_DIR N BATCH WORKDIR
    python -m benchmarks.rss stream MODEL IMAGES_DIR N BATCH WORKDIR

The variant runs once untimed (imports, lazy set-up, allocator warm-up), then the peak-RSS mark is
reset and it runs again; ``run_peak_mb`` is that run's peak minus the RSS it started from.
``stream`` caches N images with ``mechsink.cache.extract`` after a warm-up on a few of them.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)
    from .data import image_set, image_size
    from .harness import peak_rss_kb, reset_peak
    from .models import build
    kind = argv[0]
    if kind == "cache":
        variant, name, folder, n, bs, work = argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), Path(argv[6])
    elif kind == "stream":
        variant, (name, folder, n, bs, work) = "mechsink", (argv[1], argv[2], int(argv[3]), int(argv[4]), Path(argv[5]))
    else:
        raise SystemExit(f"unknown memory run {kind!r}; use cache or stream")
    model = build(name)
    data = image_set(folder, n, image_size(model))
    work = work / f"{kind}-{variant}-{n}"
    shutil.rmtree(work, ignore_errors=True)
    from . import cache
    if kind == "cache":
        run, reset = cache.make(variant, model, data, bs, work)
        run()
        reset()
    else:
        warm, reset = cache.make("mechsink", model, data[: 2 * bs], bs, work / "warm")
        warm()
        reset()
        run, _ = cache.make("mechsink", model, data, bs, work)
    start = reset_peak()
    t = time.perf_counter()
    run()
    wall = time.perf_counter() - t
    peak = peak_rss_kb()
    shutil.rmtree(work, ignore_errors=True)
    return {"start_mb": start / 1024, "run_peak_mb": (peak - start) / 1024, "peak_mb": peak / 1024,
            "rss_wall_s": wall, "rss_images": n}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
