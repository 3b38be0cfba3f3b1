"""Cache overhead: caching every ViT and LLM block against the bare forward pass.

Every variant does the whole job over the same image files in the same batches: decode the
images, run the processor, run the model, and keep ``vit.out`` (the projector's input) and every
ViT and LLM block output. The baseline and the peers run what a user without mechsink runs: the
HF processor called directly (``hf_inputs``: the chat-format prompt built once, no TokenMap) and
``model.hf(**inputs, use_cache=False)``; only the ``mechsink`` variant pays mechsink's own
bookkeeping (TokenMap, token selection, sink detection), inside ``mechsink.cache.extract``. The
peers keep one batch's outputs in memory until the next batch replaces them (what a loop that
uses and drops them costs at least); mechsink writes them to disk:

- ``bare``: the HF forward alone (the denominator); nothing is kept.
- ``bare_body``: the same without the LM head (``model.hf.model``: ViT, projector and LLM blocks,
  no logits). ``mechsink.cache.extract`` stops the forward after its last site, so when the last
  cached site is the last LLM block it skips the head too; on the twin the head (32000 x 4096 over
  every position) is a sizeable share of the forward, and this row shows how much of mechsink's
  ratio that is. Not a peer of any goal.
- ``torch_hooks``: plain ``register_forward_hook`` on every ViT and LLM block (and a pre-hook on
  the projector for ``vit.out``), outputs kept in memory.
- ``nnsight``: ``NNsight(model).trace`` with ``.save()`` on every ViT and LLM block output and the
  projector's input.
- ``nnsight_disk``: the same, each batch's saved outputs then written with
  ``safetensors.torch.save_file`` (as saved: every token, the model's dtype) - a hand-made cache.
- ``tl``: TransformerLens ``run_with_cache`` on a TransformerBridge of the same model, cache
  filtered to every ViT and LLM block output and ``vision_projector.hook_in`` (the same tensors
  as the other variants).
- ``tl_all``: ``run_with_cache`` with TL's default (every hook point); only with ``--tl-all``.
- ``mechsink``: ``mechsink.cache.extract`` of ``vit.out`` and every ViT block at the image patches
  and every LLM block at the image positions, with sink detection, written to disk as float16
  shards.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from . import lens
from .data import batches, image_set, image_size

VARIANTS = ("bare", "bare_body", "torch_hooks", "nnsight", "nnsight_disk", "tl", "tl_all", "mechsink")
TARGET = 1.03          # mechsink / bare at real widths (vitb-llava), and below nnsight and TL
TARGET_TINY = 1.5      # on tiny-llava (fixed per-batch costs dominate); reported in the row's extra


def cache_sites(model) -> list[str]:
    """vit.out, every ViT block output and every LLM block output (the mechsink site names)."""
    return (["vit.out"] + [f"vit.blocks.{l}.hook_resid_post" for l in range(model.n_vit_layers)]
            + [f"llm.blocks.{l}.hook_resid_post" for l in range(model.n_llm_layers)])


def block_paths(model) -> list[str]:
    a = model.adapter
    return ([f"{a.vit_blocks}.{l}" for l in range(model.n_vit_layers)]
            + [f"{a.llm_blocks}.{l}" for l in range(model.n_llm_layers)])


def vit_out_path(model) -> tuple[str, str]:
    """(module path, "input"|"output") of ``vit.out`` (LLaVA: the projector's input)."""
    path, which = model.adapter.vit_out
    return path.format(last=model.n_vit_layers - 1), which


def hf_prompt(model) -> str:
    """The chat-format prompt with the image placeholder, built once (as a user's script would)."""
    return model.format_prompt(None)


def hf_inputs(model, chunk, prompt: str) -> dict:
    """Forward inputs of a chunk the way a user without mechsink builds them: decode the images, call
    the HF processor (the call ``Model.prepare`` makes, without its TokenMap), no KV cache (which a
    single forward never reuses; mechsink passes ``use_cache=False`` too)."""
    imgs = [s.load_image() for s in chunk]
    a = model.adapter
    inputs = model.processor(images=[[im] for im in imgs] if a.nested_images else imgs, text=[prompt] * len(imgs),
                             return_tensors="pt", padding=True, **a.processor_kwargs)
    dev = model.device
    return {**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in inputs.items()}, "use_cache": False}


def _prepared(model, chunk):
    """A mechsink Batch (processor and TokenMap), for the untimed agreement check."""
    return model.prepare([s.load_image() for s in chunk])


def make(variant: str, model, dataset, batch_size: int, workdir: Path) -> tuple[Callable[[], object], Callable[[], None]]:
    """(run, reset) for one variant; ``run(data=dataset, bs=batch_size)`` (another image set may be
    given, e.g. for a warm-up) and ``reset()`` (untimed) clears what a run left behind."""
    noop = lambda: None  # noqa: E731
    prompt = hf_prompt(model)
    if variant == "bare":
        def run(data=dataset, bs=batch_size):
            with torch.no_grad():
                for chunk in batches(data, bs):
                    model.hf(**hf_inputs(model, chunk, prompt))
        return run, noop
    if variant == "bare_body":
        body = model.hf.model          # LlavaForConditionalGeneration.model: everything but the LM head

        def run(data=dataset, bs=batch_size):
            with torch.no_grad():
                for chunk in batches(data, bs):
                    body(**hf_inputs(model, chunk, prompt))
        return run, noop
    if variant == "torch_hooks":
        mods = [model.module(p) for p in block_paths(model)]
        vo_path, vo_which = vit_out_path(model)

        def run(data=dataset, bs=batch_size):
            saved: list = []
            save = lambda m, a, o: saved.append((o[0] if isinstance(o, tuple) else o).detach())  # noqa: E731
            handles = [m.register_forward_hook(save) for m in mods]
            vo = model.module(vo_path)
            handles.append(vo.register_forward_pre_hook(lambda m, a: saved.append(a[0].detach())) if vo_which == "input"
                           else vo.register_forward_hook(save))
            try:
                with torch.no_grad():
                    for chunk in batches(data, bs):
                        saved.clear()
                        model.hf(**hf_inputs(model, chunk, prompt))
            finally:
                for h in handles:
                    h.remove()
            return saved
        return run, noop
    if variant in ("nnsight", "nnsight_disk"):
        from nnsight import NNsight
        from safetensors.torch import save_file
        nn = NNsight(model.hf)
        paths = block_paths(model)
        vo_path, vo_which = vit_out_path(model)
        nv = model.n_vit_layers
        names = [*paths[:nv], f"{vo_path}.{vo_which}", *paths[nv:]]      # the order the model runs them in
        out = workdir / "nnsight"

        def run(data=dataset, bs=batch_size):
            kept: list = []     # filled inside the trace (nnsight hands back objects, not rebound names)
            out.mkdir(parents=True, exist_ok=True)
            with torch.no_grad():
                for k, chunk in enumerate(batches(data, bs)):
                    kept.clear()
                    with nn.trace(**hf_inputs(model, chunk, prompt)):
                        kept.extend([_envoy(nn, p).output.save() for p in paths[:nv]])
                        vo = _envoy(nn, vo_path)
                        kept.append((vo.input if vo_which == "input" else vo.output).save())
                        kept.extend([_envoy(nn, p).output.save() for p in paths[nv:]])
                    assert len(kept) == len(names) and torch.is_tensor(kept[0])
                    if variant == "nnsight_disk":
                        # vit.out can be a view of a ViT block's output (CLS dropped), which safetensors
                        # refuses to write twice: it gets its own copy (as .contiguous() makes for batches > 1)
                        save_file({p: _own(x[0] if isinstance(x, tuple) else x, p == names[nv]) for p, x in zip(names, kept)},
                                  out / f"batch{k:05d}.safetensors")
            return kept
        return run, lambda: shutil.rmtree(out, ignore_errors=True)
    if variant in ("tl", "tl_all"):
        br = lens.bridge(model)
        names = lens.vit_hooks(model) + ["vision_projector.hook_in"] + lens.llm_hooks(model) if variant == "tl" else None

        def run(data=dataset, bs=batch_size):
            cache = None
            with torch.no_grad():
                for chunk in batches(data, bs):
                    inputs = hf_inputs(model, chunk, prompt)
                    cache = None        # drop the previous batch's cache first, as the other peers do
                    _, cache = br.run_with_cache(inputs.pop("input_ids"), names_filter=names, **inputs)
            return cache
        return run, noop
    if variant == "mechsink":
        from mechsink.cache.extract import extract
        out = workdir / "store"
        sites = cache_sites(model)

        def run(data=dataset, bs=batch_size):
            return extract(model, data, sites=sites, tokens=("image",), out=out, store_dtype="float16", batch_size=bs)
        return run, lambda: shutil.rmtree(out, ignore_errors=True)
    raise ValueError(f"unknown cache variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _own(x: torch.Tensor, copy: bool) -> torch.Tensor:
    return x.clone(memory_format=torch.contiguous_format) if copy and x.is_contiguous() else x.contiguous()


def _envoy(nn, path: str):
    """The nnsight Envoy of a dotted module path."""
    env = nn
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def agreement(model, dataset, batch_size: int, store_path: Path) -> float:
    """Largest |mechsink store - plain-hook value| over every cached vector, relative to the
    largest |value| (float16 storage: about 1e-3 at most)."""
    from mechsink.cache import Store
    from mechsink.sites import Site
    from mechsink.tokens import gather
    store = Store.open(store_path)
    idx = store.index
    worst, scale = 0.0, 0.0
    sites = cache_sites(model)
    mods = dict(zip(sites[1:], [model.module(p) for p in block_paths(model)]))
    vo_path, vo_which = vit_out_path(model)
    start = 0
    for chunk in batches(dataset, batch_size):
        b = _prepared(model, chunk)
        saved: dict = {}

        def keep(site):
            return lambda m, a, o: saved.__setitem__(site, o[0] if isinstance(o, tuple) else o)
        hs = [m.register_forward_hook(keep(site)) for site, m in mods.items()]
        vo = model.module(vo_path)
        hs.append(vo.register_forward_pre_hook(lambda m, a: saved.__setitem__("vit.out", a[0])) if vo_which == "input"
                  else vo.register_forward_hook(keep("vit.out")))
        try:
            with torch.no_grad():
                model.hf(**b.inputs, use_cache=False)
        finally:
            for h in hs:
                h.remove()
        p = b.token_map.patches
        rows = idx[(idx.sample_idx >= start) & (idx.sample_idx < start + len(chunk)) & (idx.token_role == "image")]
        for site in sites:
            ref = gather(saved[site], Site.parse(site).axis, p).float()
            got = torch.as_tensor(store.get(site, rows=rows.row.to_numpy())).float()
            worst = max(worst, float((got - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
        start += len(chunk)
    return worst / scale


TWIN_RSS = ("bare", "nnsight_disk", "mechsink")     # the twin's fresh-process memory runs (about a minute each)


def sizes(name: str, args) -> tuple[int, int, int]:
    """(images, batch size, timed rounds) of a model: the twin is ~10 s of CPU per image, so it runs
    4 images in batches of 2, 2 rounds (2 images, 1 round with --quick)."""
    if name == "tiny-llava":
        return (16, 8, args.repeats) if args.quick else (32, 8, args.repeats)
    if name == "twin-llava":
        return (2, 2, 1) if args.quick else (4, 2, min(args.repeats, 2))
    return (4, 2, args.repeats) if args.quick else (8, 4, args.repeats)


def section(models: dict, args, workdir: Path) -> list:
    """Timing rows for every model (interleaved rounds) plus peak RSS per variant (fresh processes)."""
    from .harness import GOAL_MODELS, compare, measure_rss, timing_rows
    rows: list = []
    for name, model in models.items():
        n, bs, reps = sizes(name, args)
        data = image_set(workdir / "images", n, image_size(model))
        variants = [v for v in VARIANTS if v != "tl_all" or args.tl_all]
        runs, resets = {}, {}
        for v in variants:
            runs[v], resets[v] = make(v, model, data, bs, workdir / name)
        warmup = 1
        if name == "twin-llava":       # a full warm-up round would cost as much as a timed one: one image each
            for v in variants:
                resets[v]()
                runs[v](data[:1], 1)
            warmup = 0
        t = compare(runs, repeats=reps, warmup=warmup, before=lambda v: resets[v]())
        new = timing_rows("cache", name, t, "bare", images=n, batch_size=bs,
                          warmup="one image per variant" if warmup == 0 else "one full round")
        if not (workdir / name / "store" / "summary.json").exists():   # the last timed run's finished store is kept
            shutil.rmtree(workdir / name / "store", ignore_errors=True)
            runs["mechsink"]()
        agree = agreement(model, data, bs, workdir / name / "store")
        for r in new:
            if r.variant == "mechsink":
                r.extra["max_rel_diff_vs_hooks"] = agree
                if name in GOAL_MODELS:
                    r.goal, r.peers = f"<= {TARGET}", ("nnsight_disk", "tl")
                elif name == "tiny-llava":
                    r.extra["target"] = f"<= {TARGET_TINY}"
                    r.extra["within_target_wall"] = bool(r.ratio_wall <= TARGET_TINY)
                    r.extra["within_target_cpu"] = bool(r.ratio_cpu <= TARGET_TINY)
        if not args.no_rss:
            for r in new:
                if args.quick and r.variant not in ("bare", "mechsink"):
                    continue
                if name == "twin-llava" and r.variant not in TWIN_RSS:
                    r.extra["rss"] = "not measured on the twin (a minute per variant); see " + "/".join(TWIN_RSS)
                    continue
                mem = measure_rss(["cache", r.variant, name, str(workdir / "images"), str(n), str(bs),
                                   str(workdir / f"rss-{name}")], device=args.device)
                r.extra.update(mem)
        shutil.rmtree(workdir / name, ignore_errors=True)
        rows += new
    return rows
