"""A store's rows (one per cached token): the standard columns with their types and defaults,
their checks, and the compact Arrow tables a shard's rows are written as."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from mechsink.cache.layout import StoreError, _first_line


SINK_CLASSES = ("vit", "llm", "both", "none")

# Standard row columns: dtype and the value used when a writer leaves the column out.
# ``sample_idx`` and ``token_role`` have no default: every row must say which sample and role it is.
ROW_COLUMNS: dict[str, tuple[str, Any]] = {
    "sample_idx": ("int64", None),
    "sample_id": ("str", ""),
    "image_path": ("str", ""),
    "token_role": ("str", None),
    "image": ("int32", -1),
    "tile": ("int32", -1),
    "patch_row": ("int32", -1),
    "patch_col": ("int32", -1),
    "llm_pos": ("int32", -1),
    "norm": ("float32", float("nan")),
    "is_sink": ("bool", False),
    "sink_class": ("str", "none"),
}
# Written by the store itself; a writer may not pass them.
RESERVED_COLUMNS = ("row", "shard", "shard_row")


def _normalise_rows(rows: pd.DataFrame | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Standard columns in order (defaults filled), then the extra columns as given, as numpy arrays.

    ``rows``: a DataFrame, or a dict of equal-length columns (what the extractor hands over: no
    DataFrame per batch). Checks are vectorised; string columns stay object arrays (converted when
    the shard is written)."""
    if isinstance(rows, pd.DataFrame):
        if rows.columns.duplicated().any():
            raise StoreError(f"duplicate row columns {sorted(set(rows.columns[rows.columns.duplicated()]))}")
        cols = {c: rows[c].to_numpy() for c in rows.columns}
    elif isinstance(rows, Mapping):
        cols = {str(c): np.asarray(v) for c, v in rows.items()}
        if len({len(v) for v in cols.values()}) > 1:
            raise StoreError(f"row columns differ in length: { {c: len(v) for c, v in cols.items()} }")
    else:
        raise StoreError(f"rows must be a pandas DataFrame or a dict of columns, got {type(rows).__name__}")
    clash = [c for c in RESERVED_COLUMNS if c in cols]
    if clash:
        raise StoreError(f"row columns {clash} are reserved by the store (grid position is patch_row/patch_col)")
    out: dict[str, np.ndarray] = {}
    n = len(next(iter(cols.values()))) if cols else 0
    for name, (dtype, default) in ROW_COLUMNS.items():
        if name in cols:
            col = cols[name]
            if dtype == "str":
                out[name] = col.astype(object, copy=False)
                continue
            if dtype in ("int64", "int32", "bool") and col.dtype.kind in "fO" and pd.isna(col).any():
                raise StoreError(f"row column {name!r} has missing values")
            try:
                # an owned copy: a view would keep the caller's whole DataFrame block alive until the commit
                out[name] = np.array(col, dtype=dtype, copy=True)
            except (TypeError, ValueError):
                raise StoreError(f"row column {name!r} cannot be read as {dtype}") from None
        elif default is None:
            raise StoreError(f"rows lack the required column {name!r}")
        else:
            out[name] = np.full(n, default, dtype=object if dtype == "str" else dtype)
    bad = set(pd.unique(out["sink_class"])) - set(SINK_CLASSES)
    if bad:
        raise StoreError(f"sink_class must be one of {SINK_CLASSES}, got {sorted(map(str, bad))}")
    for c, v in cols.items():
        if c not in ROW_COLUMNS:
            out[c] = v
    return out


def _str_array(values: np.ndarray) -> pa.Array:
    try:
        arr = pa.array(values, type=pa.string())
        if arr.null_count == 0:
            return arr
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    return pa.array([str(v) for v in values], type=pa.string())


def _batch_table(cols: Mapping[str, np.ndarray]) -> pa.Table:
    """One batch's rows as a compact arrow table: the standard string columns dictionary-encoded
    (a sample's id and path repeat on each of its rows), the extra columns' types inferred."""
    arrays = []
    for c, v in cols.items():
        kind = ROW_COLUMNS.get(c, (None,))[0]
        if kind == "str":
            arrays.append(_str_array(v).dictionary_encode())
        elif kind is not None:
            arrays.append(pa.array(v))
        else:
            try:
                arrays.append(pa.array(v, from_pandas=True))
            except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
                raise StoreError(f"row column {c!r} mixes types that parquet cannot hold in one column: {e}") from None
    return pa.Table.from_arrays(arrays, names=list(cols))


def _plain(schema: pa.Schema) -> pa.Schema:
    """The schema with dictionary columns as their value type."""
    return pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                      for f in schema])


def _rows_table(tables: list[pa.Table]) -> pa.Table:
    """The batches' tables as one (chunked, not copied) table with plain string columns."""
    try:
        t = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        return t.cast(_plain(t.schema))
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise StoreError(f"row columns changed type between batches: {_first_line(e)}") from None
