"""Sink classes of image tokens inside the LLM, layer by layer.

- ``vit``:  a propagated ViT sink: the token's ViT score (``SinkSet``) flags it;
- ``llm``:  an LLM-emerged sink (Kang et al., 2503.03321): RMS-normalise the hidden state without a
  learned weight, take |.|, flag the token when the max over the model's sink dims is >= tau
  (default 20), from block ``from_layer`` (default 2) on;
- ``both`` or ``none``.

Mixing the two classes is a known mistake (they light up different dims), and the Kang test
over-flags in many models, so ``SinkClasses.agreement()`` cross-checks it against the norm rule:
the ViT sinks, and a norm rule applied to the LLM hidden state itself.

Layers are LLM block indices: layer l labels ``llm.blocks.{l}.hook_resid_post``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..config import Config, coerce
from ..results import Result
from ..tokens import ROLE
from . import rules
from .detect import SinkSet, SinkSpec, detect_acts
from .massive import massive_dims, top_dims
from .rules import SinkError

CLASSES = ("vit", "llm", "both", "none")
RMS_EPS = 1e-6


def rms_normalize(h: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """h / sqrt(mean(h^2) + eps) over the last dim, without a learned weight."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def kang_score(h: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """max over ``dims`` of |rms_normalize(h)|: h [..., d] -> [...] (zeros when dims is empty)."""
    if len(dims) == 0:
        return torch.zeros(h.shape[:-1])
    if max(dims) >= h.shape[-1]:
        raise SinkError(f"sink dims {list(dims)} out of range for LLM hidden size {h.shape[-1]}")
    return rms_normalize(h)[..., list(dims)].abs().amax(-1)


@dataclass(frozen=True)
class SinkClassConfig(Config):
    """dims: the massive dims Kang's score reads; tau: its threshold; from_layer: the first LLM
    layer judged; norm_rule: the per-image norm rule on the LLM hidden state."""
    dims: tuple[int, ...] = ()
    tau: float = 20.0
    from_layer: int = 2
    norm_rule: SinkSpec = field(default_factory=SinkSpec)

    def __post_init__(self):
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        object.__setattr__(self, "norm_rule", coerce(SinkSpec, self.norm_rule))


@dataclass
class SinkClasses(Result):
    """``frame``: one row per (layer, LLM image token): layer, sample, llm_pos, role, image, tile,
    row, col, vit_norm, vit_sink, llm_score (Kang's), llm_sink, llm_norm (L2 norm of the hidden
    state), llm_norm_sink (the norm rule on it, per image), cls."""
    config_class = SinkClassConfig

    @property
    def tokens(self) -> pd.DataFrame:
        return self.frame

    @property
    def dims(self) -> list[int]:
        return list(self.config.dims)

    @property
    def from_layer(self) -> int:
        return self.config.from_layer

    def summary(self) -> dict:
        return {"layers": self.table().to_dict("records"), "dims": self.dims, "tau": self.config.tau}

    def table(self) -> pd.DataFrame:
        """Per layer: n_tokens and, for each class, its count ``n_<cls>`` and fraction ``frac_<cls>``."""
        t = self.tokens[self.tokens["role"] == "image"]
        counts = pd.crosstab(t["layer"], t["cls"]).reindex(columns=list(CLASSES), fill_value=0)
        out = pd.DataFrame({"layer": counts.index, "n_tokens": counts.sum(axis=1).to_numpy()})
        for c in CLASSES:
            out[f"n_{c}"] = counts[c].to_numpy()
        for c in CLASSES:
            out[f"frac_{c}"] = out[f"n_{c}"] / out["n_tokens"]
        return out.reset_index(drop=True)

    def agreement(self) -> pd.DataFrame:
        """Kang's test against a reference, per layer from ``from_layer`` on. References:
        ``vit_norm`` (the token is a ViT sink) and ``llm_norm`` (the norm rule on the LLM hidden
        state). Columns: layer, reference, n_tokens, n_kang, n_ref, n_both, kang_only, ref_only,
        precision (of Kang's flags against the reference), recall, jaccard, kang_frac."""
        rows = []
        t = self.tokens[(self.tokens["role"] == "image") & (self.tokens["layer"] >= self.from_layer)]
        for layer, g in t.groupby("layer", sort=True):
            k = g["llm_sink"].to_numpy()
            for ref, col in (("vit_norm", "vit_sink"), ("llm_norm", "llm_norm_sink")):
                r = g[col].to_numpy()
                both, ko, ro = int((k & r).sum()), int((k & ~r).sum()), int((~k & r).sum())
                rows.append({"layer": int(layer), "reference": ref, "n_tokens": len(g), "n_kang": int(k.sum()),
                             "n_ref": int(r.sum()), "n_both": both, "kang_only": ko, "ref_only": ro,
                             "precision": both / k.sum() if k.sum() else np.nan,
                             "recall": both / r.sum() if r.sum() else np.nan,
                             "jaccard": both / (both + ko + ro) if both + ko + ro else np.nan,
                             "kang_frac": float(k.mean()) if len(k) else np.nan})
        return pd.DataFrame(rows, columns=["layer", "reference", "n_tokens", "n_kang", "n_ref", "n_both", "kang_only",
                                           "ref_only", "precision", "recall", "jaccard", "kang_frac"])


def classify_acts(hidden: Mapping[int, torch.Tensor], sinks: SinkSet, *, dims: Sequence[int] | None = None,
                  tau: float = 20.0, from_layer: int = 2, roles: np.ndarray | None = None,
                  norm_rule: SinkSpec | None = None, abs_threshold: float = 100.0, ratio: float = 1000.0) -> SinkClasses:
    """Label image tokens from LLM hidden states already read.

    hidden: {layer: [batch, seq, d]} (``llm.blocks.{layer}.hook_resid_post``). dims: the sink dims;
    None discovers them with massive_dims over the layers >= from_layer (non-padding tokens, per
    ``roles`` when given). norm_rule: the rule for ``llm_norm_sink`` (default: SinkSpec()'s)."""
    if not hidden:
        raise SinkError("no LLM layers to classify")
    norm_rule = norm_rule or SinkSpec()
    if dims is None:
        found = []
        for layer, h in hidden.items():
            if layer >= from_layer:
                mask = torch.as_tensor(roles != ROLE["pad"]) if roles is not None else None
                found.append(massive_dims(h, abs_threshold, ratio, mask=mask))
        table = pd.concat([f for f in found if len(f)]) if any(len(f) for f in found) else pd.DataFrame()
        dims = top_dims(table)
    dims = sorted({int(d) for d in dims})
    base = sinks.llm_tokens()
    base = base[base["role"] == "image"].reset_index(drop=True)
    s_idx = torch.tensor(base["sample"].to_numpy())
    p_idx = torch.tensor(base["llm_pos"].to_numpy())
    frames = []
    for layer in sorted(hidden):
        x = hidden[layer]
        h = x[s_idx.to(x.device), p_idx.to(x.device)].detach().float().cpu()   # [n, d]
        f = base[["sample", "llm_pos", "role", "image", "tile", "row", "col"]].copy()
        f.insert(0, "layer", int(layer))
        f["vit_norm"] = base["norm"].to_numpy()
        f["vit_sink"] = base["is_sink"].to_numpy().astype(bool)
        f["llm_score"] = kang_score(h, dims).numpy()
        f["llm_sink"] = (f["llm_score"] >= tau) & (layer >= from_layer)
        f["llm_norm"] = h.norm(dim=-1).numpy()
        f["llm_norm_sink"] = False
        for idx in f.groupby(["sample", "image"], sort=False).indices.values():
            f.loc[idx, "llm_norm_sink"] = rules.apply(norm_rule.rule, f["llm_norm"].to_numpy()[idx], norm_rule.params)
        f["llm_norm_sink"] = f["llm_norm_sink"].astype(bool)
        v, l = f["vit_sink"].to_numpy(), f["llm_sink"].to_numpy()
        f["cls"] = np.select([v & l, v, l], ["both", "vit", "llm"], "none")
        frames.append(f)
    cfg = SinkClassConfig(dims=tuple(dims), tau=float(tau), from_layer=int(from_layer),
                          norm_rule=norm_rule if norm_rule is not None else SinkSpec())
    return SinkClasses(pd.concat(frames, ignore_index=True), cfg)


def sink_classes(model, batch, sinks: SinkSet | SinkSpec | None = None, *, dims: Sequence[int] | None = None,
                 tau: float = 20.0, from_layer: int = 2, layers: Sequence[int] | None = None,
                 norm_rule: SinkSpec | None = None, write: dict | None = None,
                 abs_threshold: float = 100.0, ratio: float = 1000.0) -> SinkClasses:
    """Label the image tokens of a batch at every LLM layer (or ``layers``) with one forward pass.

    ``sinks`` are the ViT sinks: a SinkSet of this batch, or a SinkSpec (default SinkSpec()) to
    detect them in the same forward. ``write`` passes edits to
    the run (e.g. to make a token an LLM-emerged sink). See ``classify_acts`` for the rest."""
    layers = list(range(model.n_llm_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < model.n_llm_layers]
    if bad:
        raise SinkError(f"LLM layers {bad} out of range: {model.name} has {model.n_llm_layers} (0..{model.n_llm_layers - 1})")
    spec = sinks if isinstance(sinks, SinkSpec) else (sinks.spec if sinks is not None else SinkSpec())
    sinks = None if isinstance(sinks, SinkSpec) else sinks
    sites = [f"llm.blocks.{l}.hook_resid_post" for l in layers]
    acts = model.run(batch, read=sites + ([spec.site] if sinks is None else []), write=write)
    if sinks is None:
        sinks = detect_acts(acts, batch.token_map, spec)
    hidden = {l: acts[s] for l, s in zip(layers, sites)}
    return classify_acts(hidden, sinks, dims=dims, tau=tau, from_layer=from_layer, roles=batch.token_map.roles,
                         norm_rule=norm_rule, abs_threshold=abs_threshold, ratio=ratio)
