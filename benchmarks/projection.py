"""A projection, not a measurement: time and disk of the paper's analyses on LLaVA-1.5-7B over POPE
(3,000 questions on 500 images) on one device, from ``mechsink.plan`` (token counts, bytes per
sample, forwards per analysis, FLOPs of the published 7B model built on the meta device) and
per-block costs measured in this run on the LLaVA-1.5 twin (ViT-L/14-336 at its full 24 blocks and
4096-wide LLM blocks, random weights: the same shapes, so the same cost per block).

- ``t_vit``: the twin's whole ViT (24 blocks, the real depth) on one image, stopped at ``vit.out``;
- ``t_block``: one 4096-wide LLM block on one question's sequence (the plan's token count);
- a full forward of the 7B model = ``t_vit + 32 x t_block``;
- the exact layer x position sweep of one question: every (layer l, image position p) cell runs
  blocks l..31 on positions p..S-1 (``from_layer``), or all 32 blocks on all S (``reference``);
- ``gpu_estimate_s``: the plan's FLOPs at an assumed sustained ``GPU_FLOPS`` (bf16, one
  H100/H200-class GPU at ~40% of peak); an assumption, not a measurement.

With ``--device cuda`` the per-block costs (and so the projection) are the GPU's own.
"""
from __future__ import annotations

import time

import numpy as np
import torch

QUESTIONS, IMAGES, DRAWS = 3000, 500, 32
GPU_FLOPS = 4e14
LAST: dict | None = None


def _time(fn, repeats: int = 3) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def block_costs(model, repeats: int = 3) -> dict:
    """Seconds for the whole ViT on one image and for one LLM block on one question."""
    from mechsink.testing import test_image
    from mechsink.trace import block_kwargs, capture, llm_inputs

    from .data import image_size
    batch = model.prepare([test_image(image_size(model), seed=7)]).to(model.device)
    t_vit = _time(lambda: capture(model, batch.inputs, ["vit.out"]), repeats)
    inp = llm_inputs(model, batch)
    kw = block_kwargs(model, inp.repeat(1))
    block = model.module(model.adapter.llm_blocks)[0]
    with torch.no_grad():
        t_block = _time(lambda: block(inp.embeds, **kw), repeats)
    return {"t_vit": t_vit, "t_block": t_block, "seq_measured": int(inp.embeds.shape[1]), "device": str(model.device)}


def project(costs: dict) -> dict:
    from mechsink.plan import PlanConfig, plan
    L = 32
    sites = ("vit.out", *(f"llm.blocks.{l}.hook_resid_post" for l in range(L)))
    p = plan(PlanConfig(model="twin-llava-1.5-7b:full", n=IMAGES, sites=sites, tokens=("image",), limit=QUESTIONS,
                        causal_limit=QUESTIONS, attention_limit=IMAGES, draws=DRAWS, batch_size=8))
    S = p["tokens"]["seq"]
    t_block = costs["t_block"] * S / costs["seq_measured"]          # linear in tokens at this length
    fwd = costs["t_vit"] + L * t_block
    flops = p["forward_flops_per_sample"]
    llm_share = L * t_block / fwd
    first = S - p["tokens"]["llm_visual"] - 8                        # image tokens start after the chat prefix
    cells = [(l, q) for l in range(L) for q in range(first, first + p["tokens"]["llm_visual"])]
    frac = float(np.mean([(L - l) / L * (S - q) / S for l, q in cells]))
    rows = []

    def row(name, forwards, how, disk=None, vit_only=False, llm_only=False):
        t = forwards * (costs["t_vit"] if vit_only else L * t_block if llm_only else fwd)
        g = forwards * flops * ((1 - llm_share) if vit_only else llm_share if llm_only else 1) / GPU_FLOPS
        rows.append({"analysis": name, "forwards": forwards, "how": how, "time_s": t, "gpu_estimate_s": g,
                     "disk_bytes": disk})

    f = p["forwards"]
    row("forward (one question)", 1, "ViT + 32 LLM blocks")
    row("sink detection", IMAGES, "500 images, ViT only", vit_only=True)
    row("cache (vit.out + 32 LLM blocks, image tokens, fp16)", IMAGES, "500 images, one forward each",
        disk=p["disk_bytes"])
    row("attention statistics", f["attention"]["forwards"], f["attention"]["formula"])
    row("ablation (sinks vs 32 matched draws)", QUESTIONS * (2 + DRAWS), f"{QUESTIONS} x (clean + sinks + {DRAWS} draws); "
        "ViT once per question, draws as LLM-only copies", llm_only=True)
    row("patching (selections x 33 sites)", f["patching"]["forwards"], f["patching"]["formula"])
    row("exact sweep, one question (from_layer)", len(cells) * frac, f"{len(cells)} cells x {frac:.3f} of an LLM forward",
        llm_only=True)
    row("exact sweep, one question (reference)", len(cells), f"{len(cells)} cells x a full LLM forward", llm_only=True)
    return {"label": "PROJECTION (not measured): LLaVA-1.5-7B, POPE 3,000 questions / 500 images, one device "
                     "(probes read the cache: no forwards)",
            "costs": {**costs, "t_block_at_plan_seq": t_block, "plan_seq": S, "forward_s": fwd},
            "gpu_flops_assumed": GPU_FLOPS, "rows": rows, "plan_disk_bytes": p["disk_bytes"],
            "plan_bytes_per_sample": p["bytes_per_sample_total"]}


def _fmt_s(s: float) -> str:
    return f"{s:.3g} s" if s < 120 else f"{s / 60:.3g} min" if s < 7200 else f"{s / 3600:.3g} h" if s < 172800 else f"{s / 86400:.3g} d"


def table(p: dict) -> str:
    c = p["costs"]
    out = [p["label"], f"measured on {c['device']}: ViT (24 blocks) {c['t_vit']:.3g} s/image, one 4096-wide LLM block "
           f"{c['t_block']:.3g} s at {c['seq_measured']} tokens; full forward {c['forward_s']:.3g} s; GPU estimate at an "
           f"assumed {p['gpu_flops_assumed']:.0e} FLOP/s"]
    head = ["analysis", "forwards", f"time ({c['device']})", "GPU estimate", "disk"]
    lines = [[r["analysis"], f"{r['forwards']:,.0f}", _fmt_s(r["time_s"]), _fmt_s(r["gpu_estimate_s"]),
              "-" if r["disk_bytes"] is None else f"{r['disk_bytes'] / 1e9:.3g} GB"] for r in p["rows"]]
    w = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out += ["  ".join(str(x).ljust(k) for x, k in zip(head, w))] + ["  ".join(str(x).ljust(k) for x, k in zip(l, w)) for l in lines]
    return "\n".join(out)


def section(models: dict, args, workdir) -> list:
    global LAST
    model = models.get("twin-llava")
    if model is None:
        LAST = {"label": "projection skipped: it measures block costs on the twin-llava model, which did not run"}
        return []
    LAST = project(block_costs(model, repeats=1 if args.quick else 3))
    return []
