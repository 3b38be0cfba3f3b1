"""The run engine: many conditions of one batch in a few forwards.

A ``Plan`` says what is done to each of ``C`` stacked copies of a batch: ``Write``s (tokens of a
site replaced, per copy, by given values or zeros), attention ``knockout`` of LLM key positions, or
``drop`` (LLM positions deleted). ``execute`` runs the copies chunked along the batch dimension and
scores every row with a Metric. When nothing is written inside the ViT, the ViT and projector run
once per batch: their output, the language model's ``inputs_embeds``, is captured
(``trace.llm_inputs``) and the copies run the LLM alone. ``clean`` is the unchanged run every
analysis compares against; ``source_run`` scores another batch with the base's targets.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float

from .errors import MechsinkError
from .metrics import Metric, Targets, gather_logits
from .models.base import Batch
from .sites import Site
from .tokens import TokenMap
from .trace import LLMInputs, knockout, llm_inputs


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


def execute(model, batch, plan: Plan, metric: Metric | None, targets: Targets, *, inputs: LLMInputs | None = None,
            clean_next: torch.Tensor | None = None, rows_per_forward: int = 64, want_next: bool = False,
            read: Sequence[str] = ()) -> dict:
    """Run ``plan`` on stacked copies of ``batch`` and score every row.

    targets: for the original batch ([B] rows). clean_next: [B, V] clean next-token logits (the
    ``kl`` metric). Returns {"value": [C, B] metric values (or, with ``metric=None``, "logits":
    [C, B, T, V] at ``targets.keep``), "next": [C, B, V] next-token logits when ``want_next``, and
    the ``read`` sites (only for a single copy)}.
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
    values, nexts, acts = [], [], {}
    for c0 in range(0, c_all, per):
        c1 = min(c_all, c0 + per)
        n = c1 - c0
        t = targets.repeat(n)
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
        if metric is None:
            values.append(logits.detach().float().cpu().reshape(n, b, *logits.shape[1:]))
        else:
            cn = clean_next.repeat(n, 1) if clean_next is not None else None
            values.append(metric.score(logits, t, cn).detach().cpu().reshape(n, b))
        if want_next:
            nexts.append(logits[:, 0].detach().float().cpu().reshape(n, b, -1))
        acts.update({k: v for k, v in out.items() if k in set(map(str, map(Site.parse, read)))})
    res = {"value" if metric is not None else "logits": torch.cat(values)}
    if want_next:
        res["next"] = torch.cat(nexts)
    res.update(acts)
    return res


def _site_edits(writes: list[Write], c0: int, c1: int, skip_embed: bool) -> dict:
    """{site: edit} for copies c0..c1; several writes at one site are applied in order."""
    by_site: dict[str, list] = {}
    for w in writes:
        if not (skip_embed and w.site == Site.parse("llm.embed")) and bool(w.mask[c0:c1].any()):
            by_site.setdefault(str(w.site), []).append(_edit(w, c0, c1))

    def chain(fns):
        def edit(x):
            for f in fns:
                x = f(x)
            return x
        return edit
    return {s: chain(fns) for s, fns in by_site.items()}


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
