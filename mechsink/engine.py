"""The run engine: many conditions of one batch in a few forwards.

A ``Plan`` says what is done to each of ``C`` stacked copies of a batch: ``Write``s (tokens of a
site replaced, per copy, by given values or zeros), attention ``knockout`` of LLM key positions, or
``drop`` (LLM positions deleted). ``execute`` runs the copies chunked along the batch dimension and
scores every row with a Metric. When nothing is written inside the ViT, the ViT and projector run
once per batch: their output, the language model's ``inputs_embeds``, is captured
(``trace.llm_inputs``) and the copies run the LLM alone. When every write is at the LLM's
residual stream (a layer x position sweep, path patching), a chunk of copies starts at the first
block it changes from the clean stream, and only for the positions from the first one written on
(earlier positions keep the clean run's keys and values); ``from_layer=False`` is the reference
path that reruns the whole LLM for every copy. ``clean`` is the unchanged run every
analysis compares against; ``source_run`` scores another batch with the base's targets.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float

from .errors import MechsinkError
from .metrics import Metric, Targets, gather_logits
from .models.base import Batch
from .sites import Site
from .tokens import TokenMap
from .trace import LLMInputs, block_kwargs, knockout, llm_inputs, llm_module, run_blocks


class EngineError(MechsinkError, ValueError):
    """A plan that cannot run (mismatched runs, unsupported site or combination)."""


@dataclass
class Write:
    """Overwrite tokens at one site in some copies of a batch.

    mask: bool [C, *tok] -- per copy, which tokens of the site tensor to replace (``tok`` is the
    site tensor's shape for the original batch without the hidden dim, e.g. [items, seq]).
    values: [*tok, d] shared by every copy, [C, *tok, d] per copy, or None for zeros.
    """
    site: Site
    mask: Bool[torch.Tensor, "copies *tok"]
    values: Float[torch.Tensor, "*copies_tok d"] | None = None

    def __post_init__(self):
        self.site = Site.parse(self.site)


@dataclass
class Plan:
    """Everything done to ``n_copies`` stacked copies of a batch in one (chunked) forward.

    knockout: bool [C, B, S] LLM key positions hidden from every other query at ``knockout_layers``
    (None = all LLM layers). drop: bool [C, B, S] LLM positions deleted from the sequence.
    """
    n_copies: int
    writes: list[Write] = field(default_factory=list)
    knockout: Bool[torch.Tensor, "copies batch seq"] | None = None
    knockout_layers: Sequence[int] | None = None
    drop: Bool[torch.Tensor, "copies batch seq"] | None = None

    @property
    def needs_vit(self) -> bool:
        return any(w.site.part == "vit" for w in self.writes)


def repeat_batch(batch: Batch, n: int) -> Batch:
    """``n`` copies of a Batch stacked along the batch dimension (every input tensor concatenated
    ``n`` times; site tensors of the result are the concatenation of the copies' site tensors)."""
    inputs = {k: torch.cat([v] * n) if torch.is_tensor(v) else v for k, v in batch.inputs.items()}
    return Batch(inputs, batch.token_map, batch.prompts * n, batch.images * n,
                 batch.answers * n if batch.answers is not None else None)


def _needs_full(read: Sequence[str]) -> bool:
    """Reading a ViT or projector site needs the whole model to run (not the LLM alone)."""
    return any(Site.parse(s).part != "llm" for s in read)


def _bare_batch(inputs: dict) -> Batch:
    return Batch(inputs, None, [], [])


def _edit(write: Write, c0: int, c1: int) -> Callable[[torch.Tensor], torch.Tensor]:
    mask = write.mask[c0:c1]
    n = c1 - c0

    def edit(x: torch.Tensor) -> torch.Tensor:
        m = mask.reshape(-1, *mask.shape[2:]).to(x.device)
        if tuple(m.shape) != tuple(x.shape[:-1]):
            raise EngineError(f"write at {write.site}: mask for {tuple(m.shape)} tokens but the site holds "
                             f"{tuple(x.shape[:-1])}; does this adapter stack copies along dim 0?")
        v = write.values
        if v is None:
            v = torch.zeros((), dtype=x.dtype, device=x.device)
        elif v.dim() == mask.dim() + 1:                       # per-copy values [C, *tok, d]
            v = v[c0:c1].reshape(-1, *v.shape[2:]).to(x)
        else:
            v = v.to(x).repeat(n, *[1] * (v.dim() - 1))
        return torch.where(m[..., None], v, x)
    return edit


def _proj_to_llm(write: Write, tm: TokenMap, embeds: torch.Tensor) -> Write:
    """A write at proj.out as the same write on the LLM input embeddings (fast path)."""
    p = tm.patches[tm.patches["llm_pos"] >= 0]
    flat = bool((p["proj_item"] < 0).all())
    src = (_long(p["proj_pos"]),) if flat else (_long(p["proj_item"]), _long(p["proj_pos"]))
    dst = (_long(p["sample"]), _long(p["llm_pos"]))
    c = write.mask.shape[0]
    mask = torch.zeros(c, *embeds.shape[:2], dtype=torch.bool)
    mask[(slice(None), *dst)] = write.mask[(slice(None), *src)]
    values = None
    if write.values is not None:
        if write.values.dim() == write.mask.dim() + 1:
            values = embeds[None].repeat(c, 1, 1, 1).clone()
            values[(slice(None), *dst)] = write.values[(slice(None), *src)].to(values)
        else:
            values = embeds.clone()
            values[dst] = write.values[src].to(values)
    return Write("llm.embed", mask, values)


def _drop_inputs(inp: LLMInputs, drop: torch.Tensor, c0: int, c1: int) -> tuple[dict, torch.Tensor]:
    """Delete positions from stacked copies, left-padding rows to a common length.
    Returns (model inputs, position shift [R] to apply to the targets)."""
    if inp.position_ids is not None:
        raise EngineError("drop mode needs a model that builds its own position ids")
    d = drop[c0:c1].reshape(-1, drop.shape[-1])                           # [R, S]
    n = c1 - c0
    e = inp.embeds.repeat(n, 1, 1)
    am = inp.attention_mask.repeat(n, 1) if inp.attention_mask is not None else torch.ones(d.shape, dtype=torch.long)
    keep = ~d.to(e.device)
    lengths = keep.sum(1)
    width = int(lengths.max())
    out_e = e.new_zeros(e.shape[0], width, e.shape[-1])
    out_m = am.new_zeros(e.shape[0], width)
    for r in range(e.shape[0]):
        k = int(lengths[r])
        out_e[r, width - k:] = e[r, keep[r]]
        out_m[r, width - k:] = am[r, keep[r].to(am.device)]
    return {"inputs_embeds": out_e, "attention_mask": out_m}, (width - lengths).cpu()


def _targets_after_drop(t: Targets, drop_rows: torch.Tensor, pad: torch.Tensor) -> Targets:
    before = torch.stack([drop_rows[r, : int(t.pos[r])].sum() for r in range(t.size)])
    return t.shifted(pad - before)


def _boundary(site: Site) -> int | None:
    """The block whose input a residual-stream write changes (n_layers: the final norm's), or
    None for a site inside a block."""
    if site == Site.parse("llm.embed"):
        return 0
    if site.part == "llm" and site.kind in ("resid_pre", "resid_post"):
        return site.layer + (site.kind == "resid_post")
    return None


class KV:
    """Stands in for HF's cache in direct block calls: with ``record`` each layer's keys and values
    are kept (``seen``); otherwise ``prefix[layer]`` (keys and values of the positions before the
    window that runs) is put in front of the window's own."""
    def __init__(self, prefix: Mapping | None = None, record: bool = False):
        self.prefix, self.record, self.seen = prefix or {}, record, {}

    def update(self, k, v, layer, *args, **kwargs):
        if self.record:
            self.seen[layer] = (k, v)
            return k, v
        pk, pv = self.prefix[layer]
        return torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)


class _Resume:
    """Patched LLM runs that start at the first block a chunk's writes reach, from the clean
    residual stream, and only for the positions from the first one written on: earlier positions
    cannot see later ones, so their keys and values are the clean run's (one clean LLM run of the
    batch records the stream entering every block and every layer's keys and values)."""

    def __init__(self, model, inputs: LLMInputs, writes: list[Write], kw: dict):
        self.model, self.writes, self.kw = model, sorted(writes, key=lambda w: (_boundary(w.site), w.site.order)), {}
        self.kv, self.stream = KV(record=True), {}
        run_blocks(model, inputs.embeds, {**kw, "cache": self.kv}, 0, {}, streams=self.stream)
        impl = getattr(model.module(llm_module(model)).config, "_attn_implementation", None)
        self.window, self.sdpa = impl in ("sdpa", "eager"), impl == "sdpa"

    def first(self, c0: int, c1: int, keep: torch.Tensor) -> int:
        """The first position any write of copies c0..c1 changes (at most the first target's)."""
        if not self.window:
            return 0
        cols = [w.mask[c0:c1].reshape(-1, w.mask.shape[-1]).any(0) for w in self.writes if bool(w.mask[c0:c1].any())]
        return min([int(c.nonzero()[0]) for c in cols] + [int(keep.min())])

    def edits(self, c0: int, c1: int, p0: int) -> dict:
        by: dict[int, list] = {}
        for w in self.writes:
            if bool(w.mask[c0:c1].any()):
                v = w.values[..., p0:, :] if w.values is not None else None
                by.setdefault(_boundary(w.site), []).append(_edit(Write(w.site, w.mask[..., p0:], v), c0, c1))
        return {b: _chain(fns) for b, fns in by.items()}

    def kwargs(self, model_inputs: dict, n: int, start: int, p0: int) -> dict:
        """Block keywords for ``n`` stacked copies and the window from ``p0``, with the clean keys
        and values of the earlier positions."""
        if n not in self.kw:
            self.kw[n] = block_kwargs(self.model, model_inputs)
        kw = dict(self.kw[n])
        if p0 == 0:
            return kw
        e = model_inputs["inputs_embeds"]
        s = e.shape[1]
        m = kw.get("attention_mask")
        if m is None:                                    # causal only: a window needs its own mask
            m = torch.ones(s, s, dtype=torch.bool, device=e.device).tril()[None, None]
            if not self.sdpa:
                m = torch.zeros(m.shape, dtype=e.dtype, device=e.device).masked_fill(~m, torch.finfo(e.dtype).min)
        kw["attention_mask"] = m[..., p0:, :]
        kw["position_embeddings"] = tuple(t[..., p0:, :] for t in kw["position_embeddings"])
        for k, v in kw.items():
            if "position" in k and torch.is_tensor(v) and v.shape[-1] == s:
                kw[k] = v[..., p0:]
        kw["cache"] = KV({l: tuple(t[:, :, :p0].repeat(n, 1, 1, 1) for t in self.kv.seen[l])
                          for l in range(start, self.model.n_llm_layers)})
        return kw


def _chunks(writes: list[Write], c_all: int, per: int, n_layers: int) -> list[tuple[int, int, int | None]]:
    """(c0, c1, start) chunks of at most ``per`` copies that share the first block their writes
    change (start None: a write inside a block; such copies rerun the whole LLM)."""
    firsts = []
    for c in range(c_all):
        b = [_boundary(w.site) for w in writes if bool(w.mask[c].any())]
        firsts.append(None if None in b else min(b) if b else n_layers)
    out, c0 = [], 0
    for c in range(1, c_all + 1):
        if c == c_all or c - c0 == per or firsts[c] != firsts[c0]:
            out.append((c0, c, firsts[c0]))
            c0 = c
    return out


def execute(model, batch, plan: Plan, metric: Metric | None, targets: Targets, *, inputs: LLMInputs | None = None,
            clean_next: torch.Tensor | None = None, rows_per_forward: int = 64, want_next: bool = False,
            read: Sequence[str] = (), from_layer: bool = True) -> dict:
    """Run ``plan`` on stacked copies of ``batch`` and score every row.

    targets: for the original batch ([B] rows). clean_next: [B, V] clean next-token logits (the
    ``kl`` metric). from_layer: when every write is at the LLM's residual stream (``llm.embed``,
    ``hook_resid_pre|post``), each chunk of copies starts at the first block it changes, from the
    clean stream (False: every copy runs the whole LLM, the reference path). Returns {"value":
    [C, B] metric values (or, with ``metric=None``, "logits": [C, B, T, V] at ``targets.keep``),
    "next": [C, B, V] next-token logits when ``want_next``, and the ``read`` sites (only for a
    single copy)}.
    """
    b = batch.size
    c_all = plan.n_copies
    full = plan.needs_vit
    if plan.drop is not None and (full or plan.writes):
        raise EngineError("drop mode deletes LLM tokens and cannot be combined with other writes")
    if read and c_all != 1:
        raise EngineError("reading sites is supported for a single copy only")
    if _needs_full(read):
        full = True
    writes = plan.writes
    if not full:
        inputs = inputs if inputs is not None else llm_inputs(model, batch)
        writes = [(_proj_to_llm(w, batch.token_map, inputs.embeds) if w.site == Site.parse("proj.out") else w) for w in writes]
    per = max(1, rows_per_forward // b)
    resume, chunks = None, [(c0, min(c_all, c0 + per), None) for c0 in range(0, c_all, per)]
    if from_layer and not full and writes and plan.drop is None and plan.knockout is None and not read:
        chunks = _chunks(writes, c_all, per, model.n_llm_layers)
        kw = block_kwargs(model, inputs.repeat(1)) if any(x[2] is not None for x in chunks) else None
        if kw is not None:
            resume = _Resume(model, inputs, [w for w in writes if _boundary(w.site) is not None], kw)
    values, nexts, acts = [], [], {}
    for c0, c1, start in chunks:
        n = c1 - c0
        t = targets.repeat(n)
        if resume is not None and start is not None:
            model_inputs = inputs.repeat(n)
            keep = t.keep(model_inputs["inputs_embeds"].shape[1])
            p0 = resume.first(c0, c1, keep)
            hidden = resume.stream[start][:, p0:]
            logits = run_blocks(model, hidden.repeat(n, 1, 1), resume.kwargs(model_inputs, n, start, p0),
                                start, resume.edits(c0, c1, p0), keep - p0)
            _score(values, nexts, logits, metric, t, clean_next, n, b, want_next)
            continue
        if full:
            run_batch = repeat_batch(batch, n) if n > 1 else batch
            seq = batch.inputs["input_ids"].shape[1]
            model_inputs = None
        else:
            if plan.drop is not None:
                model_inputs, pad = _drop_inputs(inputs, plan.drop, c0, c1)
                t = _targets_after_drop(t, plan.drop[c0:c1].reshape(-1, plan.drop.shape[-1]).long(), pad)
            else:
                model_inputs = inputs.repeat(n)
            direct = [w for w in writes if w.site == Site.parse("llm.embed")]
            for w in direct:   # llm.embed writes go straight into inputs_embeds
                model_inputs["inputs_embeds"] = _edit(w, c0, c1)(model_inputs["inputs_embeds"])
            seq = model_inputs["inputs_embeds"].shape[1]
            run_batch = _bare_batch(model_inputs)
        keep = t.keep(seq)
        edits = _site_edits(writes, c0, c1, skip_embed=not full)
        knock = contextlib.nullcontext()
        if plan.knockout is not None:
            km = plan.knockout[c0:c1].reshape(-1, plan.knockout.shape[-1])
            knock = knockout(model, km, plan.knockout_layers)
        with knock:
            out = model.run(run_batch, read=list(read), write=edits,
                            extra_inputs={"logits_to_keep": keep.to(model.device)})
        logits = out["llm.logits"]
        if logits.shape[1] != keep.shape[1]:      # a model that ignored logits_to_keep
            logits = gather_logits(logits, keep)
        _score(values, nexts, logits, metric, t, clean_next, n, b, want_next)
        acts.update({k: v for k, v in out.items() if k in set(map(str, map(Site.parse, read)))})
    res = {"value" if metric is not None else "logits": torch.cat(values)}
    if want_next:
        res["next"] = torch.cat(nexts)
    res.update(acts)
    return res


def _score(values: list, nexts: list, logits, metric, t, clean_next, n: int, b: int, want_next: bool) -> None:
    if metric is None:
        values.append(logits.detach().float().cpu().reshape(n, b, *logits.shape[1:]))
    else:
        cn = clean_next.repeat(n, 1) if clean_next is not None else None
        values.append(metric.score(logits, t, cn).detach().cpu().reshape(n, b))
    if want_next:
        nexts.append(logits[:, 0].detach().float().cpu().reshape(n, b, -1))


def _chain(fns):
    def edit(x):
        for f in fns:
            x = f(x)
        return x
    return edit


def _site_edits(writes: list[Write], c0: int, c1: int, skip_embed: bool) -> dict:
    """{site: edit} for copies c0..c1; several writes at one site are applied in order."""
    by_site: dict[str, list] = {}
    for w in writes:
        if not (skip_embed and w.site == Site.parse("llm.embed")) and bool(w.mask[c0:c1].any()):
            by_site.setdefault(str(w.site), []).append(_edit(w, c0, c1))
    return {s: _chain(fns) for s, fns in by_site.items()}


def clean(model, batch, metric: Metric, *, read: Sequence[str] = (), inputs: LLMInputs | None = None) -> dict:
    """The unchanged run: {"value": [B], "next": [B, V], "targets": Targets, "inputs": LLMInputs,
    plus the ``read`` sites}."""
    targets = metric.targets(model, batch)
    inputs = inputs if inputs is not None else llm_inputs(model, batch)
    out = execute(model, batch, Plan(1), None, targets, inputs=inputs, read=read)
    logits = out.pop("logits")[0]
    out["value"] = metric.score(logits, targets, logits[:, 0])      # the clean run is its own KL reference
    out["next"] = logits[:, 0].float()
    out["targets"] = targets
    out["inputs"] = inputs
    return out


def _long(a) -> torch.Tensor:
    return torch.tensor(np.array(a.to_numpy() if hasattr(a, "to_numpy") else a), dtype=torch.long)




def source_run(model, source: Batch, metric: Metric, base: dict, read: Sequence[str] = ()) -> dict:
    """The source run scored with the base's targets (``base`` is ``clean``'s output; ``kl`` is
    measured against the base run) and its activations at ``read``."""
    out = execute(model, source, Plan(1), None, base["targets"], read=read)
    logits = out.pop("logits")[0]
    out["value"] = metric.score(logits, base["targets"], base["next"])
    out["next"] = logits[:, 0]
    return out
