"""Which image tokens an analysis of :mod:`mechsink.analyses` acts on: a token selection name
(``image``, ``sinks``, ``nonsinks``; see :mod:`mechsink.selection`) or explicit rows."""
from __future__ import annotations

import pandas as pd

from ..selection import Selection, SelectionError
from .errors import AnalysisError

TOKEN_SETS = ("image", "sinks", "nonsinks")
_OLD = {"all": "image", "full": "image"}


def token_set(value) -> str:
    """The canonical name of a token set (one-line error for anything else, naming the new word
    for the old ones)."""
    if isinstance(value, str) and value.strip() in _OLD:
        raise AnalysisError(f"token set {value.strip()!r} is now called {_OLD[value.strip()]!r} (every image token)")
    try:
        name = str(Selection.parse(value))
    except SelectionError:
        name = None
    if name not in TOKEN_SETS:
        raise AnalysisError(f"unknown token set {value!r}; use {', '.join(map(repr, TOKEN_SETS))} "
                            "or rows with sample and llm_pos")
    return name


def pick(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of a table with ``is_sink`` that a token set picks."""
    if name == "image":
        return table
    return table[table["is_sink"] == (name == "sinks")]
