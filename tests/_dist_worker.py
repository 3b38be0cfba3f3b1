"""Runs ablate, patch_dataset and probe on the planted model / a small cache and, on rank 0,
writes their frames; tests/test_distributed.py runs it as one process and under torchrun.

    python tests/_dist_worker.py OUT STORE
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mechsink  # noqa: E402
from mechsink import distributed  # noqa: E402
from mechsink.ablation import AblationConfig, ablate  # noqa: E402
from mechsink.data import open_dataset  # noqa: E402
from mechsink.metrics import Metric  # noqa: E402
from mechsink.patching import PatchConfig, patch_dataset  # noqa: E402
from mechsink.probing import ProbeConfig, probe  # noqa: E402
from mechsink.zoo import planted as P  # noqa: E402


def main() -> None:
    out, store = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    m = mechsink.load("planted-llava")
    data = open_dataset(P.EVAL_DIR / "samples.jsonl", limit=10)
    metric = Metric("logit_diff", answers=P.COLORS)
    frames = {
        "ablate": ablate(m, data, AblationConfig(mode="resample", n_draws=3, batch_size=4, metric=metric),
                         sinks=P.PLANTED_SINKS).frame,
        "patch": patch_dataset(m, data, PatchConfig(sites=("proj.out", "llm.blocks.1.hook_resid_pre"), n_draws=2,
                                                    batch_size=4, metric=metric), sinks=P.PLANTED_SINKS).frame,
    }
    pr = probe(store, ProbeConfig(label="planted_label", n_boot=100, k=3))
    frames["probe"], frames["splits"] = pr.frame, pr.splits
    if distributed.rank() == 0:
        os.makedirs(out, exist_ok=True)
        for k, f in frames.items():
            f.to_parquet(os.path.join(out, f"{k}.parquet"))
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump({"world": distributed.world(), "notes": pr.meta["notes"], "probes": sorted(map(list, pr.probes))}, f)
    print(f"done rank={distributed.rank()} world={distributed.world()}", flush=True)


if __name__ == "__main__":
    main()
