"""Atomic file writes: a result file is either the old one or the complete new one, never half
written, so an interrupted run loses nothing it had already saved."""
from __future__ import annotations

import os
from pathlib import Path


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_parquet(path: str | os.PathLike, frame) -> Path:
    path = Path(path)
    tmp = _tmp(path)
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


class ParquetAppend:
    """A Parquet file written a row group at a time under a temporary name and moved into place
    by ``close()``: readers see no file or a whole one, never a half-written one."""

    def __init__(self, path: str | os.PathLike, schema):
        import pyarrow.parquet as pq
        self.path = Path(path)
        self._writer = pq.ParquetWriter(_tmp(self.path), schema)

    def write(self, table) -> None:
        self._writer.write_table(table)

    def close(self) -> Path:
        self._writer.close()
        os.replace(_tmp(self.path), self.path)
        return self.path
