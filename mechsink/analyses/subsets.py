"""Sink-only, non-sink-only and all image tokens as visual input, compared per question type.

    res = visual_subsets(model, dataset, SinkSpec(), mode="drop")
    res.table()                       # accuracy with Wilson CIs per question type and input
    report.figures.subset_figure(res)

Inputs are token sets (:mod:`mechsink.selection`): ``image`` (every visual token), ``sinks`` (only
the sink tokens; the rest removed), ``nonsinks`` (the sinks removed). Removal is ``drop`` (tokens
deleted from the LLM sequence; the rows are left-padded to a common length, so later tokens move
up) or ``knockout`` (the tokens stay in place but no other token may attend to them, in every LLM
layer) -- the two removal modes of :mod:`mechsink.ablation`, run through the same engine
(:func:`mechsink.engine.execute`): the ViT runs once per batch, and all inputs of a batch go
through the language model together.

A sample is correct when the first answer token is the arg-max over the vocabulary at the last
prompt position; ``logprob`` is the teacher-forced log-probability of the whole answer. Settings:
:class:`SubsetConfig`; the result is a :class:`SubsetResult` (a :class:`mechsink.results.Result`,
one row per sample and input).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..batching import batches
from ..config import Config, coerce
from ..data import ErrorLog
from ..engine import Plan, execute
from ..results import Result
from ..tokens import ROLE
from ..trace import llm_inputs
from .errors import AnalysisError
from .scoring import ANSWER_METRIC, accuracy_table
from .tokens import TOKEN_SETS, token_set

SUBSETS = TOKEN_SETS            # ("image", "sinks", "nonsinks")
MODES = ("drop", "knockout")


def _subsets(names) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    out = []
    for n in names:
        try:
            out.append(token_set(n))
        except AnalysisError as e:
            raise AnalysisError(f"unknown visual subsets [{n!r}]: {e}") from None
    return tuple(out)


def sink_spec(value):
    """A SinkSpec from a SinkSpec, its dict or None (the default rule)."""
    from ..sinks.detect import SinkSpec
    return coerce(SinkSpec, value)


def removal_masks(sinks, subsets: Sequence[str] = SUBSETS) -> torch.Tensor:
    """bool [C, B, S]: per subset, the LLM positions removed (visual tokens outside the subset)."""
    subsets = _subsets(subsets)
    roles = sinks.token_map.roles
    visual = torch.as_tensor(np.isin(roles, [ROLE["image"], ROLE["newline"]]))
    sink = torch.zeros_like(visual)
    t = sinks.llm_tokens()
    t = t[t["is_sink"]]
    sink[torch.tensor(t["sample"].to_numpy()), torch.tensor(t["llm_pos"].to_numpy())] = True
    by = {"image": torch.zeros_like(visual), "sinks": visual & ~sink, "nonsinks": sink}
    return torch.stack([by[s] for s in subsets])


@dataclass(frozen=True)
class SubsetConfig(Config):
    """subsets: token sets given as visual input. mode: "drop" | "knockout". sinks: the SinkSpec
    that detects sinks per batch (a dict is read as one). limit: first samples only (None: all)."""
    subsets: tuple[str, ...] = SUBSETS
    mode: str = "drop"
    sinks: Any = None
    batch_size: int = 16
    limit: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "subsets", _subsets(self.subsets))
        if self.mode not in MODES:
            raise AnalysisError(f"mode must be 'drop' or 'knockout', got {self.mode!r}")
        object.__setattr__(self, "sinks", sink_spec(self.sinks))
        if self.batch_size < 1:
            raise AnalysisError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SubsetResult(Result):
    """``frame``: one row per (sample, subset): id, question_type, subset, correct, logprob,
    n_visual (visual tokens kept), n_sinks. ``meta``: n_samples and the skipped images."""
    config_class = SubsetConfig

    def table(self, by: Sequence[str] = ("question_type",), alpha: float = 0.05) -> pd.DataFrame:
        """Accuracy with Wilson CIs, mean logprob and mean visual tokens kept per group and subset."""
        keys = [*by, "subset"]
        table = accuracy_table(self.frame, keys, alpha)
        table["mean_visual"] = self.frame.groupby(keys, sort=False)["n_visual"].mean().to_numpy()
        return table

    def summary(self) -> dict:
        """Accuracy (Wilson CI) and mean logprob per subset over every sample."""
        t = self.table(())
        return {"n_rows": int(len(self.frame)), "n_samples": int(self.frame["id"].nunique()) if len(self.frame) else 0,
                **{r["subset"]: {k: r[k] for k in ("n", "accuracy", "ci_low", "ci_high", "logprob", "mean_visual")}
                   for _, r in t.iterrows()}}


def subset_scores(model, batch, sinks, subsets: Sequence[str] = SUBSETS, mode: str = "drop") -> dict:
    """{"correct": bool [C, B], "logprob": [C, B], "removed": bool [C, B, S]} for one batch
    (prepared with ``answers=``)."""
    if mode not in MODES:
        raise AnalysisError(f"mode must be 'drop' or 'knockout', got {mode!r}")
    subsets = _subsets(subsets)
    removed = removal_masks(sinks, subsets)
    targets = ANSWER_METRIC.targets(model, batch)
    plan = Plan(len(subsets), drop=removed if mode == "drop" else None, knockout=removed if mode == "knockout" else None)
    out = execute(model, batch, plan, ANSWER_METRIC, targets, inputs=llm_inputs(model, batch), want_next=True)
    correct = out["next"].argmax(-1) == targets.ids[:, 0][None]
    return {"correct": correct.numpy(), "logprob": out["value"].numpy(), "removed": removed}


def _subset_rows(model, chunk, config: SubsetConfig) -> list[dict]:
    from ..sinks.detect import detect
    batch = chunk.batch
    found = detect(model, batch, config.sinks)
    res = subset_scores(model, batch, found, config.subsets, config.mode)
    visual = np.isin(batch.token_map.roles, [ROLE["image"], ROLE["newline"]]).sum(1)
    n_sinks = found.llm_tokens().groupby("sample")["is_sink"].sum().reindex(range(batch.size), fill_value=0)
    rows = []
    for c, name in enumerate(config.subsets):
        kept = visual - res["removed"][c].sum(1).numpy()
        for b, s in enumerate(chunk.samples):
            rows.append({"id": s.id, "question_type": s.question_type, "subset": name,
                         "correct": bool(res["correct"][c, b]), "logprob": float(res["logprob"][c, b]),
                         "n_visual": int(kept[b]), "n_sinks": int(n_sinks.iloc[b])})
    return rows


def visual_subsets(model, data, sinks=None, *, config: SubsetConfig | Mapping | None = None,
                   **settings) -> SubsetResult:
    """Accuracy of ``model`` on ``data`` (Samples with prompt, answer and question_type) given every
    image token, its sinks only, or its non-sinks only. Sinks are detected per batch with ``sinks``
    (a SinkSpec; default rule when None). Settings: ``config`` and/or its fields as keywords
    (subsets, mode, batch_size, limit). Images that cannot be read are skipped and listed in
    ``meta["errors"]`` (under ``torchrun``, where chunks are shared out by rank and every rank
    returns the frame of a single process, a processor's refusals are listed on the rank that met them)."""
    from ..distributed import fail_together, gather
    if sinks is not None:
        settings["sinks"] = sinks
    config = coerce(SubsetConfig, config)
    config = config.replace(**settings) if settings else config
    samples = list(data)[:config.limit]
    parts, errors = [], ErrorLog()             # (chunk number, rows): merged over torchrun ranks
    with fail_together():
        for chunk in batches(model, samples, config.batch_size, answers=True, errors=errors, shard=True):
            parts.append((chunk.number, _subset_rows(model, chunk, config)))
    rows = [r for part in gather(parts) for r in part]
    frame = pd.DataFrame(rows, columns=["id", "question_type", "subset", "correct", "logprob", "n_visual", "n_sinks"])
    return SubsetResult(frame, config, {"n_samples": len(samples), "errors": errors.summary()})
