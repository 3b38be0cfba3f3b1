"""Per-sample metrics read from the logits: how well does the model still give its answer?

- ``logprob``     log-probability of the gold answer: its first token at the last prompt position,
                  or (``teacher_forced``) the sum over all answer tokens.
- ``logit_diff``  logit of the gold answer minus the best other candidate (two candidates such as
                  "yes"/"no": the usual logit difference); without labels, candidate 0 minus candidate 1.
- ``accuracy``    1 when the gold answer has the highest logit among the candidates (POPE-style yes/no).
- ``kl``          KL(clean || run) of the next-token distribution at the last prompt position.

A candidate answer is the set of its single-token forms in the model's vocabulary, in every case
and with or without a word-start marker (``yes``, ``Yes``, ``YES``, ``▁yes``, ``▁Yes``, ``Ġyes``,
...): its logit is the log-sum-exp over that set, so the metric reads the answer however the model
spells it after its own prompt (``▁Yes`` after LLaVA's ``ASSISTANT:``, ``Yes`` after Qwen's
``assistant\n``). The tokens read are recorded in ``metric.to_dict()["tokens_read"]`` (and so in
every result and report config) once the metric has been resolved against a model.

A :class:`Metric` is a serialisable value. ``metric.targets(model, batch)`` collects what it reads
per sample (positions, answer token ids, labels) into :class:`Targets`, which can be repeated for
batched copies and shifted when tokens are dropped. ``metric.score`` maps logits gathered at
``targets.keep()`` to one number per row, and ``metric.effect`` turns (run, clean) values into an
effect that is positive when the intervention hurts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .config import Config
from .errors import MechsinkError
from .tokens import ROLE

METRICS = {"logprob": True, "logit_diff": True, "accuracy": True, "kl": False}   # name -> higher is better


class MetricError(MechsinkError, ValueError):
    """A metric cannot be computed on this batch (no answers, unknown candidates, bad name)."""


@dataclass
class Targets:
    """What a metric reads, one row per sequence in a forward.

    pos: [R] position whose logits predict the first answer token (the last prompt token).
    ids: [R, T] answer token ids, -1 where a row has fewer answer tokens (T = 1 unless teacher-forced).
    label: [R] index of the gold answer among ``candidates`` (-1 when unknown).
    candidates: [K, M] the single-token forms of each candidate answer, -1 padded (may be empty).
    """
    pos: torch.Tensor
    ids: torch.Tensor
    label: torch.Tensor
    candidates: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.pos.shape[0])

    def keep(self, seq_len: int) -> torch.Tensor:
        """[R, T] positions whose logits the metric reads: pos, pos + 1, ... (clamped to the sequence)."""
        t = torch.arange(self.ids.shape[1], device=self.pos.device)
        return (self.pos[:, None] + t).clamp(max=seq_len - 1)

    def take(self, rows) -> "Targets":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Targets(self.pos[rows], self.ids[rows], self.label[rows], self.candidates)

    def repeat(self, n: int) -> "Targets":
        """Targets of ``n`` stacked copies of the batch (row c * R + i is sample i)."""
        return Targets(self.pos.repeat(n), self.ids.repeat(n, 1), self.label.repeat(n), self.candidates)

    def shifted(self, delta: torch.Tensor) -> "Targets":
        """Targets after positions moved by ``delta`` [R] (tokens dropped or padding added)."""
        return Targets(self.pos + delta.to(self.pos), self.ids, self.label, self.candidates)


@dataclass(frozen=True)
class Metric(Config):
    """Which number is read from the logits (see the module docstring).

    answers: candidate answers for ``logit_diff`` and ``accuracy`` (default "yes", "no"; none for
    the other metrics); a sample's label is the position of its answer among them.
    """
    name: str = "logprob"
    answers: tuple[str, ...] | None = None     # default: ("yes", "no") for logit_diff/accuracy, none otherwise
    teacher_forced: bool = False

    def __post_init__(self):
        if self.name not in METRICS:
            raise MetricError(f"unknown metric {self.name!r}; metrics: {', '.join(METRICS)}")
        if self.answers is None:       # candidates only where the metric reads them (logprob reads the gold answer)
            object.__setattr__(self, "answers", ("yes", "no") if self.name in ("logit_diff", "accuracy") else ())
        object.__setattr__(self, "answers", tuple(str(a) for a in self.answers))
        if self.name in ("logit_diff", "accuracy") and len(self.answers) < 2:
            raise MetricError(f"metric {self.name} needs at least two candidate answers, got {list(self.answers)}")
        if self.teacher_forced and self.name != "logprob":
            raise MetricError("teacher_forced applies only to the logprob metric")

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.name]

    def to_dict(self) -> dict:
        """The settings, plus ``tokens_read`` (what a run read for each candidate) once known."""
        d = asdict(self)
        d["answers"] = list(self.answers)
        read = getattr(self, "_read", None)
        if read is not None:
            d["tokens_read"] = read
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Metric":
        d = dict(d)
        read = d.pop("tokens_read", None)
        m = super().from_dict(d)
        if read is not None:
            object.__setattr__(m, "_read", read)
        return m

    def candidate_ids(self, tokenizer) -> list[list[int]]:
        """The single-token forms of every candidate answer (see the module docstring); records
        them as ``tokens_read``. A candidate without one fails with a MetricError."""
        sets = [single_token_forms(tokenizer, a) for a in self.answers]
        bad = [a for a, ids in zip(self.answers, sets) if not ids]
        if bad:
            raise MetricError(f"candidate answer(s) {bad} have no single-token form in the model's vocabulary; "
                              f"the {self.name} metric reads one token per candidate (use logprob for longer answers)")
        for i in range(len(sets)):
            for j in range(i + 1, len(sets)):
                if set(sets[i]) & set(sets[j]):
                    raise MetricError(f"candidate answers {self.answers[i]!r} and {self.answers[j]!r} share a token")
        object.__setattr__(self, "_read", {a: tokenizer.convert_ids_to_tokens(ids) for a, ids in zip(self.answers, sets)})
        return sets

    @classmethod
    def coerce(cls, m: "Metric | str | dict | None") -> "Metric":
        if m is None:
            return cls()
        if isinstance(m, Metric):
            return m
        if isinstance(m, dict):
            return cls.from_dict(m)
        return cls(str(m))

    # -- targets ------------------------------------------------------------------------------
    def targets(self, model, batch) -> Targets:
        """Collect positions, answer ids and labels of a Batch (prepared with ``answers=`` when the
        metric needs the gold answer)."""
        tok = getattr(model.processor, "tokenizer", model.processor)
        pos = batch.last_pos.cpu()
        roles = batch.token_map.roles
        n_ans = (roles == ROLE["answer"]).sum(axis=1)
        needs_gold = self.name == "logprob"
        if needs_gold and (batch.answers is None or (n_ans == 0).any()):
            raise MetricError("the logprob metric needs the gold answers: prepare the batch with answers=[...]")
        t = int(n_ans.max()) if self.teacher_forced else 1
        ids = torch.full((batch.size, max(t, 1)), -1, dtype=torch.long)
        input_ids = batch.inputs.get("input_ids")
        if needs_gold:
            for i in range(batch.size):
                where = np.nonzero(roles[i] == ROLE["answer"])[0]
                if where[0] != int(pos[i]) + 1 or np.any(np.diff(where) != 1):
                    raise MetricError(f"sample {i}: answer tokens do not directly follow the prompt")
                k = len(where) if self.teacher_forced else 1
                ids[i, :k] = input_ids[i, torch.as_tensor(where[:k])].cpu()
        if self.name in ("logit_diff", "accuracy"):
            sets = self.candidate_ids(tok)
            width = max(len(c) for c in sets)
            candidates = torch.as_tensor([c + [-1] * (width - len(c)) for c in sets], dtype=torch.long)
        else:
            candidates = torch.empty((0, 1), dtype=torch.long)
        norm = [a.strip().lower() for a in self.answers]
        answers = batch.answers or [None] * batch.size
        label = torch.as_tensor([norm.index(a.strip().lower()) if a is not None and a.strip().lower() in norm else -1
                                 for a in answers], dtype=torch.long)
        if self.name == "accuracy" and (label < 0).any():
            bad = [a for a, lab in zip(answers, label.tolist()) if lab < 0][:3]
            raise MetricError(f"accuracy needs every answer among the candidates {list(self.answers)}; got e.g. {bad}")
        return Targets(pos, ids, label, candidates)

    # -- scoring --------------------------------------------------------------------------------
    def score(self, logits: torch.Tensor, targets: Targets, clean: torch.Tensor | None = None) -> torch.Tensor:
        """One value per row. logits: [R, T, V] gathered at ``targets.keep(seq_len)`` (column 0 is
        the next-token logits at ``pos``); clean: [R, V] clean next-token logits (``kl`` only)."""
        logits = logits.float()
        nxt = logits[:, 0]
        if self.name == "logprob":
            return answer_logprob(logits, targets.ids.to(logits.device))
        if self.name == "kl":
            if clean is None:
                raise MetricError("the kl metric needs the clean run's logits")
            return next_token_kl(nxt, clean)
        cands, label = targets.candidates.to(nxt.device), targets.label.to(nxt.device)
        if self.name == "logit_diff":
            return logit_diff(nxt, cands, label)
        return accuracy(nxt, cands, label)

    def effect(self, value: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Damage done by an intervention: clean - value for higher-is-better metrics, else value - clean."""
        return clean - value if self.higher_is_better else value - clean


# -- the metrics themselves ---------------------------------------------------------------------
def gather_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """logits [R, S, V], keep [R, T] -> [R, T, V]."""
    idx = keep.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)


def answer_logprob(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of log p(answer token t | prefix) over the answer tokens. logits [R, T, V] where column t
    predicts token t; ids [R, T] with -1 padding -> [R]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = ids >= 0
    picked = logp.gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    return (picked * valid).sum(dim=1)


def single_token_forms(tokenizer, answer: str) -> list[int]:
    """Ids of the vocabulary tokens that spell ``answer`` alone, in any of its cases, with or without
    a word-start marker (SentencePiece ``▁``, byte-level ``Ġ``), checked by decoding each one."""
    a = answer.strip()
    if not a:
        return []
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for form in dict.fromkeys([a, a.lower(), a.capitalize(), a.upper()]):
        for t in (form, "\u2581" + form, "\u0120" + form):
            i = vocab.get(t)
            if i is not None and i not in ids and tokenizer.decode([i]).strip().lower() == a.lower():
                ids.append(i)
    return ids


def candidate_logits(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp of each candidate's single-token forms. logits [R, V], candidates [K] or [K, M]
    (-1 padded) -> [R, K]."""
    if candidates.dim() == 1:
        return logits[:, candidates]
    picked = logits[:, candidates.clamp(min=0)]                      # [R, K, M]
    picked = picked.masked_fill(candidates[None] < 0, float("-inf"))
    return torch.logsumexp(picked, dim=-1)


def logit_diff(logits: torch.Tensor, candidates: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Gold candidate's logit minus the best other candidate's; candidate 0 minus 1 where label < 0.
    logits [R, V], candidates [K] or [K, M] (log-sum-exp over each row's forms), label [R] -> [R]."""
    c = candidate_logits(logits, candidates)                         # [R, K]
    gold = label.clamp(min=0)
    g = c.gather(1, gold[:, None])[:, 0]
    others = c.scatter(1, gold[:, None], float("-inf")).amax(dim=1)
    unlabelled = c[:, 0] - c[:, 1]
    return torch.where(label >= 0, g - others, unlabelled)


def accuracy(logits: torch.Tensor, candidates: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """1.0 where the gold candidate has the highest logit among the candidates. -> [R]"""
    return (candidate_logits(logits, candidates).argmax(dim=1) == label).float()


def next_token_kl(logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """KL(clean || run) of the next-token distributions. logits, clean [R, V] -> [R] (nats)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    lq = torch.log_softmax(clean.float().to(lp.device), dim=-1)
    return (lq.exp() * (lq - lp)).sum(dim=-1)
