"""The HTML report: sections of text, tables, figures and recorded numbers, written with a manifest.

``index.html`` is one self-contained file (inline CSS, figures as base64 PNG data URIs, no
scripts), so it opens offline and can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Mapping

import numpy as np
import pandas as pd
from markdown_it import MarkdownIt

from mechsink.atomic import write_text
from mechsink.report.manifest import ReportError, build_manifest, to_jsonable, write_manifest

_KEY = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
# Raw HTML is never passed through: names of datasets, models and labels reach the text, and a
# file called "<img onerror=...>.jsonl" must stay text. Markdown links are checked by markdown-it.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


@dataclass
class _Section:
    title: str | None
    anchor: str | None
    parts: list[str] = field(default_factory=list)


def format_number(value: Any, digits: int = 4) -> str:
    """How a number is shown in the report: ints exactly, floats to `digits` significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        text = f"{float(value):.{digits}g}"
        return text[1:] if re.fullmatch(r"-0(\.0*)?(e[+-]?\d+)?", text) else text   # no negative zero
    return str(value)


class Report:
    """A reproducible report built in reading order.

    >>> r = Report("Toy model: sink ablation")
    >>> r.section("Ablation", "Sinks vs matched random tokens.")
    >>> r.text(f"Mean drop {r.number('toy.ablation.diff.mean', 0.31)}.")
    >>> r.write("runs/toy-report")          # -> runs/toy-report/index.html (+ manifest.json)

    config, seeds, models and data are the provenance written to ``manifest.json``; set them at
    construction or fill the dicts later.
    """

    def __init__(
        self,
        title: str,
        *,
        config: Mapping | None = None,
        seeds: Mapping | None = None,
        models: Mapping | None = None,
        data: Mapping | None = None,
    ):
        self.title = title
        self.config: dict = dict(config or {})
        self.seeds: dict = dict(seeds or {})
        self.models: dict = dict(models or {})
        self.data: dict = dict(data or {})
        self.numbers: dict[str, Any] = {}
        self._sections = [_Section(title=None, anchor=None)]
        self._at = 0                       # the section that text, tables and figures go to
        self._figures: list[dict] = []
        self._tables: list[tuple[str, pd.DataFrame, str | None]] = []

    # ------------------------------------------------------------------------------ building

    @property
    def _current(self) -> _Section:
        return self._sections[self._at]

    def section(self, title: str, text: str | None = None, *, first: bool = False) -> "Report":
        """Start a new section (listed in the table of contents), optionally with intro text.
        first: place it before every other section (e.g. findings computed at the end of a run);
        what is added next goes into it until the next ``section``."""
        taken = {s.anchor for s in self._sections} | {"recorded-numbers"}
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
        anchor, i = base, 2
        while anchor in taken:
            anchor, i = f"{base}-{i}", i + 1
        if first:
            self._sections.insert(1, _Section(title=title, anchor=anchor))
            self._at = 1
        else:
            self._sections.append(_Section(title=title, anchor=anchor))
            self._at = len(self._sections) - 1
        if text:
            self.text(text)
        return self

    def text(self, md_or_html: str) -> "Report":
        """Add Markdown (CommonMark + tables); any HTML inside it is shown as text."""
        self._current.parts.append(_MARKDOWN.render(md_or_html))
        return self

    def table(self, df: pd.DataFrame, caption: str | None = None, *, digits: int = 4, index: bool | None = None,
              name: str | None = None) -> "Report":
        """Add a DataFrame as an HTML table (also written as CSV next to index.html).

        Floats show `digits` significant digits; the index is shown unless it is a plain range.
        name: an unnumbered table written as ``tables/<name>.csv`` (e.g. the findings, placed first
        but computed last); other tables are numbered in the order they are added.
        """
        if not isinstance(df, pd.DataFrame):
            raise ReportError(f"table() needs a pandas DataFrame, got {type(df).__name__}")
        if index is None:
            index = not isinstance(df.index, pd.RangeIndex)
        df = df.copy()
        for j, t in enumerate(df.dtypes):
            if pd.api.types.is_float_dtype(t):
                df.iloc[:, j] = df.iloc[:, j] + 0.0  # no negative zero in the HTML or the CSV
        number = sum(1 for n, _, _ in self._tables if n.startswith("table-")) + 1
        if name is not None:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", name) or name.startswith("table-"):
                raise ReportError(f"table name {name!r}: lower-case letters, digits, '_' or '-', not 'table-...'")
            name, number = f"{name}.csv", None
        else:
            name = f"table-{number:02d}.csv"
        self._tables.append((name, df.copy(), caption))
        cap = (f"Table {number}" + (": " if caption else "") if number else "") + (html.escape(caption) if caption else "")
        cap += f' <a href="tables/{name}">(csv)</a>'
        self._current.parts.append(_table_html(df.reset_index() if index else df, cap, digits))
        return self

    def figure(self, fig, caption: str | None = None, *, dpi: int = 110) -> "Report":
        """Embed a matplotlib Figure as a PNG data URI, then close it if pyplot manages it."""
        if not hasattr(fig, "savefig"):
            raise ReportError(f"figure() needs a matplotlib Figure, got {type(fig).__name__}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})  # no version stamp: deterministic bytes
        png = buf.getvalue()
        if "matplotlib.pyplot" in sys.modules:  # only pyplot-made figures need closing
            sys.modules["matplotlib.pyplot"].close(fig)
        number = len(self._figures) + 1
        width, height = _png_size(png)
        self._figures.append({"number": number, "caption": caption, "sha256": "sha256:" + hashlib.sha256(png).hexdigest(),
                              "width": width, "height": height})
        cap = f"Figure {number}" + (f": {html.escape(caption)}" if caption else "")
        alt = html.escape(caption or f"Figure {number}", quote=True)
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        self._current.parts.append(
            f'<figure id="figure-{number}">\n<img src="{uri}" alt="{alt}" width="{width}" height="{height}">\n'
            f"<figcaption>{cap}</figcaption>\n</figure>"
        )
        return self

    def number(self, key: str, value: Any, *, digits: int = 4) -> str:
        """Record a number under a dotted key (e.g. "toy.ablation.diff.mean"); return it formatted.

        Every recorded number is listed at the end of the report and in manifest.json. Recording
        a key twice with a different value is an error, so no result silently replaces another.
        """
        if not isinstance(key, str) or not _KEY.match(key):
            raise ReportError(f"number key {key!r} must be dotted words of letters, digits, '_' or '-'")
        clean = to_jsonable(value, where=key)
        if isinstance(clean, (dict, list)):
            raise ReportError(f"number {key!r} must be a scalar, got {type(value).__name__}; use numbers() for a mapping")
        if key in self.numbers and self.numbers[key] != clean:
            raise ReportError(f"number {key!r} already recorded as {self.numbers[key]!r}, refusing to replace it with {clean!r}")
        self.numbers[key] = clean
        return format_number(value, digits)

    def numbers_from(self, prefix: str, mapping: Mapping) -> dict[str, str]:
        """Record every scalar leaf of a nested mapping (e.g. ``Comparison.to_dict()``) under prefix.

        Returns dotted key -> formatted value.
        """
        out: dict[str, str] = {}

        def walk(key: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{key}.{k}", v)
            else:
                out[key] = self.number(key, value)

        walk(prefix, to_jsonable(mapping, where=prefix))
        return out

    # ------------------------------------------------------------------------------- writing

    def manifest(self) -> dict:
        """The manifest as it would be written now."""
        artifacts = {
            "figures": self._figures,
            "tables": [{"file": f"tables/{name}", "caption": cap, "rows": len(df), "columns": [str(c) for c in df.columns]}
                       for name, df, cap in self._tables],
        }
        return build_manifest(self.config, self.seeds, self.numbers, self.models, self.data,
                              extra={"title": self.title, "artifacts": artifacts})

    def render(self, manifest: Mapping | None = None) -> str:
        """The complete index.html text."""
        manifest = manifest or self.manifest()
        sections = self._sections + [self._numbers_section()]
        toc_items = "\n".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections if s.title)
        toc = (f'<nav class="toc">\n<details>\n<summary><h2>Contents</h2></summary>\n<ol>\n{toc_items}\n</ol>\n'
               f'</details>\n</nav>' if toc_items else "")   # folded: the findings stay on the first screen
        body = []
        for s in sections:
            if not s.parts and not s.title:
                continue
            head = f'<h2 id="{s.anchor}">{html.escape(s.title)}</h2>\n' if s.title else ""
            body.append(f"<section>\n{head}" + "\n".join(s.parts) + "\n</section>")
        version = manifest["versions"].get("mechsink") or "unknown"
        meta = (f"Created {html.escape(manifest['created'])} · mechsink {html.escape(version)} · "
                f"config <code>{manifest['config_sha256'][7:19]}</code> · content <code>{manifest['content_sha256'][7:19]}</code>")
        template = Template(resources.files("mechsink.report").joinpath("template.html").read_text(encoding="utf-8"))
        return template.substitute(title=html.escape(self.title), version=html.escape(version), meta=meta, toc=toc,
                                   body="\n".join(body))

    def _numbers_section(self) -> _Section:
        if not self.numbers:
            return _Section(title=None, anchor=None)
        rows = "\n".join(
            f'<tr><td>{html.escape(k)}</td><td class="num">{html.escape(format_number(v, 6))}</td></tr>'
            for k, v in sorted(self.numbers.items())
        )
        table = (f'<div class="table-wrap">\n<table class="numbers">\n<thead><tr><th>key</th><th>value</th></tr></thead>\n'
                 f"<tbody>\n{rows}\n</tbody>\n</table>\n</div>")
        return _Section(title="Recorded numbers", anchor="recorded-numbers", parts=[table])

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write index.html, manifest.json and tables/*.csv under out_dir; return index.html's path.

        Each file is written to a temporary name and moved into place, so an interrupted write
        never leaves a half-written report over a finished one.
        """
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ReportError(f"report directory {out} exists and is not a directory")
        (out / "tables").mkdir(parents=True, exist_ok=True)
        current = {name for name, _, _ in self._tables}
        for stale in (out / "tables").glob("*.csv"):        # left by an earlier write with more tables
            if stale.name not in current:
                stale.unlink()
        for name, df, _ in self._tables:
            write_text(out / "tables" / name, df.to_csv(index=not isinstance(df.index, pd.RangeIndex)))
        manifest = self.manifest()
        write_manifest(manifest, out / "manifest.json")
        index = out / "index.html"
        write_text(index, self.render(manifest))
        return index


MAX_COLUMNS = 8      # wider tables are shown in parts (the CSV keeps them whole)


def _table_html(df: pd.DataFrame, caption_html: str, digits: int) -> str:
    """HTML table with numbers right-aligned (class "num") and text left-aligned."""

    def cell(v: Any) -> str:
        numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        shown = "–" if v is None or (numeric and isinstance(v, (float, np.floating)) and math.isnan(v)) else format_number(v, digits)
        return f'<td class="num">{html.escape(shown)}</td>' if numeric else f"<td>{html.escape(shown)}</td>"

    names = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns]
    values = list(df.itertuples(index=False, name=None))
    # A wide table is split into parts of at most MAX_COLUMNS columns, each repeating the first
    # column, so that no table is wider than the page.
    n = len(names)
    groups = [list(range(n))] if n <= MAX_COLUMNS else \
        [[0, *range(i, min(n, i + MAX_COLUMNS - 1))] for i in range(1, n, MAX_COLUMNS - 1)]
    parts = []
    for k, cols in enumerate(groups):
        head = "".join(f"<th>{html.escape(names[j])}</th>" for j in cols)
        rows = "\n".join("<tr>" + "".join(cell(row[j]) for j in cols) + "</tr>" for row in values)
        cap = caption_html if len(groups) == 1 else \
            f"{caption_html} (part {k + 1} of {len(groups)}: columns {cols[1] + 1}–{cols[-1] + 1} of {n})"
        parts.append(f'<div class="table-wrap">\n<table>\n<caption>{cap}</caption>\n'
                     f"<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>\n</div>")
    return "\n".join(parts)


def _png_size(png: bytes) -> tuple[int, int]:
    """Pixel width and height from the PNG IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ReportError("figure did not render to a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
