"""Sink-only, non-sink-only and full visual input, compared per question type.

    res = visual_subsets(model, dataset, spec, mode="drop")
    res.summary()          # accuracy with Wilson CIs per question type and input
    res.figure()

Inputs: ``full`` (every visual token), ``sinks`` (only the sink tokens; the rest removed),
``nonsinks`` (the sinks removed). Removal is ``drop`` (tokens deleted from the LLM sequence; the
rows are left-padded to a common length, so later tokens move up) or ``knockout`` (the tokens stay
in place but no other token may attend to them, in every LLM layer) -- the two removal modes of
:mod:`mechsink.ablation`, run through the same engine (:func:`mechsink.patching.execute`): the ViT
runs once per batch, and all inputs of a batch go through the language model together.

A sample is correct when the first answer token is the arg-max over the vocabulary at the last
prompt position; ``logprob`` is the teacher-forced log-probability of the whole answer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..engine import Plan, execute
from ..trace import llm_inputs
from ..tokens import ROLE
from .relevance import AnalysisError
from .scoring import ANSWER_METRIC, accuracy_table, answer_batches

SUBSETS = ("full", "sinks", "nonsinks")
MODES = ("drop", "knockout")


def removal_masks(sinks, subsets: Sequence[str] = SUBSETS) -> torch.Tensor:
    """bool [C, B, S]: per subset, the LLM positions removed (visual tokens outside the subset)."""
    bad = [s for s in subsets if s not in SUBSETS]
    if bad:
        raise AnalysisError(f"unknown visual subsets {bad}; choose from {', '.join(SUBSETS)}")
    roles = sinks.token_map.roles
    visual = torch.as_tensor(np.isin(roles, [ROLE["image"], ROLE["newline"]]))
    sink = torch.zeros_like(visual)
    t = sinks.llm_tokens()
    t = t[t["is_sink"]]
    sink[torch.tensor(t["sample"].to_numpy()), torch.tensor(t["llm_pos"].to_numpy())] = True
    by = {"full": torch.zeros_like(visual), "sinks": visual & ~sink, "nonsinks": sink}
    return torch.stack([by[s] for s in subsets])


@dataclass
class SubsetConfig:
    mode: str = "drop"
    subsets: tuple[str, ...] = SUBSETS
    spec: dict = field(default_factory=dict)
    batch_size: int = 16
    n_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SubsetResult:
    """``samples``: one row per (sample, subset): id, question_type, subset, correct, logprob,
    n_visual (visual tokens kept), n_sinks."""
    samples: pd.DataFrame
    config: SubsetConfig

    def summary(self, by: Sequence[str] = ("question_type",), alpha: float = 0.05) -> pd.DataFrame:
        """Accuracy with Wilson CIs, mean logprob and mean visual tokens kept per group and subset."""
        keys = [*by, "subset"]
        table = accuracy_table(self.samples, keys, alpha)
        table["mean_visual"] = self.samples.groupby(keys, sort=False)["n_visual"].mean().to_numpy()
        return table

    def figure(self, by: str = "question_type"):
        from ..report.figures import effect_plot
        return effect_plot(self.summary((by,)), x=by, y="accuracy", hue="subset", low="ci_low", high="ci_high",
                           hue_order=[s for s in SUBSETS if s in self.config.subsets], ylabel="accuracy",
                           title=f"visual input ({self.config.mode})")


def subset_scores(model, batch, sinks, subsets: Sequence[str] = SUBSETS, mode: str = "drop") -> dict:
    """{"correct": bool [C, B], "logprob": [C, B], "removed": bool [C, B, S]} for one batch
    (prepared with ``answers=``)."""
    if mode not in MODES:
        raise AnalysisError(f"mode must be 'drop' or 'knockout', got {mode!r}")
    removed = removal_masks(sinks, subsets)
    targets = ANSWER_METRIC.targets(model, batch)
    plan = Plan(len(subsets), drop=removed if mode == "drop" else None, knockout=removed if mode == "knockout" else None)
    out = execute(model, batch, plan, ANSWER_METRIC, targets, inputs=llm_inputs(model, batch), want_next=True)
    correct = out["next"].argmax(-1) == targets.ids[:, 0][None]
    return {"correct": correct.numpy(), "logprob": out["value"].numpy(), "removed": removed}


def visual_subsets(model, data, spec=None, *, subsets: Sequence[str] = SUBSETS, mode: str = "drop",
                   batch_size: int = 16, limit: int | None = None) -> SubsetResult:
    """Accuracy of ``model`` on ``data`` (Samples with prompt, answer and question_type) given the
    full visual input, its sinks only, or its non-sinks only. Sinks are detected per batch with
    ``spec`` (a SinkSpec; default rule when None)."""
    from ..sinks.detect import SinkSpec, detect
    spec = spec or SinkSpec()
    samples = list(data)[:limit]
    rows = []
    for chunk, batch in answer_batches(model, samples, batch_size):
        sinks = detect(model, batch, spec)
        res = subset_scores(model, batch, sinks, subsets, mode)
        visual = np.isin(batch.token_map.roles, [ROLE["image"], ROLE["newline"]]).sum(1)
        n_sinks = sinks.llm_tokens().groupby("sample")["is_sink"].sum().reindex(range(batch.size), fill_value=0)
        for c, name in enumerate(subsets):
            kept = visual - res["removed"][c].sum(1).numpy()
            for b, s in enumerate(chunk):
                rows.append({"id": s.id, "question_type": s.question_type, "subset": name,
                             "correct": bool(res["correct"][c, b]), "logprob": float(res["logprob"][c, b]),
                             "n_visual": int(kept[b]), "n_sinks": int(n_sinks.iloc[b])})
    cfg = SubsetConfig(mode, tuple(subsets), spec.to_dict(), batch_size, len(samples))
    return SubsetResult(pd.DataFrame(rows), cfg)
