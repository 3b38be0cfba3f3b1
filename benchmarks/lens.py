"""TransformerLens as a peer: a TransformerBridge (TL 4.x) around a copy of the same HF LLaVA.

TL 4 has no HookedTransformer for vision-language models; its ``TransformerBridge`` wraps the HF
module itself and adds HookPoints (``vision_encoder.encoder_layers.{l}.hook_out``,
``blocks.{l}.hook_resid_pre``, ...). The bridge is built on a deep copy because booting switches
the wrapped model to eager attention, which would change the bare-forward denominator. TL's
processor loader would pip-install torchvision when it cannot build a processor; that is turned
off (``mechsink.lens.no_torchvision_install``).
"""
from __future__ import annotations

import copy

import torch


def bridge(model):
    """A TransformerBridge over a copy of ``model.hf`` (same weights, eager attention)."""
    from transformer_lens.model_bridge import TransformerBridge

    from mechsink.lens import no_torchvision_install
    hf = copy.deepcopy(model.hf)
    hf.config.architectures = [type(hf).__name__]
    tok = copy.deepcopy(getattr(model.processor, "tokenizer", model.processor))
    # TL re-reads a tokenizer by name to add BOS; ours is built in memory and already has one.
    tok.init_kwargs.update(name_or_path="", add_bos_token=True)
    with no_torchvision_install():
        br = TransformerBridge.boot_transformers(model.name, hf_model=hf, tokenizer=tok, device=str(model.device))
    return br.eval()


def vit_hooks(model) -> list[str]:
    return [f"vision_encoder.encoder_layers.{l}.hook_out" for l in range(model.n_vit_layers)]


def llm_hooks(model, kind: str = "hook_out") -> list[str]:
    return [f"blocks.{l}.{kind}" for l in range(model.n_llm_layers)]


def forward_kwargs(batch) -> dict:
    """Keyword inputs of the bridge for a mechsink Batch (tokens are passed positionally)."""
    return {k: v for k, v in batch.inputs.items() if k != "input_ids" and torch.is_tensor(v)}


class Bound:
    """A bridge with fixed image inputs, for TL utilities that call ``model.run_with_hooks(tokens,
    fwd_hooks=...)`` and read ``model.cfg`` (e.g. ``transformer_lens.patching``)."""

    def __init__(self, br, batch):
        self.br = br
        self.cfg = br.cfg
        self.kwargs = forward_kwargs(batch)

    def run_with_hooks(self, tokens, fwd_hooks=()):
        with torch.no_grad():
            return self.br.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **self.kwargs)

    def named_modules(self, *a, **kw):   # TL's eval-mode check walks the wrapped modules
        return self.br.named_modules(*a, **kw)

    @property
    def training(self) -> bool:
        return self.br.training
