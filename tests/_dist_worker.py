"""Runs ablate, patch_dataset, probe and the report's section drivers (detect_dataset,
attention_stats, visual_subsets, evaluate_reorder) on the planted model / a small cache and, on
rank 0, writes their frames; or runs ``mechsink report`` (the CLI, in this process) and records
every file this rank opened for writing. tests/test_distributed.py runs it as one process and
under torchrun.

    python tests/_dist_worker.py OUT STORE
    python tests/_dist_worker.py report OUT CONFIG AUDIT     # AUDIT.r{rank}.json: the files written
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
from mechsink.analyses.subsets import visual_subsets  # noqa: E402
from mechsink.interventions.reorder import evaluate_reorder  # noqa: E402
from mechsink.probing import ProbeConfig, probe  # noqa: E402
from mechsink.sinks import SinkSpec, detect_dataset  # noqa: E402
from mechsink.sinks.attention import AttentionConfig, attention_stats  # noqa: E402
from mechsink.sinks.norms import NormConfig  # noqa: E402
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
    quantile = SinkSpec(site="vit.out", rule="quantile", params={"q": 0.95})     # calibrated over the ranks
    sinks = detect_dataset(m, data, quantile, batch_size=4, norms=NormConfig())
    frames["detect"], frames["norms"] = sinks.patches, sinks.norms.frame
    frames["attention"] = attention_stats(m, data, None, AttentionConfig(batch_size=4)).frame
    frames["subsets"] = visual_subsets(m, data, batch_size=4).frame
    frames["reorder"] = evaluate_reorder(m, data, batch_size=4).frame
    pr = probe(store, ProbeConfig(label="planted_label", n_boot=100, k=3))
    frames["probe"], frames["splits"] = pr.frame, pr.splits
    if distributed.rank() == 0:
        os.makedirs(out, exist_ok=True)
        for k, f in frames.items():
            f.to_parquet(os.path.join(out, f"{k}.parquet"))
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump({"world": distributed.world(), "notes": pr.meta["notes"], "probes": sorted(map(list, pr.probes)),
                       "tau": sinks.spec.params["tau"], "n_calib": sinks.spec.params["n_calib"]}, f)
    print(f"done rank={distributed.rank()} world={distributed.world()}", flush=True)


def report() -> None:
    """``mechsink report --config CONFIG --out OUT --json``, every file opened for writing recorded
    (a Python audit hook: builtin and os-level opens, renames, mkdirs, removals)."""
    out, config, audit = sys.argv[2:5]
    torch.set_num_threads(1)
    written: list[str] = []
    watched = {"open", "os.rename", "os.replace", "os.mkdir", "os.remove", "os.unlink", "shutil.rmtree", "os.rmdir"}

    def hook(event, args):
        if event not in watched or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if event == "open":
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                    or (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
                return
        for a in args[:2] if event in ("os.rename", "os.replace") else args[:1]:
            if isinstance(a, (str, bytes, os.PathLike)):
                written.append(f"{event} {os.path.abspath(os.fsdecode(a))}")
    sys.addaudithook(hook)
    from mechsink.cli import main as cli
    sys.argv = ["mechsink", "report", "--config", config, "--out", out, "--json"]
    code = 0
    try:
        cli()
    except SystemExit as e:
        code = e.code or 0
    with open(f"{audit}.r{distributed.rank()}.json", "w") as f:
        json.dump({"rank": distributed.rank(), "world": distributed.world(), "written": written}, f)
    sys.exit(code)


if __name__ == "__main__":
    report() if sys.argv[1] == "report" else main()
