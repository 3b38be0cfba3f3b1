"""All hook plumbing: reading and writing sites in one forward pass, and the plain-hook tools.

``run(model, batch, read=[...], write={site: edit})`` reads and edits sites inside one nnsight
trace and returns the read tensors by site name. An edit is a function ``value -> new value`` (it
may also modify ``value`` in place and return it); reads at an edited site see the edited value.
Sites are visited in execution order, as nnsight requires.

The plain torch-hook tools are for hot paths that need no edits: ``capture`` (every asked site's
tensor, passed through a function as soon as it exists, with the forward stopped after the last
one), ``llm_inputs`` (what the language model receives, without running it) and ``knockout``
(attention from every query to chosen keys masked).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Bool, Float

from .errors import MechsinkError, SiteError
from .sites import Site

Edit = Callable[[torch.Tensor], torch.Tensor]


def _expand(sites: set[Site]) -> set[Site]:
    """Add the sites a derived site is computed from (resid_mid = resid_pre + attn_out)."""
    out = set(sites)
    for s in sites:
        if s.kind == "resid_mid":
            out |= {Site(s.part, "resid_pre", s.layer), Site(s.part, "attn_out", s.layer)}
    return out


def run(model, batch, read: Sequence[str | Site] = (), write: dict | None = None, *,
        grad: bool = False, remote: bool = False, extra_inputs: dict | None = None) -> dict[str, torch.Tensor]:
    """Forward ``batch`` once; return {site name: tensor} for ``read`` (plus ``"llm.logits"`` when
    the model has an LM head and it was not asked for, because nearly every analysis wants it)."""
    reads = [Site.parse(s) for s in read]
    writes = {Site.parse(k): v for k, v in (write or {}).items()}
    if not model.adapter.vision_only and model.adapter.lm_head:
        reads.append(Site.parse("llm.logits"))
    for s in writes:
        if s.kind == "pattern" and model.locate(s)[1] == "derived":
            raise SiteError(f"site {s} is recomputed from the attention inputs and cannot be written")
    sites = _expand(set(reads) | set(writes))
    eager = any(s.kind == "pattern" for s in sites)
    saved: dict[str, torch.Tensor] = {}
    nn = model.nn
    inputs = {**batch.inputs, **(extra_inputs or {})}
    if not model.adapter.vision_only:
        inputs.setdefault("use_cache", False)   # a KV cache is never reused here and costs memory
    grad_ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with grad_ctx, model.attention("eager" if eager else None, sites=[s for s in sites if s.kind == "pattern"]):
        with nn.trace(**inputs, remote=remote):
            values: dict[Site, object] = {}
            envoys: dict[tuple[str, str], object] = {}
            for site in sorted(sites, key=lambda s: s.order):
                path, io, idx = model.locate(site)
                if io == "derived" and site.kind == "pattern":
                    value = model.derive_pattern(site, _envoy(nn, path).inputs)
                    values[site] = value
                elif io == "derived":   # resid_mid: a write goes through attn_out
                    pre, attn = Site(site.part, "resid_pre", site.layer), Site(site.part, "attn_out", site.layer)
                    value = values[pre] + values[attn]
                    values[site] = value
                else:
                    key = (path, io)
                    env = _envoy(nn, path)
                    if key not in envoys:
                        envoys[key] = getattr(env, io)
                    raw = envoys[key]
                    if isinstance(raw, tuple):
                        value = raw[idx or 0]
                    elif idx:   # e.g. a pattern from an attention module that returns only its output
                        raise SiteError(f"{model.name}: {path} returns a single tensor, not the tuple site {site} needs")
                    else:
                        value = raw
                    values[site] = value
                if site in writes:
                    new = writes[site](value)
                    if site.kind == "resid_mid":
                        attn = Site(site.part, "attn_out", site.layer)
                        new_attn = values[attn] + (new - value)
                        _assign(nn, model, attn, new_attn, envoys)
                        values[attn] = new_attn
                    else:
                        _assign(nn, model, site, new, envoys)
                    values[site] = new
                if site in reads:
                    saved[str(site)] = values[site].save()
    return saved


def _envoy(nn, path: str):
    env = nn
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _assign(nn, model, site: Site, new, envoys) -> None:
    path, io, idx = model.locate(site)
    env = _envoy(nn, path)
    raw = envoys[(path, io)]
    if isinstance(raw, tuple):
        i = 0 if idx is None else idx
        new_raw = tuple(new if j == i else r for j, r in enumerate(raw))
    else:
        new_raw = new
    setattr(env, io, new_raw)
    envoys[(path, io)] = new_raw


# -- common edits ---------------------------------------------------------------------------------
def set_tokens(index: tuple[torch.Tensor, ...], values: torch.Tensor) -> Edit:
    """Replace the selected tokens with `values` ([n, d] or broadcastable)."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[index] = values.to(x.dtype).to(x.device)
        return x
    return edit


def scale_tokens(index: tuple[torch.Tensor, ...], factor: float) -> Edit:
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[index] = x[index] * factor
        return x
    return edit


def zero_tokens(index: tuple[torch.Tensor, ...]) -> Edit:
    return scale_tokens(index, 0.0)


# -- plain-hook tools ------------------------------------------------------------------------------
class Stop(Exception):
    """Ends a forward early: everything a caller needs has been seen (later layers need not run)."""


class TraceError(MechsinkError, ValueError):
    """A hook tool that cannot work on this model (no language model, unsupported attention)."""


def capture(model, inputs: Mapping, sites: Sequence[str | Site], take: Callable[[str, torch.Tensor], object] | None = None,
            *, stop: bool = True) -> dict[str, object]:
    """One forward of ``inputs`` with plain hooks at the modules holding ``sites``.

    Returns {site name: take(site, tensor)} (the tensor itself without ``take``) for the first time
    each site's tensor exists; with ``stop`` the forward ends as soon as every site was seen. Sites
    computed from others (``hook_resid_mid``, recomputed patterns) cannot be captured: use ``run``.
    """
    names = [str(Site.parse(s)) for s in sites]
    where = {s: model.locate(s) for s in names}
    derived = [s for s, (_, io, _) in where.items() if io not in ("input", "output")]
    if derived:
        raise SiteError(f"sites {derived} are computed from other sites; read them with model.run")
    got: dict[str, object] = {}

    def record(site: str, x: torch.Tensor) -> None:
        if site in got:          # a module run twice: the first call counts, as in model.run
            return
        got[site] = take(site, x) if take is not None else x
        if stop and len(got) == len(names):
            raise Stop

    by_module: dict[tuple[str, str], list[tuple[str, int | None]]] = {}
    for s, (path, io, idx) in where.items():
        by_module.setdefault((path, io), []).append((s, idx))
    handles = []
    for (path, io), entries in by_module.items():
        def pick(value, entries=entries):
            for s, idx in entries:
                record(s, value[idx or 0] if isinstance(value, tuple) else value)
        mod = model.module(path)
        if io == "input":
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, kwargs, pick=pick: pick(args[0] if args else next(iter(kwargs.values()))),
                with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, pick=pick: pick(out)))
    inputs = dict(inputs)
    if not model.adapter.vision_only:
        inputs.setdefault("use_cache", False)   # as in run: a KV cache is never reused here
    try:
        with torch.no_grad():
            model.hf(**inputs)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [s for s in names if s not in got]
    if missing:
        raise SiteError(f"{model.name}: sites {missing} did not run in the forward pass")
    return got


@dataclass
class LLMInputs:
    """What the language model received in a clean forward; enough to rerun the LLM alone.

    embeds: inputs_embeds (text embeddings with the visual tokens scattered in); attention_mask:
    [B, S] or None; position_ids: as the model built them (e.g. Qwen's [3, B, S] M-RoPE ids), or None.
    """
    embeds: Float[torch.Tensor, "batch seq d"]
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None

    def repeat(self, n: int) -> dict:
        """Model inputs for ``n`` copies stacked along the batch dimension."""
        out = {"inputs_embeds": self.embeds.repeat(n, 1, 1)}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask.repeat(n, 1)
        if self.position_ids is not None:
            p = self.position_ids
            out["position_ids"] = p if p.shape[-2] == 1 else torch.cat([p] * n, dim=-2)
        return out


def llm_module(model) -> str:
    """Path of the language model (the parent of its blocks)."""
    blocks = model.adapter.llm_blocks
    if not blocks:
        raise TraceError(f"{model.name} has no language model")
    return blocks.rsplit(".", 1)[0]


def llm_inputs(model, batch) -> LLMInputs:
    """Capture the language model's inputs in one forward of ``batch`` (the ViT and projector
    run; the language model does not)."""
    got: dict = {}

    def hook(mod, args, kwargs):
        got.update(kwargs)
        if args:
            got.setdefault("inputs_embeds", args[0])
        raise Stop

    handle = model.module(llm_module(model)).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.hf(**batch.inputs, use_cache=False)
    except Stop:
        pass
    finally:
        handle.remove()
    if got.get("inputs_embeds") is None:
        raise TraceError(f"could not capture the inputs of {llm_module(model)}")
    return LLMInputs(got["inputs_embeds"].detach(), got.get("attention_mask"), got.get("position_ids"))


def block_kwargs(model, inputs: Mapping) -> dict | None:
    """The keywords the LLM hands its blocks (causal mask, rotary embeddings, position ids) for
    ``inputs`` (``LLMInputs.repeat``), captured at block 0 before any block runs; None when the
    blocks do not all take the same ones (sliding-window layers) or the LLM lacks a final ``norm``."""
    llm = model.module(llm_module(model))
    cfg = getattr(llm, "config", None)
    if len(set(getattr(cfg, "layer_types", None) or ["full"])) > 1 or not hasattr(llm, "norm") or \
            getattr(cfg, "final_logit_softcapping", None) or not model.adapter.lm_head:
        return None
    got: dict = {}

    def hook(mod, args, kwargs):
        got.update(kwargs)
        raise Stop

    handle = model.module(f"{model.adapter.llm_blocks}.0").register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            llm(**inputs, use_cache=False)
    except Stop:
        pass
    finally:
        handle.remove()
    return got


def run_blocks(model, hidden: Float[torch.Tensor, "rows seq d"], kwargs: Mapping, start: int,
               edits: Mapping[int, Edit], keep: torch.Tensor | None = None, streams: dict | None = None):
    """The LLM from block ``start`` on: ``hidden`` enters block ``start`` (with ``block_kwargs``),
    ``edits[b]`` changes the stream entering block ``b`` (b = n_layers: the final norm), and the
    logits at ``keep`` [R, T] come back; ``streams`` collects the stream entering every block.
    Blocks are called as modules, so their hooks still fire."""
    blocks = model.module(model.adapter.llm_blocks)
    with torch.no_grad():
        for b in range(start, len(blocks) + 1):
            if b in edits:
                hidden = edits[b](hidden)
            if streams is not None:
                streams[b] = hidden
            if b < len(blocks):
                out = blocks[b](hidden, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
        if keep is None:
            return None
        idx = keep.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        hidden = model.module(llm_module(model)).norm(hidden.gather(1, idx))
        return model.module(model.adapter.lm_head)(hidden)


@contextlib.contextmanager
def knockout(model, key_mask: Bool[torch.Tensor, "rows seq"], layers: Sequence[int] | None = None):
    """Within the block, LLM attention from every query to the positions in ``key_mask`` is masked
    at ``layers`` (default: all). A token still attends to itself, so no row is empty; what is cut
    is the flow from those tokens to the others. Needs sdpa or eager attention."""
    layers = range(model.n_llm_layers) if layers is None else layers
    impl = getattr(model.hf.config, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager"):
        raise TraceError(f"attention knockout needs sdpa or eager attention, the model uses {impl!r}")

    def hook(mod, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        if "attention_mask" not in kwargs:
            raise TraceError(f"cannot knock out attention: {type(mod).__name__} takes no attention_mask keyword")
        am = kwargs["attention_mask"]
        r, q = h.shape[0], h.shape[1]
        km = key_mask.to(h.device)
        k = km.shape[1]
        if r != km.shape[0]:
            raise TraceError(f"knockout mask for {km.shape[0]} rows, attention sees {r}")
        own = torch.zeros(q, k, dtype=torch.bool, device=h.device)          # query i is key k - q + i
        own[torch.arange(q), torch.arange(q) + (k - q)] = True
        block = km[:, None, None, :] & ~own                                  # [R, 1, q, k]
        if am is None:
            causal = torch.ones(q, k, dtype=torch.bool, device=h.device).tril(k - q)
            am = causal[None, None] & ~block
        elif am.dtype == torch.bool:
            am = am & ~block
        else:
            am = am.masked_fill(block, torch.finfo(am.dtype).min)
        kwargs["attention_mask"] = am
        return args, kwargs

    parts = model.adapter.llm_parts
    handles = [model.module(f"{model.adapter.llm_blocks}.{l}.{parts.attn}").register_forward_pre_hook(hook, with_kwargs=True)
               for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replace_output(model, path: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, the module at ``path`` returns ``fn(its first input)`` instead of its own
    output, gradients included (e.g. a trained replacement projector). Not a read or an edit of a
    site: a swap of a submodule's computation without rebuilding the HF model."""
    handle = model.module(path).register_forward_hook(lambda mod, args, out: fn(args[0]))
    try:
        yield
    finally:
        handle.remove()


def stream_patterns(model, batch, part: str, layers: Sequence[int], reduce) -> dict:
    """{layer: reduce(pattern)} from one forward in which each block's attention pattern is reduced
    as soon as that block has run and then dropped: at most one layer's pattern exists at a time.
    Only the blocks read run eagerly; the forward stops after the last of them."""
    sites = {l: f"{part}.blocks.{l}.attn.hook_pattern" for l in layers}
    out: dict = {}
    handles = []

    def done(l, value):
        if l in out:            # a module run twice: the first call counts, as in model.run
            return
        out[l] = reduce(value)
        if len(out) == len(sites):
            raise Stop

    for l, site in sites.items():
        path, io, idx = model.locate(site)
        mod = model.module(path)
        if io == "derived":
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, kwargs, l=l, site=site: done(l, model.derive_pattern(site, (args, kwargs))),
                with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, o, l=l, idx=idx: done(l, o[idx or 0])))
    inputs = dict(batch.inputs)
    if not model.adapter.vision_only:
        inputs.setdefault("use_cache", False)
    try:
        with torch.no_grad(), model.attention("eager", sites=list(sites.values())):
            model.hf(**inputs)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(sites) - set(out))
    if missing:
        raise SiteError(f"{model.name}: the attention of {part} layers {missing} did not run")
    return out


# -- edited attention probabilities ----------------------------------------------------------------
_PROB_EDITS: dict[int, Callable] = {}
EDIT_KEY = "mechsink_edit"


def _edited_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Eager attention whose probabilities pass through the module's edit; the output moves by
    (edited - original) @ values, so an edit that returns its input leaves the eager output as is."""
    from .models.attention import mechsink_eager
    out, weights = mechsink_eager(module, query, key, value, attention_mask, *args, **kwargs)
    new = _PROB_EDITS[id(module)](weights)
    if new is weights:
        return out, weights
    v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)          # GQA: one value per head
    return out + ((new - weights).to(v.dtype) @ v).transpose(1, 2).to(out.dtype), new


@contextlib.contextmanager
def edit_attention(model, edits: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]):
    """Within the block, LLM layer ``l``'s attention probabilities [B, heads, q, k] are replaced by
    ``edits[l](probs)`` before they weight the values (those layers run eagerly; the rest keep the
    model's implementation). E.g. VAR's redistribution of attention away from sink tokens."""
    import copy
    from transformers import AttentionInterface
    AttentionInterface.register(EDIT_KEY, _edited_attention)
    parts = model.adapter.llm_parts
    saved = []
    try:
        for layer, fn in edits.items():
            mod = model.module(f"{model.adapter.llm_blocks}.{layer}.{parts.attn}")
            cfg = copy.copy(mod.config)
            cfg._attn_implementation_internal = EDIT_KEY
            saved.append((mod, mod.config))
            mod.config = cfg
            _PROB_EDITS[id(mod)] = fn
        yield
    finally:
        for mod, cfg in saved:
            mod.config = cfg
            _PROB_EDITS.pop(id(mod), None)


# -- extra ViT tokens ------------------------------------------------------------------------------
@contextlib.contextmanager
def extra_tokens(model, n: int = 1, edits: Mapping[str, Edit] | None = None):
    """Within the block, the ViT runs with ``n`` zero tokens appended to its sequence right after
    the embeddings; ``edits`` ({ViT site: edit}) change plain (input/output) ViT sites, which then
    see the longer sequence (the extra tokens last); the extra tokens are removed again where the
    projector reads the ViT (``vit.out``), so the LLM sees the usual tokens. For ViTs that take
    [items, seq, d] without per-token metadata (CLIP, SigLIP): e.g. test-time registers."""
    emb_path, emb_io, _ = model.locate("vit.embed")
    out_path, out_io, _ = model.locate("vit.out")
    if emb_io != "output" or out_io != "input":
        raise TraceError(f"{model.name}: extra ViT tokens need the embeddings' output and the projector's input")

    def first(value):
        return value[0] if isinstance(value, tuple) else value

    def swap(value, new):
        return (new, *value[1:]) if isinstance(value, tuple) else new

    def append(mod, args, out):
        x = first(out)
        return swap(out, torch.cat([x, x.new_zeros(*x.shape[:-2], n, x.shape[-1])], dim=-2))

    def drop(mod, args, kwargs):
        if args:
            return (args[0][..., :-n, :], *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: kwargs[key][..., :-n, :]}

    handles = [model.module(emb_path).register_forward_hook(append),
               model.module(out_path).register_forward_pre_hook(drop, with_kwargs=True)]
    try:
        for site, fn in (edits or {}).items():
            path, io, _ = model.locate(site)
            if Site.parse(site).part != "vit" or io not in ("input", "output"):
                raise TraceError(f"extra_tokens edits plain ViT sites, not {site}")
            if io == "output":
                handles.append(model.module(path).register_forward_hook(
                    lambda mod, args, out, fn=fn: swap(out, fn(first(out)))))
            else:
                handles.append(model.module(path).register_forward_pre_hook(
                    lambda mod, args, fn=fn: (fn(args[0]), *args[1:])))
        yield
    finally:
        for h in handles:
            h.remove()
