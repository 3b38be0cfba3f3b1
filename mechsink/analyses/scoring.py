"""Scoring a model's answers: per-sample correctness and accuracy tables with Wilson intervals.
Shared by the analyses and the interventions (batches with gold answers come from
``mechsink.batching.batches(..., answers=True)``).

A sample is **correct** when the first token of its gold answer is the arg-max over the whole
vocabulary at the last prompt position (one-word VQA answers, POPE yes/no); **logprob** is the
teacher-forced log-probability of the whole answer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..metrics import Metric, gather_logits

ANSWER_METRIC = Metric("logprob", teacher_forced=True)


def answer_scores(model, batch, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(correct [B] bool, logprob [B]) of a batch prepared with ``answers=``, from its logits
    [B, S, V]."""
    t = ANSWER_METRIC.targets(model, batch)
    g = gather_logits(logits, t.keep(logits.shape[1]).to(logits.device))      # [B, T, V]
    correct = g[:, 0].argmax(-1).cpu() == t.ids[:, 0]
    return correct.numpy(), ANSWER_METRIC.score(g, t).cpu().numpy()


def accuracy_table(samples: pd.DataFrame, by: Sequence[str], alpha: float = 0.05) -> pd.DataFrame:
    """One row per group of ``by``: n, accuracy with its Wilson interval (ci_low, ci_high) and
    the mean logprob. samples: one row per scored sample with ``correct`` and ``logprob``."""
    from ..stats import binomial_ci
    rows = []
    for key, g in samples.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        acc, lo, hi = binomial_ci(int(g["correct"].sum()), len(g), alpha=alpha)
        rows.append({**dict(zip(by, key)), "n": len(g), "accuracy": acc, "ci_low": lo, "ci_high": hi,
                     "logprob": float(g["logprob"].mean())})
    return pd.DataFrame(rows)
