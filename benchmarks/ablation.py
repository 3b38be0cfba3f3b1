"""Ablation with N random draws: ``mechsink.ablation.ablate`` against the naive loop.

Both zero the same token sets at ``proj.out`` (fixed "sink" patches and N = 32 count-matched
random draws of other patches, the draws ``ablate`` made) and score the logit difference
" yes" - " no". The naive loop runs one full forward (ViT included) of the batch per condition
through ``model.run`` with a ``zero_tokens`` edit; ``ablate`` runs the ViT and projector once and
the conditions as stacked copies of the LLM. Agreement: the largest |difference| of the values.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import image_size

TARGET = 3.0
SINKS = (0, 5, 10)     # fixed patch indices standing in for sinks (random models have none)


def images(model, n: int):
    from mechsink.testing import test_image
    return model.prepare([test_image(image_size(model), seed=300 + k) for k in range(n)])


def config(n_draws: int, batch_size: int):
    from mechsink.ablation import AblationConfig
    return AblationConfig(site="proj.out", mode="zero", metric="logit_diff", n_draws=n_draws, batch_size=batch_size)


def run_mechsink(model, batch, cfg):
    from mechsink.ablation import ablate
    return ablate(model, batch, sinks=list(SINKS), config=cfg).frame


def run_naive(model, batch, frame) -> np.ndarray:
    """One full forward per condition; values in ``frame`` row order ([conditions x samples])."""
    from mechsink.metrics import Metric
    from mechsink.trace import zero_tokens
    metric = Metric("logit_diff")
    targets = metric.targets(model, batch)
    tm = batch.token_map
    p = tm.patches
    cols = np.array([tm.grid(s, i, t)[1] for s, i, t in zip(p["sample"], p["image"], p["tile"])])
    patch = p["row"].to_numpy() * cols + p["col"].to_numpy()          # row-major index in the grid
    out = np.zeros(len(frame))
    conds = frame.groupby(["condition", "draw"], sort=False)
    for _, g in conds:
        chosen = np.zeros(len(p), dtype=bool)
        for sample, patches in zip(g["sample"], g["patches"]):
            picked = [int(x) for x in patches.split()] if patches else []
            chosen |= (p["sample"].to_numpy() == sample) & np.isin(patch, picked)
        rows = p[chosen]
        index = (torch.tensor(rows["proj_item"].to_numpy()), torch.tensor(rows["proj_pos"].to_numpy()))
        logits = model.run(batch, write={"proj.out": zero_tokens(index)})["llm.logits"]
        nxt = logits[torch.arange(batch.size), targets.pos][:, None]
        values = metric.score(nxt, targets).numpy()
        out[g.index.to_numpy()] = values[g["sample"].to_numpy()]
    return out


def section(models: dict, args, workdir) -> list:
    from .harness import TARGET_MODEL, compare, timing_rows
    rows = []
    for name, model in models.items():
        n = 8 if name == "tiny-llava" else 2 if name == "vitb-llava" else 1
        draws = args.draws if name != "twin-llava" else min(args.draws, 4)     # 4096-wide copies on a CPU
        batch = images(model, n)
        cfg = config(draws, batch_size=n)
        got: dict = {}
        variants = {"mechsink": lambda: got.__setitem__("frame", run_mechsink(model, batch, cfg)),
                    "naive": lambda: got.__setitem__("naive", run_naive(model, batch, got["frame"]))}
        reps = args.repeats if name == "tiny-llava" else 1
        got["frame"] = run_mechsink(model, batch, cfg)      # the draws the naive loop repeats
        t = compare(variants, repeats=reps, warmup=1 if name == "tiny-llava" else 0)
        f = got["frame"]
        diff = float(np.abs(f["value"].to_numpy() - got["naive"]).max())
        new = timing_rows("ablation", name, t, "mechsink", images=n, draws=draws, conditions=1 + draws,
                          max_abs_diff_vs_naive=diff)
        for r in new:
            if r.variant == "naive" and name == TARGET_MODEL:
                r.goal = f">= {TARGET}"
        rows += new
    return rows
