"""The dual projector of DIYSink (one projector for sink tokens, one for the rest), its training
and its evaluation; see :mod:`mechsink.interventions.diysink`."""
from __future__ import annotations

import contextlib
import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..analyses.scoring import accuracy_table, answer_scores
from ..batching import batches
from ..config import Config, coerce
from ..errors import MechsinkError
from ..results import Result
from ..tokens import ROLE
from ..trace import replace_output

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

    def __init__(self, projector: nn.Module, sinks=None):
        super().__init__()
        from ..sinks.detect import SinkSpec
        spec = sinks or SinkSpec()
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
    def from_model(cls, model, sinks=None) -> "DualProjector":
        """Copies of ``model``'s projector; ``sinks``: the SinkSpec (site vit.out) that picks the sinks."""
        path = model.adapter.projector
        if not path:
            raise DIYSinkError(f"{model.name} has no projector")
        return cls(model.module(path), sinks).to(model.device)

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
        self.to(device=model.device)
        # For the whole block, with gradients flowing into this module during training.
        self._attached = id(model.hf)
        try:
            with replace_output(model, model.adapter.projector, self):
                yield self
        finally:
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
        for chunk in batches(model, data, batch_size, answers=True):
            w = weights(chunk.samples) if weights is not None else None
            with dual.weighting(chunk.batch, w, mode):
                total += float(lm_loss(model, chunk.batch)) * chunk.batch.size
                n += chunk.batch.size
    return total / max(n, 1)


@dataclass(frozen=True)
class DualTrainConfig(Config):
    """stage 1: each projector alone on its own tokens; stage 2: both together. ``max_steps``:
    stop after that many batches (None: every epoch to the end)."""
    stage: int = 1
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 8
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise DIYSinkError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise DIYSinkError(f"epochs and batch_size must be >= 1 and lr > 0, got {self.epochs}, "
                               f"{self.batch_size}, {self.lr}")


def train_dual(model, dual: DualProjector, data: Sequence, *, config: DualTrainConfig | Mapping | None = None,
               **settings) -> pd.DataFrame:
    """Train the dual projector of ``model`` on Samples with prompt and answer.

    Settings: ``config`` (a DualTrainConfig) and/or its fields as keywords (``stage=1``, ``epochs``,
    ``lr``, ``batch_size``, ``max_steps``, ``seed``). stage 1: each projector alone on its own
    tokens (the other set zeroed), separate optimisers; stage 2: both projectors, outputs combined.
    Returns the per-step losses (stage, epoch, step, mode, loss)."""
    config = coerce(DualTrainConfig, config)
    config = config.replace(**settings) if settings else config
    rng = random.Random(config.seed)
    data = list(data)
    groups = {"sink": dual.f_sink, "nonsink": dual.f_nonsink} if config.stage == 1 else {"both": dual}
    opts = {m: torch.optim.AdamW(mod.parameters(), lr=config.lr, weight_decay=0.0) for m, mod in groups.items()}
    log = []
    dual.train()
    try:
        with _frozen(model.hf), dual.attach(model):
            for epoch, step, _chunk, batch in _steps(model, data, config.batch_size, config.epochs, config.max_steps,
                                                     rng):
                for mode, opt in opts.items():
                    opt.zero_grad(set_to_none=True)
                    with dual.weighting(batch, None, mode):
                        loss = lm_loss(model, batch)
                    loss.backward()
                    opt.step()
                    log.append({"stage": config.stage, "epoch": epoch, "step": step, "mode": mode,
                                "loss": float(loss.detach())})
    finally:
        dual.eval()
    return pd.DataFrame(log)


def _steps(model, data: list, batch_size: int, epochs: int, max_steps: int | None, rng: random.Random):
    """(epoch, step, samples, Batch) over shuffled epochs, stopping after ``max_steps`` steps."""
    step = 0
    for epoch in range(epochs):
        for chunk in batches(model, data, batch_size, answers=True, shuffle=rng):
            if max_steps is not None and step >= max_steps:
                return
            yield epoch, step, chunk.samples, chunk.batch
            step += 1


@dataclass(frozen=True)
class DualEvalConfig(Config):
    """mode: "both", or "sink"/"nonsink" to keep one set. The weight policy is an object, not a
    setting: it is passed to ``evaluate_dual`` and named in the result's meta."""
    mode: str = "both"
    batch_size: int = 16

    def __post_init__(self):
        if self.mode not in MODES:
            raise DIYSinkError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass
class DualResult(Result):
    """``frame``: one row per sample (id, question_type, correct, logprob, w_sink, w_nonsink)."""
    config_class = DualEvalConfig

    def table(self, by: Sequence[str] = ("question_type",), alpha: float = 0.05) -> pd.DataFrame:
        """Accuracy with Wilson CIs, mean logprob and mean weights per group."""
        by = list(by)
        if not by:
            t = accuracy_table(self.frame.assign(_all="all"), ["_all"], alpha).drop(columns="_all")
            return t.assign(w_sink=self.frame["w_sink"].mean(), w_nonsink=self.frame["w_nonsink"].mean())
        t = accuracy_table(self.frame, by, alpha)
        w = self.frame.groupby(by, sort=False)[["w_sink", "w_nonsink"]].mean().reset_index()
        return t.merge(w, on=by)

    def summary(self) -> dict:
        r = self.table(()).iloc[0]
        return {"n_rows": int(len(self.frame)),
                **{k: r[k] for k in ("n", "accuracy", "ci_low", "ci_high", "logprob", "w_sink", "w_nonsink")}}


def evaluate_dual(model, dual: DualProjector, data: Sequence, *, weights: Callable | None = None,
                  config: DualEvalConfig | Mapping | None = None, **settings) -> DualResult:
    """Per-sample results with the dual projector attached (a DualResult: id, question_type,
    correct, logprob, w_sink, w_nonsink). ``weights``: a policy (RuleRouter, ReweightPolicy) or None
    for (1, 1). Settings: ``config`` (a DualEvalConfig) and/or ``mode``, ``batch_size``."""
    config = coerce(DualEvalConfig, config)
    config = config.replace(**settings) if settings else config
    rows = []
    for chunk in batches(model, data, config.batch_size, answers=True):
        batch = chunk.batch
        with torch.no_grad(), dual.attach(model):
            w = weights(chunk.samples) if weights is not None else torch.ones(batch.size, 2)
            with dual.weighting(batch, w, config.mode):
                logits = model.hf(**batch.inputs, use_cache=False).logits
        correct, logprob = answer_scores(model, batch, logits)
        for i, s in enumerate(chunk.samples):
            rows.append({"id": s.id, "question_type": s.question_type, "correct": bool(correct[i]),
                         "logprob": float(logprob[i]), "w_sink": float(w[i, 0]), "w_nonsink": float(w[i, 1])})
    frame = pd.DataFrame(rows, columns=["id", "question_type", "correct", "logprob", "w_sink", "w_nonsink"])
    return DualResult(frame, config, {"weights": type(weights).__name__ if weights is not None else None,
                                      "sinks": dual.spec.to_dict()})
