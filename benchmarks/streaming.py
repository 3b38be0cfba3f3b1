"""Streaming memory: peak RSS of ``mechsink.cache.extract`` over N and 10 N images (tiny-llava).

Every ViT and LLM block is cached at the image tokens, as in the cache section. Each N runs in a
fresh process (see benchmarks.rss); the figure is ``run_peak_mb`` at 10 N over that at N, which
must stay about 1 (shards go to disk as they fill, so memory must not grow with the dataset).
The last step of an extract rebuilds the store's index (one row of metadata per cached token), so
its peak is also measured alone (``merge_peak_mb``); it streams the index in row groups, so it
must not grow with the rows either. Reading the store back (every site and the index, in blocks)
is measured the same way (``read_peak_mb_*``, ``read_peak_ratio``), with the cost of the crc32
checks of a first read (``checksum_read_ratio``: first read / a second read of the same files).
"""
from __future__ import annotations

from pathlib import Path

TARGET = 1.10      # peak at 10 N within 10 % of the peak at N


def _measure(folder, n: int, bs: int, workdir) -> dict:
    """Peak of a whole extract of n images, then of its index merge alone (fresh processes)."""
    import shutil

    from .harness import measure_rss
    got = measure_rss(["stream", "tiny-llava", str(folder), str(n), str(bs), str(workdir)])
    try:
        got.update(measure_rss(["merge", got["store"]]))
        got.update(measure_rss(["read", got["store"]]))
    finally:
        shutil.rmtree(Path(got["store"]).parent, ignore_errors=True)
    return got


def section(models: dict, args, workdir) -> list:
    from .data import image_set
    from .harness import Row
    n_small, n_large = args.stream_images
    bs = 16
    folder = workdir / "stream-images"
    image_set(folder, n_large, 32)          # written once, read by both runs
    small, large = (_measure(folder, n, bs, workdir) for n in (n_small, n_large))
    grow = large["run_peak_mb"] / max(small["run_peak_mb"], 1e-9)
    extra = {"batch_size": bs, f"run_peak_mb_{n_small}": small["run_peak_mb"], f"run_peak_mb_{n_large}": large["run_peak_mb"],
             f"peak_mb_{n_small}": small["peak_mb"], f"peak_mb_{n_large}": large["peak_mb"],
             f"merge_peak_mb_{n_small}": small["merge_peak_mb"], f"merge_peak_mb_{n_large}": large["merge_peak_mb"],
             f"rows_{n_large}": large["rows"],
             f"images_per_s_{n_large}": n_large / large["rss_wall_s"],
             f"read_peak_mb_{n_small}": small["read_peak_mb"], f"read_peak_mb_{n_large}": large["read_peak_mb"],
             "read_peak_ratio": large["read_peak_mb"] / max(small["read_peak_mb"], 1e-9),
             "checksum_read_ratio": large["checksum_read_ratio"], "verify_mb_per_s": large["verify_mb_per_s"],
             f"store_mb_{n_large}": large["store_mb"]}
    # what the extraction loop itself adds is about the whole run's peak less the merge's (an
    # estimate: two peaks, not one trace)
    loop = [max(x["run_peak_mb"] - x["merge_peak_mb"], 1e-9) for x in (small, large)]
    extra.update({f"loop_peak_mb_{n_small}": loop[0], f"loop_peak_mb_{n_large}": loop[1]})
    return [Row("streaming", "tiny-llava", f"peak RSS {n_large} / {n_small} images", None, None, grow, grow,
                f"{n_small} images", f"<= {TARGET}", extra=extra),
            Row("streaming", "tiny-llava", "merge peak, same ratio", None, None,
                large["merge_peak_mb"] / small["merge_peak_mb"], large["merge_peak_mb"] / small["merge_peak_mb"],
                f"{n_small} images", extra={"rows_per_image": large["rows"] / n_large}),
            Row("streaming", "tiny-llava", "loop peak (run - merge), same ratio", None, None, loop[1] / loop[0],
                loop[1] / loop[0], f"{n_small} images", extra={})]
