"""Token-importance scores from one forward: what the ranking selections rank by.

    table = score_table(model, batch, [fastv(2, 0.5), vit_attention(k=3)], sinks=SinkSpec())
    picked = resolve([fastv(2, 0.5), "sinks", "random"], table, batch.token_map)

``score_table`` is the batch's sink table (``selection.sink_table``) with one column per ranking
selection's ``score_column``:

- ``fastv@L``: attention from the sample's last prompt token (the position that predicts the
  answer) to each visual token at LLM layer L, mean over heads (FastV, arXiv 2403.06764);
- ``vit_attention@L`` (``@last``: the last ViT layer): attention each patch receives in ViT layer
  L, mean over heads, from the CLS token where the ViT has one, else the mean over all queries
  (VisionZip's dominant tokens, arXiv 2412.04467);
- ``norm``: the sink score of the sink rule (``norm_topk``), detected with the default rule when
  the sink source gives none.

All patterns come from one traced run (eager attention only where a pattern is read).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .selection import Selection, SelectionError, SinkSource, sink_table


def _layer(model, sel: Selection) -> int:
    n = model.n_vit_layers if sel.kind == "vit_attention" else model.n_llm_layers
    layer = n - 1 if sel.layer is None else sel.layer
    if not -n <= layer < n:
        raise SelectionError(f"{sel}: layer {sel.layer} outside the model's {n} {sel.kind.split('_')[0]} layers")
    return layer % n


def _site(model, sel: Selection) -> str:
    part = "vit" if sel.kind == "vit_attention" else "llm"
    return f"{part}.blocks.{_layer(model, sel)}.attn.hook_pattern"


def vit_attention_scores(pattern: torch.Tensor, tm, rows: pd.DataFrame) -> np.ndarray:
    """Attention each patch row receives inside the ViT: pattern [items, heads, q, k] (ViT axis)."""
    p = pattern.float().mean(1).cpu()                                    # [items, q, k]
    cls = tm.special[tm.special["role"] == "cls"]
    from_cls = {int(i): int(q) for i, q in zip(cls["vit_item"], cls["vit_pos"]) if q >= 0}
    out = np.full(len(rows), np.nan)
    items, pos = rows["vit_item"].to_numpy(), rows["vit_pos"].to_numpy()
    for j, (i, k) in enumerate(zip(items, pos)):
        if k < 0:
            continue
        out[j] = float(p[i, from_cls[i], k]) if int(i) in from_cls else float(p[i, :, k].mean())
    return out


def fastv_scores(pattern: torch.Tensor, last_pos: torch.Tensor, rows: pd.DataFrame) -> np.ndarray:
    """Attention from each sample's last prompt token to each patch row's LLM token:
    pattern [batch, heads, q, k] (LLM axis)."""
    p = pattern.float().mean(1).cpu()                                    # [B, q, k]
    s, pos = rows["sample"].to_numpy(), rows["llm_pos"].to_numpy()
    q = last_pos.cpu().numpy()[s]
    out = p[torch.tensor(s), torch.tensor(q), torch.tensor(np.maximum(pos, 0))].numpy().astype(float)
    return np.where(pos >= 0, out, np.nan)


def score_table(model, batch, selections: Sequence[Selection | str] = (), *, sinks: SinkSource = None,
                foreground: Callable | None = None) -> pd.DataFrame:
    """The sink table of ``batch`` with the score column of every ranking selection in
    ``selections`` (others are ignored). sinks: as in ``selection.sink_table`` (default: the
    default SinkSpec)."""
    from .sinks.detect import SinkSpec
    sels = [Selection.parse(s) for s in selections]
    table = sink_table(model, batch, SinkSpec() if sinks is None else sinks, foreground)
    ranking = [s for s in sels if s.ranking]
    if any(s.kind == "norm_topk" for s in ranking) and "norm" not in table.columns:
        table["norm"] = SinkSpec().detect(model, batch).patches["norm"].to_numpy()
    attn = [s for s in ranking if s.kind != "norm_topk"]
    if not attn:
        return table
    sites = sorted({_site(model, s) for s in attn})
    got = model.run(batch, read=sites)
    tm = batch.token_map
    for s in attn:
        site = _site(model, s)
        if s.kind == "vit_attention":
            table[s.score_column] = vit_attention_scores(got[site], tm, table)
        else:
            table[s.score_column] = fastv_scores(got[site], batch.last_pos, table)
    return table


__all__ = ["fastv_scores", "score_table", "vit_attention_scores"]
