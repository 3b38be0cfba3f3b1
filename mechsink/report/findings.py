"""The findings summary at the top of a report: one line per hypothesis and model, with the effect,
its confidence interval, the p-value, how many images (the independent unit) and questions it rests
on, and a plain verdict -- ``supported``, ``not supported`` or ``not testable here``.

Sections of the pipeline add a finding as they compute it (``add``); ``write`` places the table
first in the report and records every number of it in the manifest under ``<model>.findings.<id>``.
"""
from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE = "supported", "not supported", "not testable here"

SHORT = {"sinks": "sinks exist", "attention": "LLM attends to sinks", "probes": "sinks encode the label",
         "ablation": "ablation: sinks > random", "patching": "patching: sinks > random",
         "subsets": "sinks alone answer", "reorder": "sinks to the front", "relevance": "sinks attend broadly",
         "decoding": "sinks decode the answer", "diysink": "DIYSink router"}

HYPOTHESES = {
    "sinks": "the ViT has sinks (high-norm tokens) under the rule",
    "attention": "the LLM attends more to the sinks than to other visual tokens",
    "probes": "the sinks encode the image-level label (probe above its shuffled-label control)",
    "ablation": "removing the sinks moves the answer more than removing matched random tokens",
    "patching": "patching the sinks moves the answer more than patching matched random tokens",
    "subsets": "the sinks alone answer better than the other visual tokens alone",
    "reorder": "moving the sinks to the front changes accuracy",
    "relevance": "the sinks gather attention more broadly (higher spread) than other tokens",
    "decoding": "a sink alone decodes to the answer more often than another visual token",
    "diysink": "routing a dual (sink / non-sink) projector by a rule changes accuracy",
}


def image_of(sample) -> str:
    """The independent unit of a sample: its image (an ``image_id`` label, else the image file,
    else the sample itself)."""
    labels = getattr(sample, "labels", None) or {}
    return str(labels.get("image_id") or getattr(sample, "image_path", None) or sample.id)


def counts(samples) -> tuple[int, int]:
    """(n images, n questions) of a list of samples."""
    samples = list(samples)
    return len({image_of(s) for s in samples}), len(samples)


def unique_images(samples) -> list:
    """The first sample of every image, in order (analyses of the image alone, e.g. detection)."""
    seen, out = set(), []
    for s in samples:
        k = image_of(s)
        if k not in seen:
            seen.add(k)
            out.append(s)
    return out


def verdict_of(p: float | None, effect: float | None, alpha: float = 0.05, *, testable: bool = True,
               two_sided: bool = False) -> str:
    """``supported`` when the test rejects at ``alpha`` in the hypothesised direction."""
    if not testable or p is None or effect is None or not math.isfinite(p):
        return NOT_TESTABLE
    return SUPPORTED if p < alpha and (two_sided or effect > 0) else NOT_SUPPORTED


def add(findings: list, key: str, model: str, what: str, *, effect: Any = None, ci: tuple | None = None,
        p: float | None = None, n_images: int | None = None, n_questions: int | None = None,
        verdict: str = NOT_TESTABLE, note: str = "") -> None:
    """One finding; values within 1e-12 of zero (sums of rounding) are recorded as 0."""
    def clean(v):
        return 0.0 if isinstance(v, float) and abs(v) < 1e-12 else v
    effect = clean(effect)
    ci = None if ci is None else (clean(ci[0]), clean(ci[1]))
    findings.append({"key": key, "model": model, "hypothesis": HYPOTHESES.get(key.split(".")[-1], key),
                     "measured": what, "effect": effect, "ci_low": None if ci is None else ci[0],
                     "ci_high": None if ci is None else ci[1], "p": p, "n_images": n_images,
                     "n_questions": n_questions, "verdict": verdict, "note": note})


def table(findings: list) -> pd.DataFrame:
    """The findings as shown: one short line each (effect [CI], p, images / questions, verdict)."""
    from .html import format_number
    rows = []
    for f in findings:
        ci = "" if f["ci_low"] is None else f" [{format_number(f['ci_low'], 3)}, {format_number(f['ci_high'], 3)}]"
        eff = f["effect"] if isinstance(f["effect"], str) else format_number(f["effect"], 3)
        name = f["key"].split(".")[-1]
        rows.append({"hypothesis": SHORT.get(name, name), "model": f["model"],
                     "effect [95 % CI]": f"{eff}{ci}" if f["effect"] is not None else "n/a",
                     "p": "n/a" if f["p"] is None else format_number(f["p"], 3),
                     "images / questions": f"{f['n_images'] if f['n_images'] is not None else 'n/a'} / "
                                           f"{f['n_questions'] if f['n_questions'] is not None else 'n/a'}",
                     "verdict": f["verdict"] + (f" ({f['note']})" if f["note"] else "")})
    return pd.DataFrame(rows)


def _measured(findings: list) -> str:
    """What each line states and measures, as a Markdown list (below the table)."""
    seen, lines = set(), []
    for f in findings:
        name = f["key"].split(".")[-1]
        if name not in seen:
            seen.add(name)
            lines.append(f"- **{SHORT.get(name, name)}**: {f['hypothesis']}.")
        lines.append(f"  - {f['model']}: {f['measured']}.")
    return "\n".join(lines)


def write(rep, findings: list, alpha: float = 0.05) -> None:
    """Put the findings first in ``rep`` and record their numbers."""
    rep.section("Findings", f"Effect with its 95 % CI, p, independent images / questions (an image's questions "
                f"are averaged first), verdict at α = {alpha}; *not testable here*: this model or data cannot "
                f"answer it (e.g. no sinks under the rule).", first=True)
    rep.table(table(findings), "Findings, one line per hypothesis and model; what each measures is listed below, "
                               "details follow in the sections.", index=False, name="findings")
    rep.text(_measured(findings))
    for f in findings:
        base = f"{f['key']}"
        for k in ("effect", "ci_low", "ci_high", "p", "n_images", "n_questions"):
            if isinstance(f[k], (int, float)) and not isinstance(f[k], bool):
                rep.number(f"{base}.{k}", f[k])
        rep.number(f"{base}.verdict", re.sub(r"\s+", "_", f["verdict"]))
