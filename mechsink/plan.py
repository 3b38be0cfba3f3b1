"""`mechsink plan`: what a run will cost before it runs, from the model's structure alone.

The model is built on the meta device (no weights, no memory): a twin at its published depth
(``twin-llava-1.5-7b`` plans the real 7B model), a ``save_pretrained`` folder or a cached hub id
from its config. Its processor runs on one blank image of the planned size, so token counts are
the processor's own (576 for LLaVA-1.5 at 336 px, NeXT's any-res count, Qwen's ``smart_resize``
grid). From those counts and the config's widths:

- tokens per sample: LLM sequence, visual tokens in the LLM, ViT tokens (per item x items);
- bytes per sample at each cached site: rows x width x store-dtype bytes, where rows are what
  `mechsink cache` writes (one row per selected token at every site);
- disk for a cache of ``n`` samples (tensors exactly; the parquet index approximately);
- GPU memory at the batch size: weights (exact parameter count x dtype) + the largest transient
  activation of one block or of the logits + the cached rows + attention patterns read (eager);
- forwards each section of a report needs (sample-forwards, from the report's sizes).

Every number comes with the arithmetic that produced it (``arithmetic`` in the JSON).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import Config
from .errors import MechsinkError
from .sites import Site

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}


class PlanError(MechsinkError):
    pass


@dataclass(frozen=True)
class PlanConfig(Config):
    model: str = "twin-llava-1.5-7b"
    n: int = 1000                                        # samples in the dataset
    sites: tuple[str, ...] = ("vit.out", "proj.out")     # sites to cache
    tokens: tuple[str, ...] = ("image",)                 # token selections (as `mechsink cache --tokens`)
    image_size: tuple[int, int] = (640, 480)             # width, height of the planned images
    prompt: str | None = None
    batch_size: int = 8
    dtype: str = "bfloat16"                              # the model's dtype on the device
    store_dtype: str = "float16"                         # the cache's dtype
    patterns: tuple[str, ...] = ()                       # attention-pattern sites read (eager attention)
    expected_sinks: float = 4.0                          # per image, for a "sinks"-only selection
    limit: int = 240                                     # report sizes (ReportConfig's defaults)
    causal_limit: int = 96
    attention_limit: int = 64
    draws: int = 16

    def __post_init__(self):
        for k in ("dtype", "store_dtype"):
            if getattr(self, k) not in BYTES:
                raise PlanError(f"{k} must be one of float32, float16, bfloat16; got {getattr(self, k)!r}")
        if self.n < 1 or self.batch_size < 1:
            raise PlanError("n and batch_size must be >= 1")


def open_meta(name: str):
    """A mechsink Model whose weights live on the meta device (twins at their published depth)."""
    import importlib

    from .models import ZOO, Model, adapter_for, load
    zoo = importlib.import_module(ZOO)           # the zoo is found by name, as models.load finds it
    if name.startswith("twin-") and name.partition(":")[0] in zoo.ZOO:
        return load(name if ":" in name else f"{name}:full")   # ":full" builds on the meta device
    if name in zoo.ZOO:
        return load(name)            # small zoo models: built for real, it costs nothing
    import transformers
    from accelerate import init_empty_weights
    try:
        cfg = transformers.AutoConfig.from_pretrained(name)
    except OSError as e:
        raise PlanError(f"cannot read the config of {name!r} (not a zoo name, a save_pretrained folder or a cached "
                        f"hub id)") from e
    arch = (getattr(cfg, "architectures", None) or [type(cfg).__name__.replace("Config", "Model")])[0]
    ad = adapter_for(arch)
    with init_empty_weights():
        hf = getattr(transformers, arch)(cfg)
    if ad.processor_loader is not None:
        proc = ad.processor_loader(name)
    else:
        proc = (transformers.AutoImageProcessor if ad.vision_only else transformers.AutoProcessor).from_pretrained(name)
    return Model(hf, proc, ad, str(name))


def _widths(model) -> dict[str, int]:
    cfg = model.hf.config
    vc = getattr(cfg, "vision_config", cfg)
    vit = getattr(vc, "embed_dim", None) or vc.hidden_size
    vit_ffn = getattr(vc, "intermediate_size", None) or int(vit * getattr(vc, "mlp_ratio", 4))
    out = {"vit": vit, "vit_ffn": vit_ffn, "vit_heads": getattr(vc, "num_heads", None) or vc.num_attention_heads}
    if not model.adapter.vision_only:
        tc = cfg.get_text_config()
        out.update(llm=tc.hidden_size, llm_ffn=tc.intermediate_size, llm_heads=tc.num_attention_heads,
                   vocab=tc.vocab_size)
    return out


def site_width(model, site: str) -> int:
    """Width of one token's vector at a site (the last axis of what `mechsink cache` stores)."""
    s = Site.parse(site)
    w = _widths(model)
    name = str(s)
    if name == "llm.logits":
        return w["vocab"]
    if name == "proj.out" or s.part == "llm":
        return w["llm_ffn"] if s.kind == "mlp_post" else w["llm"]
    return w["vit_ffn"] if s.kind == "mlp_post" else w["vit"]


def _gb(b: float) -> str:
    return f"{b / 1e9:.3f} GB"


def _tokens(model, config: PlanConfig) -> dict[str, Any]:
    from PIL import Image
    from .tokens import ROLE
    img = Image.new("RGB", tuple(config.image_size), (127, 127, 127))
    batch = model.prepare([img], [config.prompt])
    tm = batch.token_map
    roles = tm.roles[0]
    items = {}
    for f in (tm.patches, tm.special):
        for it, pos in zip(f["vit_item"], f["vit_pos"]):
            if pos >= 0:
                items.setdefault(int(it), set()).add(int(pos))
    per_item = [len(v) for v in items.values()]
    return {"batch": batch, "token_map": tm, "seq": int(len(roles)),
            "llm_visual": int(np.isin(roles, [ROLE["image"], ROLE["newline"]]).sum()),
            "llm_text": int((roles == ROLE["text"]).sum()), "vit_items": len(per_item),
            "vit_tokens_per_item": max(per_item) if per_item else 0, "vit_tokens": int(sum(per_item)),
            "patches": int(len(tm.patches)), "grids": {str(k): list(v) for k, v in tm.grids.items()}}


def _rows(tm, config: PlanConfig) -> tuple[int, str]:
    """Rows `mechsink cache` writes per sample for the token selection."""
    from types import SimpleNamespace
    from .cache.extract import token_rows
    sel = [t for t in config.tokens if t != "sinks"]
    placeholder = SimpleNamespace(patches=tm.patches.assign(norm=np.nan, is_sink=True),
                                  special=tm.special.assign(norm=np.nan, is_sink=False))
    n = len(token_rows(tm, placeholder, sel)) if sel else 0
    how = f"{n} rows for {','.join(sel)}" if sel else ""
    if "sinks" in config.tokens and "image" not in config.tokens:
        n_img = int(tm.patches[["sample", "image"]].drop_duplicates().shape[0])
        extra = config.expected_sinks * n_img
        n += extra
        how = (how + " + " if how else "") + f"{config.expected_sinks:g} expected sinks x {n_img} image(s)"
    return n, how


def plan(config: PlanConfig) -> dict[str, Any]:
    """The plan as a JSON-ready dict (see the module docstring)."""
    model = open_meta(config.model)
    for s in (*config.sites, *config.patterns):
        model.locate(s)                                    # out-of-range sites fail here, in one line
    w = _widths(model)
    tk = _tokens(model, config)
    tm = tk.pop("token_map")
    tk.pop("batch")
    arith: list[str] = []
    mb, sb = BYTES[config.dtype], BYTES[config.store_dtype]
    B, n = config.batch_size, config.n

    rows, how = _rows(tm, config)
    per_site = {}
    for s in config.sites:
        width = site_width(model, s)
        per_site[s] = int(round(rows * width * sb))
        arith.append(f"{s}: {how} x {width} wide x {sb} B = {per_site[s]:,} B per sample")
    per_sample = sum(per_site.values())
    index_row = 80                                          # parquet index, approximate bytes per row
    disk = per_sample * n + rows * n * index_row
    arith.append(f"disk: {per_sample:,} B x {n} samples + ~{index_row} B index x {rows:g} rows x {n} = {_gb(disk)}")

    n_params = sum(p.numel() for p in model.hf.parameters())
    weights = n_params * mb
    arith.append(f"weights: {n_params:,} parameters x {mb} B ({config.dtype}) = {_gb(weights)}")
    S, T, items = tk["seq"], tk["vit_tokens_per_item"], tk["vit_items"]
    vit_flat = model.adapter.family.startswith("qwen")
    vit_tok = tk["vit_tokens"]
    vit_block = B * vit_tok * (3 * w["vit"] + 2 * w["vit_ffn"]) * mb
    transient = {"vit block": vit_block}
    arith.append(f"vit block transient: {B} x {vit_tok} tokens x (3 x {w['vit']} + 2 x {w['vit_ffn']}) x {mb} B = {_gb(vit_block)}")
    if "llm" in w:
        llm_block = B * S * (3 * w["llm"] + 3 * w["llm_ffn"]) * mb
        logits = B * S * w["vocab"] * mb
        transient.update({"llm block": llm_block, "logits": logits})
        arith.append(f"llm block transient: {B} x {S} tokens x (3 x {w['llm']} + 3 x {w['llm_ffn']}) x {mb} B = {_gb(llm_block)}")
        arith.append(f"logits: {B} x {S} x {w['vocab']} x {mb} B = {_gb(logits)}")
    held_sites = int(B * per_sample / sb * mb)
    arith.append(f"cached rows held per batch: {B} x {per_sample:,} B / {sb} x {mb} = {_gb(held_sites)}")
    patterns = {}
    for s in config.patterns:
        site = Site.parse(s)
        if site.part == "llm":
            b = B * w["llm_heads"] * S * S * mb
            arith.append(f"{s}: {B} x {w['llm_heads']} heads x {S}^2 x {mb} B = {_gb(b)}")
        elif vit_flat:   # Qwen's ViT: one block-diagonal [heads, N, N] over the whole batch
            b = w["vit_heads"] * (B * vit_tok) ** 2 * mb
            arith.append(f"{s}: {w['vit_heads']} heads x ({B} x {vit_tok})^2 x {mb} B = {_gb(b)} (dense block-diagonal)")
        else:
            b = B * items * w["vit_heads"] * T * T * mb
            arith.append(f"{s}: {B} x {items} item(s) x {w['vit_heads']} heads x {T}^2 x {mb} B = {_gb(b)}")
        patterns[s] = int(b)
    eager_extra = 0
    if patterns:   # eager attention materialises one block's scores in fp32 before the softmax
        eager_extra = max(patterns.values()) * 4 // mb
        arith.append(f"eager softmax in float32 (largest pattern): {_gb(eager_extra)}")
    peak = max(transient.values())
    gpu = weights + peak + held_sites + sum(patterns.values()) + eager_extra
    arith.append(f"GPU: weights + max transient ({max(transient, key=transient.get)}) + held rows + patterns "
                 f"(+ eager) = {_gb(gpu)}")

    vit_params = sum(p.numel() for p in model.module(model.adapter.vit_blocks).parameters())
    flops = 2 * vit_params * vit_tok
    if "llm" in w:
        llm_params = sum(p.numel() for p in model.module(model.adapter.llm_blocks).parameters())
        flops += 2 * llm_params * S + 2 * S * w["llm"] * w["vocab"]
        arith.append(f"forward FLOPs per sample: 2 x {vit_params:,} x {vit_tok} + 2 x {llm_params:,} x {S} "
                     f"+ 2 x {S} x {w['llm']} x {w['vocab']} = {flops:.3e}")
    forwards = report_forwards(model, config)
    return {"model": model.name, "family": model.adapter.family, "vit_layers": model.n_vit_layers,
            "llm_layers": model.n_llm_layers, "image_size": list(config.image_size), "tokens": tk,
            "widths": w, "rows_per_sample": rows, "bytes_per_sample": per_site, "bytes_per_sample_total": per_sample,
            "disk_bytes": int(disk), "gpu_bytes": {"weights": int(weights), "transient": {k: int(v) for k, v in transient.items()},
                                                   "held_rows": held_sites, "patterns": patterns,
                                                   "eager_softmax": int(eager_extra), "total": int(gpu)},
            "n_parameters": int(n_params), "forward_flops_per_sample": float(flops), "forwards": forwards,
            "config": {**asdict(config), "image_size": list(config.image_size)}, "arithmetic": arith}


def report_forwards(model, config: PlanConfig) -> dict[str, dict]:
    """Sample-forwards (one sample through the model once) each report section runs."""
    L, d = model.n_llm_layers, config.draws
    c, p = config.causal_limit, config.causal_limit // 2
    pd_ = max(2, d // 4)
    n_sites = 1 + L
    return {
        "detection": {"forwards": config.limit, "formula": f"{config.limit} samples x 1 (ViT only)"},
        "attention": {"forwards": 2 * config.attention_limit,
                      "formula": f"{config.attention_limit} x (1 detection + 1 eager full forward)"},
        "probes": {"forwards": config.limit, "formula": f"{config.limit} x 1 cache pass (stops after the last site)"},
        "ablation": {"forwards": c * (2 + d), "formula": f"{c} x (1 clean + 1 sinks + {d} random draws)"},
        "patching": {"forwards": p * (2 + n_sites * (2 + pd_)),
                     "formula": f"{p} x (2 clean + {n_sites} sites x (sinks + image + {pd_} random))"},
        "subsets": {"forwards": 3 * config.limit, "formula": f"{config.limit} x 3 (full, sinks only, non-sinks only)"},
        "reorder": {"forwards": 5 * config.limit, "formula": f"{config.limit} x (1 original + 2 orders x 2 position-id modes)"},
    }


def human(p: dict) -> str:
    t = p["tokens"]
    lines = [f"{p['model']} ({p['family']}: {p['vit_layers']} ViT blocks, {p['llm_layers']} LLM blocks, "
             f"{p['n_parameters']:,} parameters), image {p['image_size'][0]}x{p['image_size'][1]}",
             f"tokens per sample: {t['seq']} in the LLM ({t['llm_visual']} visual, {t['llm_text']} text); "
             f"ViT {t['vit_items']} item(s) x {t['vit_tokens_per_item']} tokens",
             "", "arithmetic:"] + [f"  {a}" for a in p["arithmetic"]]
    lines += ["", f"disk for the cache: {_gb(p['disk_bytes'])}; GPU memory: {_gb(p['gpu_bytes']['total'])}", "",
              "forwards per report section:"]
    lines += [f"  {k:10s} {v['forwards']:8,d}  ({v['formula']})" for k, v in p["forwards"].items()]
    return "\n".join(lines)
