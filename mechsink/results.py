"""One Result protocol for every analysis: a tidy frame, the config that made it, a summary.

``save(dir)`` writes ``frame.parquet`` and ``result.json`` (kind, config, summary, extra metadata)
atomically; ``load(dir)`` reads them back into the same class. Results are data: figures are
drawn by ``mechsink.report.figures.plot(result)``, never by the result itself.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from .atomic import ParquetAppend, write_parquet, write_text
from .config import Config
from .errors import MechsinkError

FRAME = "frame.parquet"
META = "result.json"


class ResultError(MechsinkError, ValueError):
    """A saved result that cannot be read back."""


def json_safe(v: Any) -> Any:
    """NaN/inf as null, numpy scalars as Python numbers, containers recursively."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if hasattr(v, "to_dict") and not isinstance(v, pd.DataFrame):
        return json_safe(v.to_dict())
    if hasattr(v, "item") and not hasattr(v, "__len__"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class Result:
    """Base of every analysis result.

    frame: one row per independent observation (sample x condition x draw, ...).
    config: the Config that produced it. meta: anything else worth keeping (model name, notes).
    Subclasses set ``config_class`` and override ``summary()``.
    """
    frame: pd.DataFrame
    config: Config | None = None
    meta: dict = field(default_factory=dict)
    config_class: ClassVar[type | None] = None

    def summary(self) -> dict:
        """JSON-ready headline numbers (subclasses say what matters)."""
        return {"n_rows": int(len(self.frame))}

    def to_dict(self) -> dict:
        return json_safe({**self.summary(), "config": self.config.to_dict() if self.config is not None else None,
                          **{k: v for k, v in self.meta.items() if k not in ("config",)}})

    def save(self, path: str | os.PathLike, *, summary: bool = True) -> Path:
        """Write ``frame.parquet`` and ``result.json`` into a directory. ``summary=False`` skips
        the summary (a run in progress, whose statistics may not exist yet)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._save_frame(path)
        meta = {"kind": type(self).__name__, "config": self.config.to_dict() if self.config is not None else None,
                "meta": json_safe(self.meta), "partial": not summary}
        if summary:
            try:
                meta["summary"] = json_safe(self.summary())
            except MechsinkError as e:          # the frame is kept even when statistics cannot be had
                meta["error"] = str(e)
        write_text(path / META, json.dumps(meta, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike):
        path = Path(path)
        try:
            meta = json.loads((path / META).read_text())
            frame = cls._read_frame(path)
        except FileNotFoundError as e:
            raise ResultError(f"{path} holds no saved result ({Path(e.filename).name} is missing)") from None
        except (json.JSONDecodeError, OSError) as e:
            raise ResultError(f"{path}: saved result is unreadable ({e}); re-run the analysis") from None
        if meta.get("kind") not in (cls.__name__, None) and cls is not Result:
            raise ResultError(f"{path} holds a {meta.get('kind')}, not a {cls.__name__}")
        cfg = meta.get("config")
        config = cls.config_class.from_dict(cfg) if cls.config_class is not None and cfg is not None else cfg
        return cls._from_saved(frame, config, meta.get("meta") or {})

    @classmethod
    def _from_saved(cls, frame: pd.DataFrame, config, meta: dict):
        return cls(frame, config, meta)

    # how the frame is kept on disk (a result whose rows are streamed to disk keeps them its way)
    def _save_frame(self, path: Path) -> None:
        write_parquet(path / FRAME, self.frame)

    @classmethod
    def _read_frame(cls, path: Path):
        return pd.read_parquet(path / FRAME)


class RowStream:
    """A result's rows on disk as they are made (``ablate(out=...)``): batches are appended to the
    open part, ``out/<folder>/part-<first batch>.parquet``, in row groups of about ``row_group``
    rows, and the part is moved into place every ``checkpoint_s`` seconds and when the run ends or
    stops; nothing is rewritten, and a stopped run keeps every batch it finished (and its partial
    result.json, written first). ``rows`` counts what was written."""

    def __init__(self, out: Path, result: Result, folder: str, row_group: int, checkpoint_s: float):
        self.result, self.dir, self.row_group, self.checkpoint_s = result, out / folder, row_group, checkpoint_s
        shutil.rmtree(self.dir, ignore_errors=True)                 # an earlier run's rows
        self.dir.mkdir(parents=True)
        result.save(out, summary=False)
        self.part, self.held, self.opened, self.rows = None, [], 0.0, 0

    def write(self, number: int, rows) -> None:
        """Append one batch's rows (an Arrow table; ``number`` names a part it opens)."""
        if self.part is None:
            self.part, self.opened = ParquetAppend(self.dir / f"part-{number:09d}.parquet", rows.schema), time.monotonic()
        self.held.append(rows)
        self.rows += rows.num_rows
        if time.monotonic() - self.opened >= self.checkpoint_s:
            self.close()
        elif sum(t.num_rows for t in self.held) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if self.held:
            import pyarrow as pa
            self.part.write(pa.concat_tables(self.held))
            self.held = []

    def close(self) -> None:
        """Write what is held and move the part into place."""
        if self.part is not None:
            self._flush()
            self.part.close()
            self.part = None
