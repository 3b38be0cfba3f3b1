"""Streaming memory: peak RSS of ``mechsink.cache.extract`` over N and 10 N images, and of the probe
and ablation drivers over N and 10 N images.

- tiny-llava (default N = 200): every ViT and LLM block and ``vit.out`` cached at the image tokens,
  as in the cache section. Each N runs in a fresh process (see benchmarks.rss); the figure is
  ``run_peak_mb`` at 10 N over that at N, which must stay about 1 (shards go to disk as they fill,
  so memory must not grow with the dataset). The last step of an extract rebuilds the store's index
  (one row of metadata per cached token), so its peak is also measured alone (``merge_peak_mb``).
  Reading the store back (every site and the index, in blocks) is measured the same way
  (``read_peak_mb_*``, ``read_peak_ratio``), with the cost of the crc32 checks of a first read
  (``checksum_read_ratio``: first read / a second read of the same files).
- the probe driver (``mechsink.probing.probe``, ``benchmarks.rss.PROBE``: an image-level label,
  two sites, token sets image / nonsinks / mean) over the tiny-llava stores of N and 10 N images,
  with ``memory_mb=rss.PROBE_MEMORY_MB`` (0.25), below one token set at N: both runs stream their
  features from the store as a large cache does (a cache within the budget is held instead).
- the probe driver again over two synthetic stores of 2,000 images, 16 and 160 tokens each
  (``benchmarks.rss tokens``; 160 is past the default cap of 64 tokens per image, so the capped
  sets are drawn as on a real model's 576): the ratio of their peaks says whether anything the
  probe holds grows with the tokens.
- the ablation driver (``mechsink.ablation.ablate``: zero at ``proj.out``, 3 fixed patches, 32
  random draws, batches of 16) over N and 10 N tiny-llava images read from disk, with ``out=`` (the
  rows stream to disk; the result returned holds a few numbers per image, ``held_mb_*``), its
  summary at the end included. That summary's peak alone (``summary_peak_mb_*``, from a fresh
  load) is the statistics' fixed-size blocks (``mechsink.stats``), which fill up at about 2,000
  images; the frame read back in memory is reported for scale (``result_mb_*``).
- the twin at cut depth (``twin-cut``: LLaVA-1.5-7B twin, ViT-L/14-336 cut to 2 blocks, one
  4096-wide LLM block), with the twin-llava model in the run: ``vit.out`` and both ViT blocks at the
  576 image patches (the forward stops after the last ViT site), in 32 MiB shards so that N already
  spans shards, N = 20 and 200 (``--twin-stream-images``).
"""
from __future__ import annotations

from pathlib import Path

TARGET = 1.10      # peak at 10 N within 10 % of the peak at N
FLOOR_MB = 1.0     # a part's peak below this is allocator noise (a merge that starts by trimming the
                   # heap can even peak below where it started): ratios of parts count it as this


TWIN_STREAM = dict(sites="vit", shard_mb=32, batch_size=4)
TOKENS = (16, 160)   # tokens per image of the probe's synthetic stores (160: the set capped at 64 per image)
TOKENS_IMAGES = 2000  # their images: enough that a set fills the fit's blocks (at 200 x 16 tokens it does not)


def _measure(model: str, folder, n: int, bs: int, workdir, sites: str = "all", shard_mb: float | None = None,
             probe: bool = False) -> dict:
    """Peak of a whole extract of n images, then of its index merge alone, of reading it back and
    (``probe``) of the probe driver over it (fresh processes)."""
    import shutil

    from .harness import measure_rss
    extra = [sites] + ([str(shard_mb)] if shard_mb else [])
    got = measure_rss(["stream", model, str(folder), str(n), str(bs), str(workdir), *extra], timeout=1800)
    try:
        got.update(measure_rss(["merge", got["store"]]))
        got.update(measure_rss(["read", got["store"]]))
        if probe:
            got.update(measure_rss(["probe", got["store"]]))
    finally:
        shutil.rmtree(Path(got["store"]).parent, ignore_errors=True)
    return got


def _extract_rows(model: str, small: dict, large: dict, n_small: int, n_large: int, bs: int, **note) -> list:
    from .harness import Row
    grow = large["run_peak_mb"] / max(small["run_peak_mb"], 1e-9)
    extra = {"batch_size": bs, **note, f"run_peak_mb_{n_small}": small["run_peak_mb"],
             f"run_peak_mb_{n_large}": large["run_peak_mb"],
             f"peak_mb_{n_small}": small["peak_mb"], f"peak_mb_{n_large}": large["peak_mb"],
             f"merge_peak_mb_{n_small}": small["merge_peak_mb"], f"merge_peak_mb_{n_large}": large["merge_peak_mb"],
             f"rows_{n_large}": large["rows"],
             f"images_per_s_{n_large}": n_large / large["rss_wall_s"],
             f"read_peak_mb_{n_small}": small["read_peak_mb"], f"read_peak_mb_{n_large}": large["read_peak_mb"],
             "read_peak_ratio": large["read_peak_mb"] / max(small["read_peak_mb"], 1e-9),
             "checksum_read_ratio": large["checksum_read_ratio"], "verify_mb_per_s": large["verify_mb_per_s"],
             f"store_mb_{n_large}": large["store_mb"], "sites": large["sites"],
             # the whole process's peak (what a user's job sees) and what each extra image added
             "process_peak_ratio": large["peak_mb"] / max(small["peak_mb"], 1e-9),
             "growth_bytes_per_image": (large["run_peak_mb"] - small["run_peak_mb"]) * 2**20 / (n_large - n_small)}
    # what the extraction loop itself adds is about the whole run's peak less the merge's (an
    # estimate: two peaks, not one trace)
    loop = [max(x["run_peak_mb"] - x["merge_peak_mb"], FLOOR_MB) for x in (small, large)]
    extra.update({f"loop_peak_mb_{n_small}": loop[0], f"loop_peak_mb_{n_large}": loop[1]})
    merge = max(large["merge_peak_mb"], FLOOR_MB) / max(small["merge_peak_mb"], FLOOR_MB)
    return [Row("streaming", model, f"peak RSS {n_large} / {n_small} images", None, None, grow, grow,
                f"{n_small} images", f"<= {TARGET}", extra=extra),
            Row("streaming", model, "merge peak, same ratio", None, None, merge, merge,
                f"{n_small} images", extra={"rows_per_image": large["rows"] / n_large}),
            Row("streaming", model, "loop peak (run - merge), same ratio", None, None, loop[1] / loop[0],
                loop[1] / loop[0], f"{n_small} images", extra={})]


def section(models: dict, args, workdir) -> list:
    from .data import image_set
    from .harness import Row, measure_rss
    from .rss import PROBE, PROBE_MEMORY_MB
    n_small, n_large = args.stream_images
    bs = 16
    folder = workdir / "stream-images"
    image_set(folder, n_large, 32, labels=True)          # written once, read by every run
    drivers = not args.quick                              # the probe and ablation runs (about a minute)
    small, large = (_measure("tiny-llava", folder, n, bs, workdir, probe=drivers) for n in (n_small, n_large))
    rows = _extract_rows("tiny-llava", small, large, n_small, n_large, bs)
    if drivers:
        ratio = large["probe_peak_mb"] / max(small["probe_peak_mb"], 1e-9)
        rows.append(Row("streaming", "tiny-llava", f"probe driver peak {n_large} / {n_small} images", None, None,
                        ratio, ratio, f"{n_small} images", f"<= {TARGET}",
                        extra={f"probe_peak_mb_{n_small}": small["probe_peak_mb"],
                               f"probe_peak_mb_{n_large}": large["probe_peak_mb"],
                               "probe_growth_bytes_per_index_row": (large["probe_peak_mb"] - small["probe_peak_mb"])
                               * 2**20 / max(large["probe_rows"] - small["probe_rows"], 1),
                               f"probe_tokens_{n_small}": small["probe_tokens"],
                               f"probe_tokens_{n_large}": large["probe_tokens"],
                               f"probe_s_{n_large}": large["probe_s"], "probes": large["probes"],
                               "config": {k: list(v) if isinstance(v, tuple) else v for k, v in PROBE.items()},
                               "memory_mb": PROBE_MEMORY_MB}))
        # the same probe over TOKENS_IMAGES images of 16 and of 160 tokens each: memory must not grow with the tokens
        tok = {t: measure_rss(["tokens", str(TOKENS_IMAGES), str(t), str(workdir)], timeout=1800) for t in TOKENS}
        a, b = tok[TOKENS[0]], tok[TOKENS[1]]
        ratio = b["probe_peak_mb"] / max(a["probe_peak_mb"], 1e-9)
        rows.append(Row("streaming", "synthetic", f"probe driver peak {TOKENS[1]} / {TOKENS[0]} tokens per image",
                        None, None, ratio, ratio, f"{TOKENS_IMAGES} images", f"<= {TARGET}",
                        extra={**{f"probe_peak_mb_{t}_tokens": tok[t]["probe_peak_mb"] for t in TOKENS},
                               **{f"probe_tokens_{t}_tokens": tok[t]["probe_tokens"] for t in TOKENS},
                               **{f"probe_s_{t}_tokens": tok[t]["probe_s"] for t in TOKENS},
                               "index_rows": b["probe_rows"], "images": TOKENS_IMAGES, "memory_mb": PROBE_MEMORY_MB}))
        abl = {n: measure_rss(["ablate", "tiny-llava", str(folder), str(n), str(bs), "32"], timeout=1800)
               for n in (n_small, n_large)}
        a, b = abl[n_small], abl[n_large]
        ratio = b["ablate_peak_mb"] / max(a["ablate_peak_mb"], 1e-9)
        rows.append(Row("streaming", "tiny-llava", f"ablate driver peak {n_large} / {n_small} images", None, None,
                        ratio, ratio, f"{n_small} images", f"<= {TARGET}",
                        extra={f"ablate_peak_mb_{n_small}": a["ablate_peak_mb"],
                               f"ablate_peak_mb_{n_large}": b["ablate_peak_mb"],
                               f"summary_peak_mb_{n_small}": a["summary_peak_mb"],
                               f"summary_peak_mb_{n_large}": b["summary_peak_mb"],
                               f"held_mb_{n_small}": a["ablate_held_mb"], f"held_mb_{n_large}": b["ablate_held_mb"],
                               f"result_mb_{n_small}": a["ablate_result_mb"], f"result_mb_{n_large}": b["ablate_result_mb"],
                               "growth_mb": b["ablate_peak_mb"] - a["ablate_peak_mb"],
                               f"ablate_rows_{n_large}": b["ablate_rows"], f"ablate_parts_{n_large}": b["ablate_parts"],
                               f"ablate_disk_mb_{n_large}": b["ablate_disk_mb"],
                               f"ablate_s_{n_small}": a["ablate_s"], f"ablate_s_{n_large}": b["ablate_s"],
                               "draws": 32, "batch_size": bs}))
    if "twin-llava" in models and not args.quick:
        tn_small, tn_large = args.twin_stream_images
        tfolder = workdir / "stream-twin-images"
        image_set(tfolder, tn_large, 336, labels=True)
        c = TWIN_STREAM
        tsmall, tlarge = (_measure("twin-cut", tfolder, n, c["batch_size"], workdir, c["sites"], c["shard_mb"])
                          for n in (tn_small, tn_large))
        rows += _extract_rows("twin-cut", tsmall, tlarge, tn_small, tn_large, c["batch_size"],
                              shard_mb=c["shard_mb"], model_spec="twin-llava-1.5-7b:vit=2,llm=1")
    return rows
