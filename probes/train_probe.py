#!/usr/bin/env python
"""Train linear probes on an activation cache: sinks vs non-sinks vs CLS vs mean-pooled tokens, per site.

    python probes/train_probe.py --cache CACHE_DIR --label planted_label --out runs/probe_planted

Writes under --out: frame.parquet + result.json (one row per token set and site; config, summary,
notes; ``mechsink.probing.ProbeResult.load(out)`` reads them back), rows.jsonl (rows as they finish; a
rerun with the same arguments resumes from it), probes/<token_set>__<site>.safetensors + .json (weights
and metadata, loadable with mechsink.probing.load_probe), splits.parquet (the images on each side of
every fold) and accuracy_by_layer.png. See probes/README.md.
"""
from __future__ import annotations

import argparse
import logging
import sys

from mechsink.errors import MechsinkError
from mechsink.probing import AGGREGATES, SELECTIONS, TOKEN_SETS, ProbeConfig, probe


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="activation cache directory (a mechsink store)")
    ap.add_argument("--label", required=True, help="index column to predict, e.g. planted_label or patch_row")
    ap.add_argument("--out", required=True, help="output directory (created; reruns resume)")
    ap.add_argument("--token-sets", nargs="+", default=list(TOKEN_SETS), choices=SELECTIONS + AGGREGATES,
                    help="image tokens (sinks, nonsinks, image), cls, or mean (per-image mean of image tokens)")
    ap.add_argument("--sites", nargs="+", default=None, help="cached sites to probe (default: all)")
    ap.add_argument("--model", choices=("logistic", "ridge"), default="logistic")
    ap.add_argument("--C", type=float, default=1.0, help="logistic inverse regularisation strength")
    ap.add_argument("--alpha", type=float, default=1.0, help="ridge penalty")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the CIs (over images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-control", action="store_true", help="skip the shuffled-label control task")
    ap.add_argument("--level", choices=("auto", "image", "patch"), default="auto")
    ap.add_argument("--max-tokens-per-image", type=int, default=64, help="0 keeps every token")
    ap.add_argument("--memory-mb", type=float, default=1024.0,
                    help="features of a (token set, site) held in memory up to this size; larger ones stream from disk")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    try:
        config = ProbeConfig(label=a.label, token_sets=tuple(a.token_sets), sites=a.sites and tuple(a.sites),
                             model=a.model, C=a.C, alpha=a.alpha, k=a.folds, n_boot=a.n_boot, seed=a.seed,
                             control=not a.no_control, level=a.level,
                             max_tokens_per_image=a.max_tokens_per_image or None)
        result = probe(a.cache, config, out=a.out, memory_mb=a.memory_mb)
    except MechsinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(result.frame):
        from mechsink.report.figures import probe_figure
        probe_figure(result).savefig(f"{a.out}/accuracy_by_layer.png", dpi=120)
    cols = ["token_set", "site", "accuracy", "ci_low", "ci_high", "control_accuracy", "selectivity", "majority",
            "n_images"]
    print(result.frame[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for note in result.notes:
        print(f"skipped {note}")
    print(f"wrote {a.out}/frame.parquet, result.json, probes/, accuracy_by_layer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
