"""Writes a synthetic, deterministic activation store; the crash and torchrun tests run it as a process.

Sample i yields ``(i * 7) % 5`` tokens (so some samples are empty), and its tensors are a pure
function of i, so any interrupted-and-resumed run must reproduce the uninterrupted store exactly.

    python tests/_cache_worker.py OUT [--samples 40] [--dtype float16] [--shard-rows 8] [--batch 3] [--sleep 0.02]

Under torchrun each rank writes the samples with ``i % world_size == rank``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mechsink.cache import StoreConfig, StoreWriter  # noqa: E402

SITES = ("vit.out", "llm.blocks.1.hook_resid_post")
DIMS = {"vit.out": 8, "llm.blocks.1.hook_resid_post": 12}
ROLES = ["cls", "image", "image", "register", "text"]
CONFIG = StoreConfig(sites=SITES, tokens=("image", "cls", "register", "text"), model="synthetic", data="worker-v1")


def n_tokens(i: int) -> int:
    return (i * 7) % 5


def make_sample(i: int) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Rows and tensors {site: [n_tokens(i), d]} of sample i (float32, before storage rounding)."""
    n = n_tokens(i)
    g = torch.Generator().manual_seed(1000 + i)
    tensors = {s: torch.randn(n, DIMS[s], generator=g) * (1 + i % 4) for s in SITES}
    norm = tensors["vit.out"].norm(dim=1).numpy().astype(np.float32)
    j = np.arange(n)
    rows = pd.DataFrame(
        {
            "sample_idx": i,
            "sample_id": f"img{i:03d}",
            "image_path": f"images/{i:03d}.png",
            "token_role": [ROLES[k] for k in j],
            "image": 0,
            "tile": -1,
            "patch_row": j // 2,
            "patch_col": j % 2,
            "llm_pos": 5 + j,
            "norm": norm,
            "is_sink": norm > 8.0,
            "sink_class": np.where(norm > 8.0, "vit", "none"),
            "planted_label": f"class{i % 3}",
        },
        index=j,
    )
    return rows, tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--shard-rows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.02)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    w = StoreWriter(args.out, CONFIG, shard_rows=args.shard_rows, dtype=args.dtype)
    done = w.done_samples()
    todo = [i for i in range(w.rank, args.samples, w.world_size) if i not in done]
    print(f"ready rank={w.rank} todo={len(todo)}", flush=True)
    for k in range(0, len(todo), args.batch):
        chunk = todo[k : k + args.batch]
        parts = [make_sample(i) for i in chunk]
        time.sleep(args.sleep * len(chunk))  # stands in for model compute
        rows = pd.concat([p[0] for p in parts], ignore_index=True)
        tensors = {s: torch.cat([p[1][s] for p in parts]) for s in SITES}
        w.add(rows, tensors, samples=chunk)
        print(f"added {chunk[-1]}", flush=True)  # lets a test time its kill -9
    w.finalize()
    print(f"done rank={w.rank}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
