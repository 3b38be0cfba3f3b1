"""Word decoding of an isolated visual token: what does the LM head say when the model sees one
visual token only?

    res = decode_isolated(model, batch, sinks, k=5)            # res.frame: one row per token and rank
    res.table(labels=["red", "blue", ...])                     # top-1 hits per token set, Wilson CIs

For every chosen visual token, the batch row is rerun with attention from every query to every other
visual token of the sample knocked out in every LLM layer (a token still attends to itself and to
the text before it): no text token can read, or relay, any visual token but the kept one. The
top-k next-token predictions at the last prompt position are the token's "words". Sinks are
expected to decode to the main object far more often than other tokens.

The ViT and projector run once (:func:`mechsink.trace.llm_inputs`); the copies run the language
model only, with :func:`mechsink.trace.knockout` (sdpa or eager attention). Settings:
:class:`DecodingConfig` (``tokens``: a token set ``image``, ``sinks`` or ``nonsinks``; ``k``); the
result is a :class:`DecodingResult` (a :class:`mechsink.results.Result`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..config import Config, coerce
from ..results import Result
from ..tokens import ROLE
from ..trace import knockout, llm_inputs
from .errors import AnalysisError
from .tokens import pick, token_set


@dataclass(frozen=True)
class DecodingConfig(Config):
    """tokens: token set ``image``, ``sinks`` or ``nonsinks`` (None: explicit rows were given).
    k: words per token. rows_per_forward: isolated copies per language-model forward."""
    tokens: str | None = "image"
    k: int = 5
    rows_per_forward: int = 32

    def __post_init__(self):
        if self.tokens is not None:
            object.__setattr__(self, "tokens", token_set(self.tokens))
        if int(self.k) < 1 or int(self.rows_per_forward) < 1:
            raise AnalysisError(f"k and rows_per_forward must be >= 1, got {self.k}, {self.rows_per_forward}")


@dataclass
class DecodingResult(Result):
    """``frame``: one row per (token, rank): sample, llm_pos, image, row, col, norm, is_sink, rank
    (0 = top), token_id, word, logprob."""
    config_class = DecodingConfig

    def table(self, labels: Sequence[str] | None = None, *, top: int = 1, alpha: float = 0.05) -> pd.DataFrame:
        """:func:`decoding_summary` of these words."""
        return decoding_summary(self.frame, labels, top=top, alpha=alpha)

    def summary(self) -> dict:
        """Tokens decoded and the most frequent top-1 words per token set."""
        t = self.table()
        return {"n_rows": int(len(self.frame)),
                **{r["token_set"]: {"n_tokens": int(r["n_tokens"]), "top_words": r["top_words"]} for _, r in t.iterrows()}}


def _tokens(sinks, tokens) -> pd.DataFrame:
    t = sinks.llm_tokens()
    t = t[t["role"] == "image"] if "role" in t.columns else t
    if isinstance(tokens, pd.DataFrame):
        return t.merge(tokens[["sample", "llm_pos"]].drop_duplicates(), on=["sample", "llm_pos"])
    return pick(t, token_set(tokens))


def _word(tok, i: int) -> str:
    return tok.decode([int(i)]).strip()


def decode_isolated(model, batch, sinks, *, config: DecodingConfig | None = None, tokens=None,
                    **settings) -> DecodingResult:
    """Top-``k`` words read at the last prompt position with one visual token kept visible.

    Settings: ``config`` (a DecodingConfig) and/or its fields as keywords; ``tokens`` a token set
    (``"image"``, ``"sinks"``, ``"nonsinks"``) or rows with ``sample`` and ``llm_pos``. Returns a
    DecodingResult (one row per token and rank)."""
    if isinstance(tokens, pd.DataFrame):
        settings["tokens"] = None
    elif tokens is not None:
        settings["tokens"] = tokens
    config = coerce(DecodingConfig, config)
    config = config.replace(**settings) if settings else config
    k, rows_per_forward = config.k, config.rows_per_forward
    chosen = _tokens(sinks, tokens if isinstance(tokens, pd.DataFrame) else config.tokens).reset_index(drop=True)
    if chosen.empty:
        raise AnalysisError(f"no visual tokens selected ({config.tokens or 'rows'}) to decode")
    inp = llm_inputs(model, batch)
    if inp.attention_mask is not None and not torch.is_tensor(inp.attention_mask):
        raise AnalysisError(f"{model.name} hands its language model a prebuilt mask; isolating tokens needs a 2-D one")
    visual = torch.as_tensor(np.isin(batch.token_map.roles, [ROLE["image"], ROLE["newline"]]))     # [B, S]
    last = batch.last_pos.cpu()
    tok = getattr(model.processor, "tokenizer", model.processor)
    out = []
    for c0 in range(0, len(chosen), rows_per_forward):
        part = chosen.iloc[c0:c0 + rows_per_forward]
        rows = torch.tensor(part["sample"].to_numpy())
        key_mask = visual[rows].clone()
        key_mask[torch.arange(len(rows)), torch.tensor(part["llm_pos"].to_numpy())] = False
        dev = inp.embeds.device
        kw = {"inputs_embeds": inp.embeds[rows.to(dev)], "use_cache": False}
        if inp.attention_mask is not None:
            kw["attention_mask"] = inp.attention_mask[rows.to(inp.attention_mask.device)]
        if inp.position_ids is not None:
            p = inp.position_ids
            kw["position_ids"] = p if p.shape[-2] == 1 else p.index_select(-2, rows.to(p.device))
        pos = last[rows]
        keep = torch.unique(pos)
        kw["logits_to_keep"] = keep.to(dev)
        with torch.no_grad(), knockout(model, key_mask):
            logits = model.hf(**kw).logits                                   # [R, len(keep), V]
        col = torch.searchsorted(keep, pos)
        nxt = logits[torch.arange(len(rows)), col.to(logits.device)].float().log_softmax(-1)
        top = nxt.topk(k, dim=-1)
        for r, (_, t) in enumerate(part.iterrows()):
            for rank in range(k):
                i = int(top.indices[r, rank])
                out.append({"sample": int(t["sample"]), "llm_pos": int(t["llm_pos"]), "image": int(t["image"]),
                            "row": int(t["row"]), "col": int(t["col"]), "norm": float(t["norm"]),
                            "is_sink": bool(t["is_sink"]), "rank": rank, "token_id": i, "word": _word(tok, i),
                            "logprob": float(top.values[r, rank])})
    return DecodingResult(pd.DataFrame(out), config, {"n_tokens": int(len(chosen))})


def decoding_summary(words: "pd.DataFrame | DecodingResult", labels: Sequence[str] | None = None, *, top: int = 1,
                     alpha: float = 0.05) -> pd.DataFrame:
    """Per token set (sinks / non-sinks): how often the sample's label is among the top-``top``
    words (Wilson CI), plus the most frequent top-1 words. words: a DecodingResult or its frame;
    labels: one per sample (case-insensitive)."""
    from ..stats import binomial_ci
    words = getattr(words, "frame", words)
    rows = []
    for is_sink, g in words.groupby("is_sink", sort=False):
        first = g[g["rank"] == 0]
        row = {"token_set": "sinks" if is_sink else "nonsinks", "n_tokens": len(first),
               "top_words": ", ".join(first["word"].value_counts().index[:5])}
        if labels is not None:
            lab = np.array([str(x).strip().lower() for x in labels])
            hit = (g[g["rank"] < top].assign(label=lambda d: lab[d["sample"].to_numpy()])
                   .assign(hit=lambda d: d["word"].str.lower() == d["label"])
                   .groupby(["sample", "llm_pos"])["hit"].any())
            acc, lo, hi = binomial_ci(int(hit.sum()), len(hit), alpha=alpha)
            row.update(label_rate=acc, ci_low=lo, ci_high=hi)
        rows.append(row)
    return pd.DataFrame(rows)
