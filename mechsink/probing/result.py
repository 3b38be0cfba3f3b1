"""``ProbeResult``: one row per (token set, site), the probes refit on every image and the splits.

Saved as a :class:`mechsink.results.Result` (``frame.parquet`` + ``result.json``: config, summary,
notes, store id) plus ``splits.parquet`` and ``probes/`` (one safetensors + JSON pair per
(token set, site)). Figures: :func:`mechsink.report.figures.probe_figure`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..atomic import write_parquet
from ..results import Result, json_safe
from .config import ProbeConfig, ProbeError
from .linear import LinearProbe, load_probe

RESULT_COLUMNS = ["label", "level", "token_set", "site", "depth", "unit", "aggregate", "metric", "accuracy", "ci_low",
                  "ci_high", "token_accuracy", "control_accuracy", "control_ci_low", "control_ci_high", "selectivity",
                  "majority", "chance", "n_classes", "n_images", "n_units", "n_tokens", "k", "model"]
SPLIT_COLUMNS = ["token_set", "site", "fold", "image", "side"]
SPLITS = "splits.parquet"
PROBES = "probes"


def probe_name(token_set: str, site: str) -> str:
    """File stem of the saved probe of (token set, site) under ``probes/``."""
    return f"{token_set}__{site}"


@dataclass
class ProbeResult(Result):
    """frame: one row per (token_set, site) (see RESULT_COLUMNS); config: the ProbeConfig; meta:
    ``notes`` (token sets/sites left out and why) and ``store_id``.

    probes: {(token_set, site): LinearProbe} refit on all images; splits: (token_set, site, fold,
    image, side) for every image in every fold, read off the index arrays each fold trained and
    tested on (a site using the same rows as an earlier site of its token set shares its splits and
    is not repeated; probes resumed from ``out`` are absent)."""

    probes: dict[tuple[str, str], LinearProbe] = field(default_factory=dict)
    splits: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SPLIT_COLUMNS))
    config_class = ProbeConfig

    @property
    def notes(self) -> list[str]:
        return list(self.meta.get("notes", []))

    @property
    def store_id(self) -> str:
        return str(self.meta.get("store_id", ""))

    def to_records(self) -> list[dict]:
        """JSON-ready rows (NaN -> None): what ``mechsink probe --json`` prints."""
        return json_safe(self.frame.to_dict(orient="records"))

    def summary(self) -> dict:
        """Label, level and per token set the best site by accuracy (with its CI and selectivity)."""
        f = self.frame
        if not {"token_set", "accuracy", "level"} <= set(f.columns):
            return super().summary()
        best = {}
        for ts, g in f.groupby("token_set", sort=False):
            r = g.loc[g["accuracy"].idxmax()] if g["accuracy"].notna().any() else g.iloc[0]
            best[ts] = {k: r[k] for k in ("site", "accuracy", "ci_low", "ci_high", "control_accuracy", "selectivity")}
        return {"n_rows": int(len(f)), "label": self.config.label if self.config is not None else None,
                "level": f["level"].iloc[0] if len(f) else None, "best": best, "notes": self.notes}

    def save(self, path: str | os.PathLike, *, summary: bool = True) -> Path:
        """``frame.parquet`` + ``result.json`` (the Result files), ``splits.parquet`` and ``probes/``."""
        out = super().save(path, summary=summary)
        for (ts, site), p in self.probes.items():
            p.save(out / PROBES / probe_name(ts, site))
        write_parquet(out / SPLITS, self.splits)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProbeResult":
        res = super().load(path)
        path = Path(path)
        if (path / SPLITS).exists():
            res.splits = pd.read_parquet(path / SPLITS)
        keys = zip(res.frame["token_set"], res.frame["site"]) if {"token_set", "site"} <= set(res.frame.columns) else ()
        for ts, site in keys:
            try:
                res.probes[ts, site] = load_probe(path / PROBES / probe_name(ts, site))
            except ProbeError:
                continue                # a probe resumed from an earlier run is not saved again
        return res
