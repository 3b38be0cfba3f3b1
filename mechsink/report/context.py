"""What the report's pieces share: the sections it knows, ``ReportConfig`` (everything that shapes a
number), the per-model context ``_Ctx`` (with the honest name of the causal token set) and the small
helpers every section uses to record numbers under manifest keys. Split from ``pipeline`` so that
the sections import this module, never the pipeline that runs them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import MechsinkError

WORK_MARK = ".mechsink-work"     # marks a report's work folder as mechsink's own (safe to delete)
MAIN_SECTIONS = ("detection", "attention", "probes", "ablation", "patching", "subsets", "reorder")
CONTROL_SECTIONS = ("detection", "attention", "probes", "ablation", "patching")
PAPER_SECTIONS = ("relevance", "decoding", "diysink")      # run when a config or recipe asks for them
SECTIONS = MAIN_SECTIONS + PAPER_SECTIONS
# Image-level labels worth probing, by bundled dataset (the first present ones are used).
PROBE_LABELS = ("planted_label", "majority_class", "n_items", "top_left", "folder")


@dataclass(frozen=True)
class ReportConfig(Config):
    model: str = "toy-llava"
    data: str | None = None                    # default: the model's bundled evaluation set
    control: str | None = "planted-llava"      # positive control for the causal sections; None to skip
    control_data: str | None = None
    limit: int = 240                           # samples for detection, probes, subsets, reorder
    causal_limit: int = 96                     # samples for ablation and patching
    attention_limit: int = 64
    draws: int = 16                            # random control draws per sample
    seed: int = 0
    sinks: dict | None = None                  # mechsink.sinks.SinkSpec.to_dict(); None = the default rule
    fallback_topk: int = 3                     # when the rule finds no sinks: top-k norm tokens, labelled as such
    probe_labels: tuple[str, ...] | None = None
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None                   # e.g. "bfloat16" for 7B models on a GPU
    device_map: str | None = None              # "auto" spreads a large model over the GPUs
    title: str | None = None
    sections: tuple[str, ...] | None = None            # main model's sections (default MAIN_SECTIONS)
    control_sections: tuple[str, ...] | None = None    # control's sections (default CONTROL_SECTIONS)

    def __post_init__(self):
        for name in ("probe_labels", "sections", "control_sections"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = {*(self.sections or ()), *(self.control_sections or ())} - set(SECTIONS)
        if bad:
            raise MechsinkError(f"unknown report section(s) {sorted(bad)}; sections: {', '.join(SECTIONS)}")


@dataclass
class _Ctx:
    """What one model's sections share."""
    key: str                 # prefix of its numbers in the manifest
    model: Any
    data: Any                # mechsink.data.Dataset
    spec: Any                # the SinkSpec the user asked for
    causal_spec: Any = None  # the spec the causal sections use (the fallback when no sinks exist)
    fallback: bool = False
    work: Path = Path(".")
    notes: list[str] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        """What the causal token set is called in tables, legends, file names and manifest keys:
        ``sinks``, or ``top{k}_norm`` when the rule found none and the top-k norm tokens stand in."""
        return f"top{self.causal_spec.params['k']}_norm" if self.fallback else "sinks"

    def name(self, text) -> str:
        """A label of the data with the token set named honestly (sinks -> top3_norm, nonsinks ->
        not_top3_norm, sink_effect -> top3_norm_effect) when the set is a fallback."""
        text = str(text)
        if not self.fallback:
            return text
        text = re.sub(r"non-?sinks?", "\0", text)
        return re.sub(r"sinks?", self.label, text).replace("\0", f"not_{self.label}")

    def names(self, values) -> dict:
        return {v: self.name(v) for v in values}


def _subset(ctx: _Ctx, n: int):
    return ctx.data[:min(n, len(ctx.data))]


def _num(rep, key: str, value) -> None:
    """Record a number under a manifest key made of dotted words."""
    rep.number(key, value)


def _part(label) -> str:
    """One word of a manifest key from a label of the data (a question type, a condition): kept
    as it is when it is a plain word, else a readable slug plus a hash of the label, so that two
    labels never share a key ("颜色" and "形状", "x y" and "x_y"); the label itself stays in the tables."""
    import hashlib
    text = str(label)
    if re.fullmatch(r"[A-Za-z0-9_\-]+", text):
        return text
    slug = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_") or "label"
    return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
