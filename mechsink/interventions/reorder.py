"""Sink-to-the-front: reorder a model's visual tokens so that the detected sinks come first.

    perm = permutation(sinks, "front")                          # [B, S] old position at every slot
    logits = reordered_logits(model, batch, sinks, "front", "kept")
    res = evaluate_reorder(model, dataset, SinkSpec())          # res.frame: one row per sample and condition
    res.table()                                                 # accuracy per question type and condition

Within every image, the LLM positions holding its visual tokens are *slots*. ``front`` puts the
image's sink tokens in the first slots (in their original order) and the other visual tokens after
them (in theirs); ``end`` is the control that puts the sinks last; ``original`` changes nothing.
Text tokens never move.

Position ids are either ``kept`` (a moved token carries the position id it had before: the LLM
receives the permuted position ids explicitly) or ``reassigned`` (the token takes the id of the slot
it lands in, as if the image had been encoded in the new order).

The reorder acts on the language model's inputs: the ViT and projector run once per batch
(:func:`mechsink.trace.llm_inputs`), the input embeddings are gathered in the new order, and the
language model runs on them. Any adapter whose language model takes ``inputs_embeds`` works (the
LLaVA family; Qwen2-VL's 3-D position ids are permuted along their last axis). Settings:
:class:`ReorderConfig`; the result is a :class:`ReorderResult` (a :class:`mechsink.results.Result`);
figures: :func:`mechsink.report.figures.reorder_figure`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..analyses.scoring import accuracy_table, answer_scores
from ..analyses.subsets import sink_spec
from ..batching import batches
from ..config import Config, coerce
from ..data import ErrorLog
from ..errors import MechsinkError
from ..results import Result
from ..trace import LLMInputs, llm_inputs

ORDERS = ("original", "front", "end")
POSITIONS = ("kept", "reassigned")


class ReorderError(MechsinkError, ValueError):
    """A reordering that cannot be built (unknown order, sinks from another batch)."""


# -- the permutation ------------------------------------------------------------------------------
def permutation(sinks, order: str, seq_len: int | None = None) -> torch.Tensor:
    """[B, S] long: ``perm[b, j]`` is the old position of the token placed at position ``j``.

    sinks: a SinkSet of the batch (its ``token_map`` gives the slots of every image). Positions
    outside the images map to themselves; an image without sinks is left as it is."""
    if order not in ORDERS:
        raise ReorderError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
    tm = sinks.token_map
    if tm is None:
        raise ReorderError("the SinkSet has no token map; detect sinks on the batch being reordered")
    b, s = tm.roles.shape
    seq_len = s if seq_len is None else seq_len
    if seq_len != s:
        raise ReorderError(f"sinks were detected on sequences of {s} tokens, the inputs have {seq_len}")
    perm = torch.arange(s).repeat(b, 1)
    if order == "original":
        return perm
    tokens = sinks.llm_tokens()
    for (sample, _image), g in tokens.groupby(["sample", "image"], sort=True):
        g = g.sort_values("llm_pos")
        slots = g["llm_pos"].to_numpy()
        flag = g["is_sink"].to_numpy(dtype=bool)
        first, last = (slots[flag], slots[~flag]) if order == "front" else (slots[~flag], slots[flag])
        perm[int(sample), torch.tensor(slots)] = torch.tensor(np.concatenate([first, last]))
    return perm


def _default_positions(inputs: LLMInputs) -> torch.Tensor:
    """The position ids a decoder builds when given none: 0..S-1 for every row."""
    b, s = inputs.embeds.shape[:2]
    return torch.arange(s, device=inputs.embeds.device).expand(b, s)


def reorder_inputs(inputs: LLMInputs, perm: torch.Tensor, positions: str = "kept") -> dict:
    """Language-model keyword arguments with the tokens in the order ``perm`` [B, S].

    Returns inputs_embeds [B, S, d], attention_mask [B, S] and position_ids (``kept``: the old ids,
    permuted like the tokens; ``reassigned``: the ids of the slots, i.e. those of the original
    inputs). A 2-D attention mask is always passed: without it the decoder would read permuted
    position ids as packed sequences."""
    if positions not in POSITIONS:
        raise ReorderError(f"unknown position mode {positions!r}; choose from {', '.join(POSITIONS)}")
    e = inputs.embeds
    am = inputs.attention_mask
    if am is not None and not (torch.is_tensor(am) and am.dim() == 2):
        raise ReorderError("reordering needs a language model that builds its causal mask from a 2-D attention mask "
                           "(LLaVA family, Qwen2-VL); this one receives a prebuilt mask")
    perm = perm.to(e.device)
    if tuple(perm.shape) != tuple(e.shape[:2]):
        raise ReorderError(f"permutation of shape {tuple(perm.shape)} for inputs of shape {tuple(e.shape[:2])}")
    embeds = e.gather(1, perm[..., None].expand_as(e))
    am = torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if am is None else am.to(e.device).gather(1, perm)
    pos = inputs.position_ids
    if positions == "kept":
        pos = _default_positions(inputs) if pos is None else pos
        pos = pos.to(e.device)
        if pos.shape[-2] == 1 and e.shape[0] > 1:      # [.., 1, S] shared by the batch
            pos = pos.expand(*pos.shape[:-2], e.shape[0], pos.shape[-1])
        pos = pos.gather(-1, perm.expand_as(pos))
    out = {"inputs_embeds": embeds, "attention_mask": am}
    if pos is not None:
        out["position_ids"] = pos
    return out


def reordered_logits(model, batch, sinks, order: str = "front", positions: str = "kept", *,
                     inputs: LLMInputs | None = None) -> torch.Tensor:
    """Logits [B, S, V] of the batch with its visual tokens reordered (slot order: the answer and
    every text token keep their positions)."""
    inputs = inputs if inputs is not None else llm_inputs(model, batch)
    perm = permutation(sinks, order, inputs.embeds.shape[1])
    with torch.no_grad():
        return model.hf(**reorder_inputs(inputs, perm, positions), use_cache=False).logits


# -- evaluation -----------------------------------------------------------------------------------
def conditions(orders: Sequence[str], positions: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, order, position mode) of every condition; ``original`` once, as the baseline."""
    for o in orders:
        if o not in ORDERS:
            raise ReorderError(f"unknown order {o!r}; choose from {', '.join(ORDERS)}")
    for p in positions:
        if p not in POSITIONS:
            raise ReorderError(f"unknown position mode {p!r}; choose from {', '.join(POSITIONS)}")
    out = [("original", "original", "reassigned")]
    out += [(f"{o}/{p}", o, p) for o in orders if o != "original" for p in positions]
    return out


@dataclass(frozen=True)
class ReorderConfig(Config):
    """orders and positions: the conditions (``original`` is always run, once, as the baseline).
    sinks: the SinkSpec that detects sinks per batch (a dict is read as one). limit: first samples
    only (None: all)."""
    orders: tuple[str, ...] = ("front", "end")
    positions: tuple[str, ...] = POSITIONS
    sinks: Any = None
    batch_size: int = 16
    limit: int | None = None

    def __post_init__(self):
        for name in ("orders", "positions"):
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        conditions(self.orders, self.positions)                 # validates both
        object.__setattr__(self, "sinks", sink_spec(self.sinks))
        if self.batch_size < 1:
            raise ReorderError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ReorderResult(Result):
    """``frame``: per-sample outcomes (id, question_type, condition, order, positions, correct,
    logprob, n_sinks); ``config``: the ReorderConfig; ``meta``: n_samples and skipped images."""
    config_class = ReorderConfig

    def table(self, by: Sequence[str] = ("question_type",), alpha: float = 0.05) -> pd.DataFrame:
        """Per group and condition: accuracy with its Wilson CI, mean answer logprob, and the
        paired change against ``original``: ``delta`` (accuracy; bootstrap CI, sign-flip
        permutation p-value) and ``logprob_delta``."""
        from ..stats import bootstrap_ci, paired_permutation_test
        by = list(by)
        keys = [*by, "condition"]
        table = accuracy_table(self.frame, keys, alpha)
        table["mean_sinks"] = self.frame.groupby(keys, sort=False)["n_sinks"].mean().to_numpy()
        wide = self.frame.pivot_table(index=[*by, "id"], columns="condition", values=["correct", "logprob"],
                                      aggfunc="first")
        extra = []
        for _, row in table.iterrows():
            cond = row["condition"]
            rec = {}
            if cond != "original":
                sub = wide.loc[tuple(row[k] for k in by)] if by else wide
                x = sub["correct"][cond].astype(float).to_numpy()
                base = sub["correct"]["original"].astype(float).to_numpy()
                d = x - base
                rec["logprob_delta"] = float((sub["logprob"][cond] - sub["logprob"]["original"]).mean())
                if len(d) >= 2:
                    est, lo, hi = (bootstrap_ci(d, alpha=alpha, method="percentile") if np.ptp(d) > 0
                                   else (float(d[0]),) * 3)
                    rec.update(delta=est, delta_low=lo, delta_high=hi,
                               p_value=float(paired_permutation_test(x, base, alternative="two-sided")))
            extra.append(rec)
        return pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1)

    def summary(self) -> dict:
        """Accuracy per condition over every sample, with the paired change against ``original``."""
        t = self.table(())
        cols = ("n", "accuracy", "ci_low", "ci_high", "logprob", "delta", "delta_low", "delta_high", "p_value")
        return {"n_rows": int(len(self.frame)),
                **{r["condition"]: {k: r[k] for k in cols if k in r} for _, r in t.iterrows()}}


def _reorder_rows(model, chunk, spec, conds) -> list[dict]:
    from ..sinks.detect import detect
    batch = chunk.batch
    found = detect(model, batch, spec)
    n_sinks = found.llm_tokens().groupby("sample")["is_sink"].sum().reindex(range(batch.size), fill_value=0)
    inputs = llm_inputs(model, batch)
    rows = []
    for label, order, pos in conds:
        logits = reordered_logits(model, batch, found, order, pos, inputs=inputs)
        correct, logprob = answer_scores(model, batch, logits)
        for i, s in enumerate(chunk.samples):
            rows.append({"id": s.id, "question_type": s.question_type, "condition": label, "order": order,
                         "positions": pos, "correct": bool(correct[i]), "logprob": float(logprob[i]),
                         "n_sinks": int(n_sinks.iloc[i])})
    return rows


def evaluate_reorder(model, data, sinks=None, *, config: ReorderConfig | Mapping | None = None,
                     **settings) -> ReorderResult:
    """Accuracy of ``model`` on ``data`` (a Dataset or list of Samples with prompt and answer) with
    its visual tokens in the original order and reordered by every (order, position mode).

    Sinks are detected per batch with ``sinks`` (a SinkSpec; default rule when None). Settings:
    ``config`` and/or its fields as keywords (orders, positions, batch_size, limit). Images that
    cannot be read are skipped and listed in ``meta["errors"]``. Under ``torchrun`` the chunks are
    shared out by rank and every rank returns the frame of a single process."""
    from ..distributed import fail_together, gather
    if sinks is not None:
        settings["sinks"] = sinks
    config = coerce(ReorderConfig, config)
    config = config.replace(**settings) if settings else config
    samples = list(data)[:config.limit]
    conds = conditions(config.orders, config.positions)
    parts, errors = [], ErrorLog()             # (chunk number, rows): merged over torchrun ranks
    with fail_together():
        for chunk in batches(model, samples, config.batch_size, answers=True, errors=errors, shard=True):
            parts.append((chunk.number, _reorder_rows(model, chunk, config.sinks, conds)))
    rows = [r for part in gather(parts) for r in part]
    frame = pd.DataFrame(rows, columns=["id", "question_type", "condition", "order", "positions", "correct", "logprob",
                                        "n_sinks"])
    return ReorderResult(frame, config, {"n_samples": len(samples), "errors": errors.summary()})
