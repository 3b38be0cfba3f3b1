"""Sinks against the field's other token-importance signals: which tokens carry the answer?

    cfg = CompareConfig(selections=("sinks", "fastv(layer=2, ratio=0.5)", "vit_attention(ratio=0.5)",
                                    "norm_topk(k=3)"))
    res = compare_selections(model, dataset, cfg, sinks=SinkSpec())
    res.table()          # one row per selection: effect, matched-random effect, diff (CIs), p,
                         # mean Jaccard overlap with every other selection
    plot(res)            # mechsink.report.figures: effects with CIs next to the overlap matrix

Every selection is cut to the same count per image: ``k`` tokens (then ``sinks`` is not allowed:
compare ``norm_topk``), or (``k=None``) as many as the image's sinks, the top-ranked ones for ranking selections (``fastv``, ``vit_attention``,
``norm_topk``; ``ratio`` is ignored here). Each set is ablated (``mode`` at ``site``, as in
``mechsink.ablation``) next to ``n_draws`` random non-sink sets of the same count; the effect of a
set is compared with its image's mean random effect by ``stats.compare_paired`` over images
(questions on one image averaged first). The frame also keeps each set's patches, from which
``jaccard()`` gives the per-image overlap of every pair.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import pandas as pd

from ..ablation import AblationConfig, _clean_with_site, _plan, cell_means
from ..batching import batches
from ..config import Config, coerce
from ..engine import execute
from ..errors import MechsinkError
from ..importance import score_table
from ..metrics import Metric
from ..results import Result
from ..selection import Selection, SinkSource, draw_random, top_rows
from ..stats import compare_paired, image_keys


class CompareError(MechsinkError, ValueError):
    """Bad comparison input (no patch selections, no valid images)."""


@dataclass(frozen=True)
class CompareConfig(Config):
    """Selections compared at equal count (``k``, or the image's sink count) by ablation."""
    selections: tuple[str, ...] = ("sinks", "fastv(layer=0, ratio=0.5)", "vit_attention(ratio=0.5)", "norm_topk(k=1)")
    k: int | None = None
    site: str = "proj.out"
    mode: str = "zero"
    metric: Metric = field(default_factory=Metric)
    n_draws: int = 16
    seed: int = 0
    batch_size: int = 8
    rows_per_forward: int = 64
    n_boot: int = 2000
    n_perm: int = 10000
    alpha: float = 0.05
    alternative: str = "greater"

    def __post_init__(self):
        sels = tuple(str(Selection.parse(s)) for s in ([self.selections] if isinstance(self.selections, str)
                                                       else self.selections))
        bad = [s for s in sels if Selection.parse(s).kind in ("random", "image", "nonsinks")
               or not Selection.parse(s).on_patches]
        if not sels or bad:
            raise CompareError(f"compare sinks and ranking selections (random is the control): bad {bad or 'none'}")
        object.__setattr__(self, "selections", sels)
        object.__setattr__(self, "metric", Metric.coerce(self.metric))
        if self.k is not None and int(self.k) < 1:
            raise CompareError(f"k must be >= 1, got {self.k}")
        if self.k is not None and "sinks" in sels:
            raise CompareError("the sinks have their own count per image: with k, compare norm_topk(k) (the k "
                               "most sink-like tokens) instead of sinks")
        self.ablation                                         # validates site/mode/draws

    @property
    def ablation(self) -> AblationConfig:
        return AblationConfig(site=self.site, mode=self.mode, metric=self.metric, n_draws=self.n_draws, seed=self.seed,
                              batch_size=self.batch_size, rows_per_forward=self.rows_per_forward)


@dataclass
class CompareResult(Result):
    """``frame``: one row per sample x set (a selection's name or "random") x draw with columns
    sample, id, image_key, set, draw, n_tokens, patches, value, clean, effect, valid."""
    config_class: ClassVar[type | None] = CompareConfig

    def _valid(self) -> pd.DataFrame:
        f = self.frame[self.frame["valid"]]
        if f.empty:
            raise CompareError("no valid samples: every sample lacked sinks or random controls")
        return f

    def comparison(self, selection: str, **kw):
        """stats.Comparison of one selection's effect against its matched random sets, over images."""
        f = self._valid()
        eff = f[f["set"] == selection].set_index("sample")["effect"].sort_index()
        rand = f[f["set"] == "random"].pivot(index="sample", columns="draw", values="effect").loc[eff.index]
        units = f.drop_duplicates("sample").set_index("sample")["image_key"].loc[eff.index].astype(str).to_numpy()
        c = self.config
        args = dict(n_boot=c.n_boot, n_perm=c.n_perm, alpha=c.alpha, alternative=c.alternative, seed=c.seed, units=units)
        return compare_paired(eff.to_numpy(), rand.to_numpy(), **{**args, **kw})

    def jaccard(self) -> pd.DataFrame:
        """Per sample and pair of sets (random: draw 0), |A & B| / |A | B| of their patches."""
        f = self._valid()
        f = f[f["draw"] == 0]
        sets = [*self.config.selections, "random"]
        out = []
        for s, g in f.groupby("sample"):
            pats = {r["set"]: set(str(r["patches"]).split()) for _, r in g.iterrows()}
            for i, a in enumerate(sets):
                for b in sets[i + 1:]:
                    union = pats[a] | pats[b]
                    out.append({"sample": s, "a": a, "b": b,
                                "jaccard": len(pats[a] & pats[b]) / len(union) if union else 1.0})
        return pd.DataFrame(out)

    def table(self) -> pd.DataFrame:
        """One row per selection: effect, random effect and diff with CIs, p-value, n images and
        the mean Jaccard overlap with every other set (columns ``J:<set>``)."""
        jac = self.jaccard()
        sets = [*self.config.selections, "random"]
        mean_j = {(a, b): v for (a, b), v in jac.groupby(["a", "b"])["jaccard"].mean().items()}
        rows = []
        for sel in self.config.selections:
            d = self.comparison(sel).to_dict()
            row = {"selection": sel, "effect": d["sink"]["mean"], "effect_low": d["sink"]["ci_low"],
                   "effect_high": d["sink"]["ci_high"], "random": d["random"]["mean"], "diff": d["diff"]["mean"],
                   "diff_low": d["diff"]["ci_low"], "diff_high": d["diff"]["ci_high"], "p_value": d["p_value"], "n": d["n"]}
            for other in sets:
                row[f"J:{other}"] = 1.0 if other == sel else mean_j.get((sel, other), mean_j.get((other, sel)))
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        t = self.table()
        return {"metric": self.config.metric.name, "n": int(t["n"].max()),
                "selections": {r["selection"]: {k: v for k, v in r.items() if k != "selection"} for r in t.to_dict("records")}}


def compare_selections(model, data, config: CompareConfig | dict | None = None, *, sinks: SinkSource = None,
                       foreground: Callable | None = None, errors=None, progress: bool = False,
                       **overrides) -> CompareResult:
    """Ablate every selection of ``config`` at equal count and compare each with matched random
    sets (see the module docstring). sinks: the sink rule (default: the default SinkSpec)."""
    cfg = coerce(CompareConfig, config)
    cfg = cfg.replace(**overrides) if overrides else cfg
    if sinks is None:
        from ..sinks.detect import SinkSpec
        sinks = SinkSpec()
    acfg = cfg.ablation
    means = None
    if cfg.mode == "mean":
        from ..data import ErrorLog
        means = cell_means(model, (c.batch for c in batches(model, data, cfg.batch_size, errors=ErrorLog())), cfg.site)
    frames = []
    for k, chunk in enumerate(batches(model, data, cfg.batch_size, errors=errors,
                                      progress="compare" if progress else False)):
        frames.append(_batch(model, chunk, k, cfg, acfg, sinks, foreground, means))
    if not frames:
        raise CompareError("no data to compare")
    return CompareResult(pd.concat(frames, ignore_index=True), cfg, {"model": getattr(model, "name", "")})


def _batch(model, chunk, k: int, cfg: CompareConfig, acfg: AblationConfig, sinks, foreground, means) -> pd.DataFrame:
    batch = chunk.batch
    tm = batch.token_map
    sels = [Selection.parse(s) for s in cfg.selections]
    table = score_table(model, batch, sels, sinks=sinks, foreground=foreground)
    gidx, ids = chunk.indices, chunk.ids
    rand, valid, reason = draw_random(table, tm, cfg.n_draws, axis=acfg.axis, k=cfg.k, seed=cfg.seed, sample_ids=gidx)
    samples = table["sample"].to_numpy()
    is_sink = table["is_sink"].to_numpy().astype(bool)
    counts = [cfg.k if cfg.k is not None else int(is_sink[samples == s].sum()) for s in range(batch.size)]
    chosen = []
    for sel in sels:
        if sel.ranking:
            chosen.append(top_rows(table, sel.score_column, axis=acfg.axis, counts=counts))
        else:                                                 # the sinks (k is None: CompareConfig)
            chosen.append(is_sink)
    select = np.concatenate([np.stack(chosen), rand[1:]])
    base, x = _clean_with_site(model, batch, acfg)
    plan = _plan(model, batch, acfg, select, means, base, seed=cfg.seed + k, x=x)
    res = execute(model, batch, plan, cfg.metric, base["targets"], inputs=base["inputs"], clean_next=base["next"],
                  rows_per_forward=cfg.rows_per_forward)
    value = res["value"]
    effect = cfg.metric.effect(value, base["value"][None])
    keys = image_keys(batch.images)
    patch = table["patch"].to_numpy()
    names = [str(s) for s in sels] + ["random"] * cfg.n_draws
    draws = [0] * len(sels) + list(range(cfg.n_draws))
    rows = []
    for c in range(select.shape[0]):
        for s in range(batch.size):
            p = np.sort(patch[select[c] & (samples == s)])
            rows.append({"batch": k, "sample": gidx[s], "id": str(ids[s]), "image_key": keys[s], "set": names[c],
                         "draw": draws[c], "n_tokens": len(p), "patches": " ".join(map(str, p)),
                         "value": float(value[c, s]), "clean": float(base["value"][s]), "effect": float(effect[c, s]),
                         "valid": bool(valid[s]), "reason": reason[s]})
    return pd.DataFrame(rows)


__all__ = ["CompareConfig", "CompareError", "CompareResult", "compare_selections"]
