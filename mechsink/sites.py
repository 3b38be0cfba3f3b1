"""The site namespace: one readable name for every activation in a vision-language model.

Names follow TransformerLens with a module prefix::

    vit.embed                         patch (+CLS/register) embeddings entering ViT block 0
    vit.blocks.{l}.hook_resid_pre     input of ViT block l
    vit.blocks.{l}.hook_attn_out      attention output added to the residual
    vit.blocks.{l}.hook_resid_mid     residual after attention (derived: resid_pre + attn_out)
    vit.blocks.{l}.attn.hook_pattern  attention probabilities [items, heads, query, key] (eager attention)
    vit.blocks.{l}.mlp.hook_post      MLP hidden activation (input of its output projection)
    vit.blocks.{l}.hook_mlp_out       MLP output added to the residual
    vit.blocks.{l}.hook_resid_post    output of ViT block l
    vit.out                           the visual features the projector reads
    proj.out                          visual tokens as they enter the LLM
    llm.embed                         LLM input embeddings (text + scattered visual tokens)
    llm.blocks.{l}.*                  as for the ViT
    llm.logits                        next-token logits

A site's *axis* says how its token dimension is indexed: ``vit`` (ViT sequence, special tokens
included), ``vit_out`` (projector input rows), ``proj`` (projector output rows) or ``llm``
(sequence positions). The TokenMap turns token selections into indices on any axis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SiteError

# Block-level hooks in the order they run inside a block; the value is the site kind.
BLOCK_HOOKS: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "attn.hook_pattern": "pattern",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "mlp.hook_post": "mlp_post",
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
_KIND_TO_HOOK = {v: k for k, v in BLOCK_HOOKS.items()}
_KIND_ORDER = {k: i for i, k in enumerate(BLOCK_HOOKS.values())}
# Model-level stages in execution order.
_STAGE = {("vit", "embed"): 0, ("vit", "block"): 1, ("vit", "out"): 2, ("proj", "out"): 3,
          ("llm", "embed"): 4, ("llm", "block"): 5, ("llm", "logits"): 6}
_BLOCK_RE = re.compile(r"^(vit|llm)\.blocks\.(\d+)\.(.+)$")
_FIXED = {"vit.embed": ("vit", "embed"), "vit.out": ("vit", "out"), "proj.out": ("proj", "out"),
          "llm.embed": ("llm", "embed"), "llm.logits": ("llm", "logits")}


@dataclass(frozen=True, order=False)
class Site:
    part: str            # "vit" | "proj" | "llm"
    kind: str            # "embed" | "out" | "logits" | a BLOCK_HOOKS value
    layer: int | None = None

    @staticmethod
    def parse(name: "str | Site") -> "Site":
        if isinstance(name, Site):
            return name
        if name in _FIXED:
            return Site(*_FIXED[name])
        m = _BLOCK_RE.match(name)
        if m and m.group(3) in BLOCK_HOOKS:
            return Site(m.group(1), BLOCK_HOOKS[m.group(3)], int(m.group(2)))
        raise SiteError(
            f"unknown site {name!r}; sites look like vit.blocks.3.hook_resid_post, vit.out, proj.out, "
            f"llm.blocks.0.attn.hook_pattern, llm.logits (see `mechsink inspect`)")

    @property
    def is_block(self) -> bool:
        return self.layer is not None

    @property
    def axis(self) -> str:
        """Which token axis the site's tensor uses."""
        if self.part == "proj":
            return "proj"
        if self.part == "vit":
            return "vit_out" if self.kind == "out" else "vit"
        return "llm"

    @property
    def order(self) -> tuple:
        """Execution-order key (nnsight requires modules to be accessed in the order they run)."""
        stage = _STAGE[(self.part, "block" if self.is_block else self.kind)]
        return (stage, self.layer or 0, _KIND_ORDER.get(self.kind, 0))

    def __str__(self) -> str:
        if self.is_block:
            return f"{self.part}.blocks.{self.layer}.{_KIND_TO_HOOK[self.kind]}"
        return f"{self.part}.{self.kind}"

    def __repr__(self) -> str:
        return f"Site({str(self)!r})"


def site_names(n_vit: int, n_llm: int, *, has_projector: bool = True) -> list[str]:
    """Every site of a model with the given depths, in execution order."""
    names = ["vit.embed"]
    names += [f"vit.blocks.{l}.{h}" for l in range(n_vit) for h in BLOCK_HOOKS]
    names += ["vit.out"]
    if has_projector:
        names += ["proj.out", "llm.embed"]
        names += [f"llm.blocks.{l}.{h}" for l in range(n_llm) for h in BLOCK_HOOKS]
        names += ["llm.logits"]
    return names


def blocks(part: str, hook: str, layers, n_layers: int | None = None) -> list[str]:
    """Site names of one hook across layers: ``blocks("llm", "hook_resid_pre", range(4))``.
    ``layers=None`` means every layer (then ``n_layers`` is needed)."""
    if layers is None:
        if n_layers is None:
            raise SiteError("blocks(..., layers=None) needs n_layers (the depth of that part)")
        layers = range(n_layers)
    return [str(Site.parse(f"{part}.blocks.{int(l)}.{hook}")) for l in layers]


def expand(names, n_vit: int, n_llm: int) -> list[str]:
    """Site names with ``*`` for the layer (``llm.blocks.*.hook_resid_pre``) -> one per layer."""
    out: list[str] = []
    for name in names:
        name = name.strip()
        m = re.fullmatch(r"(vit|llm)\.blocks\.\*\.(.+)", name)
        if m:
            out += blocks(m.group(1), m.group(2), None, n_vit if m.group(1) == "vit" else n_llm)
        elif "*" in name:
            raise SiteError(f"cannot expand {name!r}: only the layer may be *, as in llm.blocks.*.hook_resid_pre")
        else:
            out.append(str(Site.parse(name)))
    return out
