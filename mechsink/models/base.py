"""Model = a Hugging Face module + a declarative Adapter that says where everything lives."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import PromptError, SiteError
from ..sites import Site, site_names
from ..tokens import ROLE, TokenMap

if TYPE_CHECKING:
    from transformers import BatchFeature

log = logging.getLogger("mechsink")


@dataclass(frozen=True)
class BlockParts:
    """Where the pieces of one transformer block live, relative to the block."""
    attn: str = "self_attn"           # output[0] is added to the residual, output[1] is the pattern
    mlp: str = "mlp"                  # its output is added to the residual
    mlp_out_proj: str = "mlp.fc2"     # its input is mlp.hook_post ("a|b": whichever exists)
    attn_out: str | None = None       # when the residual adds another module's output (DINOv2's layer scale)
    mlp_out: str | None = None
    # When the attention module does not return its pattern (Qwen2-VL's ViT): a function
    # (attention module, args, kwargs) -> pattern, recomputed from the module's inputs.
    pattern: Callable[[torch.nn.Module, tuple, dict], torch.Tensor] | None = None


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one architecture family.

    Paths are dotted module names from the HF model root. ``vit_out`` is (path, "input"|"output")
    of the tensor the projector reads; ``vit_embed`` is a path (its output) or such a pair. A path
    may contain ``{last}``, the index of the last ViT block. ``layout`` builds the TokenMap from
    processor outputs. ``processor_loader`` opens the processor of a saved model when
    ``AutoProcessor`` cannot (processors that insist on a video processor need torchvision).
    """
    family: str
    architectures: tuple[str, ...]
    vit_embed: str | tuple[str, str]
    vit_blocks: str
    vit_out: tuple[str, str]
    layout: Callable[["Model", "BatchFeature", list[list[Image.Image]]], TokenMap]
    vit_parts: BlockParts = BlockParts()
    projector: str | None = None
    llm_blocks: str | None = None
    llm_parts: BlockParts = BlockParts(mlp_out_proj="mlp.down_proj")
    lm_head: str | None = None
    chat: str = "USER: <image>\n{question} ASSISTANT:"   # used when the processor has no chat template
    image_placeholder: str = "<image>"
    default_question: str = "Describe the image."
    vision_only: bool = False
    processor_kwargs: dict = field(default_factory=dict)
    processor_loader: Callable[[str], Any] | None = None
    nested_images: bool = False     # the processor wants one list of images per sample


@dataclass
class Batch:
    """Processor outputs for a batch plus where every visual token went."""
    inputs: dict[str, Any]
    token_map: TokenMap
    prompts: list[str]
    images: list[list[Image.Image]]
    answers: list[str] | None = None

    @property
    def size(self) -> int:
        return len(self.images)

    @property
    def last_pos(self) -> torch.Tensor:
        """Position of the last prompt token per sample (the one predicting the answer)."""
        roles = self.token_map.roles
        prompt = np.isin(roles, [ROLE["text"], ROLE["image"], ROLE["newline"]])
        return torch.as_tensor([np.nonzero(r)[0].max() for r in prompt])

    def to(self, device) -> "Batch":
        self.inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return self


class Model:
    """An opened model: the HF module, its processor and its adapter."""

    def __init__(self, hf, processor, adapter: Adapter, name: str, source: str | None = None):
        self.hf = hf.eval()
        self.processor = processor
        self.adapter = adapter
        self.name = name
        self.source = source or name
        self._nn = None
        self._located: dict[str, tuple[str, str, int | None]] = {}

    def __repr__(self) -> str:
        return f"Model({self.name!r}, family={self.adapter.family!r}, vit_layers={self.n_vit_layers}, llm_layers={self.n_llm_layers})"

    # -- structure --------------------------------------------------------------------------
    def module(self, path: str) -> torch.nn.Module:
        return self.hf.get_submodule(path)

    @property
    def n_vit_layers(self) -> int:
        return len(self.module(self.adapter.vit_blocks))

    @property
    def n_llm_layers(self) -> int:
        return 0 if self.adapter.vision_only else len(self.module(self.adapter.llm_blocks))

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def site_names(self) -> list[str]:
        return site_names(self.n_vit_layers, self.n_llm_layers, has_projector=not self.adapter.vision_only)

    def locate(self, site: Site | str) -> tuple[str, str, int | None]:
        """(module path, "input"|"output", tuple index or None) holding a site's tensor."""
        key = str(site)
        got = self._located.get(key)
        if got is None:        # asked for on every batch of every analysis: computed once per site
            got = self._located[key] = self._locate(Site.parse(site))
        return got

    def _locate(self, s: Site) -> tuple[str, str, int | None]:
        a = self.adapter
        n = self.n_vit_layers if s.part == "vit" else self.n_llm_layers
        if s.is_block and not 0 <= s.layer < n:
            raise SiteError(f"site {s} is out of range: the {s.part} has {n} blocks (0..{n - 1})")
        if s.part != "vit" and a.vision_only:
            raise SiteError(f"site {s} does not exist: {self.name} is a vision encoder without projector or LLM")
        if not s.is_block:
            embed = (a.vit_embed, "output") if isinstance(a.vit_embed, str) else a.vit_embed
            last = self.n_vit_layers - 1
            return {"vit.embed": (embed[0].format(last=last), embed[1], None),
                    "vit.out": (a.vit_out[0].format(last=last), a.vit_out[1], None),
                    "proj.out": (a.projector, "output", None),
                    "llm.embed": (f"{a.llm_blocks}.0", "input", None),
                    "llm.logits": (a.lm_head, "output", None)}[str(s)]
        block = f"{a.vit_blocks if s.part == 'vit' else a.llm_blocks}.{s.layer}"
        parts = a.vit_parts if s.part == "vit" else a.llm_parts
        mlp_post = self._existing(block, parts.mlp_out_proj) if s.kind == "mlp_post" else None
        # A block's input is the previous block's output: address it there, so that a write also
        # reaches whatever else reads that tensor (LLaVA's projector reads hidden_states[-2]).
        prev = f"{a.vit_blocks if s.part == 'vit' else a.llm_blocks}.{s.layer - 1}"
        return {"resid_pre": (block, "input", None) if s.layer == 0 else (prev, "output", None),
                "pattern": ((f"{block}.{parts.attn}", "derived", None) if parts.pattern
                            else (f"{block}.{parts.attn}", "output", 1)),
                "attn_out": ((f"{block}.{parts.attn_out}", "output", None) if parts.attn_out
                             else (f"{block}.{parts.attn}", "output", 0)),
                "mlp_post": (mlp_post, "input", None),
                "mlp_out": (f"{block}.{parts.mlp_out or parts.mlp}", "output", None),
                "resid_post": (block, "output", None),
                "resid_mid": (block, "derived", None)}[s.kind]

    def _existing(self, block: str, alternatives: str) -> str:
        """The first of the "|"-separated sub-paths that exists in `block` (MLP variants)."""
        options = alternatives.split("|")
        for sub in options:
            try:
                self.module(f"{block}.{sub}")
                return f"{block}.{sub}"
            except AttributeError:
                continue
        raise SiteError(f"{self.name}: none of {options} exists in {block}")

    def derive_pattern(self, site: Site | str, inputs: tuple[tuple, dict]) -> torch.Tensor:
        """The attention pattern of a block whose attention module does not return it, computed
        from that module's (args, kwargs)."""
        s = Site.parse(site)
        parts = self.adapter.vit_parts if s.part == "vit" else self.adapter.llm_parts
        path, _, _ = self.locate(s)
        args, kwargs = inputs
        return parts.pattern(self.module(path), args, kwargs)

    # -- inputs -------------------------------------------------------------------------------
    def format_prompt(self, question: str | None = None) -> str:
        """The model's own chat format around one image placeholder and a question."""
        q = self.adapter.default_question if question is None else question
        ph = self.adapter.image_placeholder
        if ph in q:
            return q
        tmpl = getattr(self.processor, "chat_template", None)
        if tmpl:
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            try:
                return self.processor.apply_chat_template(conv, add_generation_prompt=True)
            except Exception:  # templates that do not know the structured content format
                pass
        return self.adapter.chat.format(question=q)

    def prepare(self, images: Sequence[Image.Image | Sequence[Image.Image]], prompts: Sequence[str | None] | None = None,
                answers: Sequence[str] | None = None) -> Batch:
        """Run the processor and build the TokenMap. A prompt without the image placeholder is
        wrapped in the model's chat format; placeholders that do not match the images fail here."""
        imgs = [[im] if isinstance(im, Image.Image) else list(im) for im in images]
        if self.adapter.vision_only:
            flat = [im for group in imgs for im in group]
            inputs = self.processor(images=flat, return_tensors="pt", **self.adapter.processor_kwargs)
            batch = Batch(dict(inputs), None, [""] * len(imgs), imgs)
            batch.token_map = self.adapter.layout(self, inputs, imgs)
            return batch.to(self.device)
        prompts = list(prompts) if prompts is not None else [None] * len(imgs)
        if len(prompts) != len(imgs):
            raise PromptError(f"{len(prompts)} prompts for {len(imgs)} images")
        texts, bare = [], []
        ph = self.adapter.image_placeholder
        for i, (p, group) in enumerate(zip(prompts, imgs)):
            text = p if p is not None and ph in p else self.format_prompt(p)
            if text.count(ph) != len(group):
                raise PromptError(f"prompt {i} has {text.count(ph)} {ph} placeholder(s) for {len(group)} image(s): {text!r}")
            bare.append(text)
            if answers is not None:
                text = text + answer_text(text, answers[i])
            texts.append(text)
        flat = [im for group in imgs for im in group]
        inputs = self.processor(images=imgs if self.adapter.nested_images else flat, text=texts, return_tensors="pt",
                                padding=True, **self.adapter.processor_kwargs)
        batch = Batch(dict(inputs), None, texts, imgs, list(answers) if answers is not None else None)
        batch.token_map = self.adapter.layout(self, inputs, imgs)
        if answers is not None:
            _mark_answers(self, batch, bare, answers)
        # a model on the meta device (planning) computes nothing: its inputs stay readable on the CPU
        return batch if self.device.type == "meta" else batch.to(self.device)

    # -- running --------------------------------------------------------------------------------
    @property
    def nn(self):
        """The nnsight wrapper (built lazily)."""
        if self._nn is None:
            from nnsight import NNsight
            self._nn = NNsight(self.hf)
        return self._nn

    @contextlib.contextmanager
    def attention(self, implementation: str | None, sites: Sequence[Site | str] | None = None):
        """Temporarily switch every attention layer (e.g. to "eager" to read patterns). With
        ``implementation="eager"`` and ``sites`` (attention-pattern sites), only the blocks of those
        sites run eagerly and the rest keep the model's implementation (`mechsink.models.attention`)."""
        if implementation == "eager" and sites is not None:
            from .attention import eager_blocks
            paths = [self.locate(s)[0] for s in sites if Site.parse(s).kind == "pattern"]
            with eager_blocks(self.module(path) for path in paths):   # derived patterns too: same numerics as reading
                yield
            return
        current = self.hf.config._attn_implementation
        if implementation is None or implementation == current:
            yield
            return
        log.info("switching %s to %s attention for this run (attention patterns need it)", self.name, implementation)
        self.hf.set_attn_implementation(implementation)
        try:
            yield
        finally:
            self.hf.set_attn_implementation(current)

    def run(self, batch: Batch, read: Sequence[str | Site] = (), write: dict | None = None, **kw) -> dict[str, torch.Tensor]:
        """One traced forward pass reading and editing sites (see mechsink.trace.run)."""
        from ..trace import run
        return run(self, batch, read=read, write=write, **kw)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Bare HF forward (no tracing) -> logits [batch, seq, vocab]."""
        with torch.no_grad():
            return self.hf(**batch.inputs).logits


def answer_text(prompt: str, answer: str) -> str:
    """The answer as the model would say it after ``prompt``: after whitespace (Qwen's
    ``assistant\n``) it follows directly; otherwise (LLaVA's ``ASSISTANT:``) after one space,
    which a SentencePiece tokenizer turns into the word-start ``▁`` of the answer's first token."""
    answer = answer.strip()
    return answer if not prompt or prompt[-1].isspace() else f" {answer}"


def answer_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """Token ids of ``answer`` as they stand after ``prompt``: the tail by which the tokenization of
    prompt + answer differs from that of the prompt alone (not the answer tokenized on its own)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + answer_text(prompt, answer), add_special_tokens=False)["input_ids"]
    if full[:len(p)] != p:
        raise PromptError(f"the answer {answer!r} changes the tokenization of the end of its prompt; "
                          f"end the prompt with a space or newline")
    ids = full[len(p):]
    unk = getattr(tokenizer, "unk_token_id", None)
    if ids and unk is not None and unk in ids:   # a word the vocabulary lacks: marked; metrics say what they make of it
        log.warning("answer %r is partly unknown to the tokenizer (%s)", answer, tokenizer.convert_ids_to_tokens(ids))
        return ids
    if not ids or tokenizer.decode(ids).strip() != answer.strip():
        raise PromptError(f"answer {answer!r} does not decode back from its tokens {tokenizer.convert_ids_to_tokens(ids)}")
    return ids


def _mark_answers(model: Model, batch: Batch, prompts: Sequence[str], answers: Sequence[str]) -> None:
    """Give the appended answer tokens the role "answer": the last tokens of each row, found by
    comparing the tokenizations of the prompt with and without its answer."""
    tok = getattr(model.processor, "tokenizer", model.processor)
    input_ids = batch.inputs["input_ids"]
    for i, (prompt, ans) in enumerate(zip(prompts, answers)):
        ids = answer_ids(tok, prompt, ans)
        nz = np.nonzero(batch.token_map.roles[i] == ROLE["text"])[0]
        where = nz[-len(ids):]
        if input_ids[i, torch.as_tensor(where)].tolist() != ids:
            raise PromptError(f"sample {i}: the answer tokens {tok.convert_ids_to_tokens(ids)} are not the last "
                              f"tokens of the prompt as the processor tokenized it")
        batch.token_map.roles[i, where] = ROLE["answer"]
