"""TokenMap: where every visual token of a batch lives, at every site.

One row per ViT patch (``patches``) says which sample/image/tile and which grid cell it is, and its
index on each token axis: the ViT sequence (``vit_item``, ``vit_pos``), the projector input
(``out_item``, ``out_pos``), the projector output (``proj_item``, ``proj_pos``) and the LLM
sequence (``llm_pos``). ``*_item`` is -1 when that axis has no batch dimension (Qwen2-VL flattens
all patches of a batch into one sequence). ``llm_pos`` is -1 for patches that never reach the LLM
(LLaVA-NeXT unpadding). Several patches share one ``llm_pos`` when the projector merges them
(Qwen2-VL's 2x2 merger). ``patch`` is the row-major index of the patch in its tile's grid
(``row * cols + col``), the number researchers call "patch 0, 14, 21".

``special`` lists ViT tokens that are not patches (CLS, registers), ``llm_tokens`` lists the LLM
positions that carry image content (role ``image`` or ``newline``) with their token-grid cell, and
``roles`` gives the role code of every LLM position.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Shaped

ROLES = ("pad", "text", "image", "newline", "answer")
ROLE = {r: i for i, r in enumerate(ROLES)}

PATCH_COLUMNS = ["sample", "image", "tile", "row", "col", "patch", "vit_item", "vit_pos", "out_item", "out_pos",
                 "proj_item", "proj_pos", "llm_pos"]
SPECIAL_COLUMNS = ["sample", "image", "tile", "role", "vit_item", "vit_pos", "out_item", "out_pos",
                   "proj_item", "proj_pos", "llm_pos"]
LLM_COLUMNS = ["sample", "llm_pos", "role", "image", "tile", "row", "col"]
AXES = ("vit", "vit_out", "proj", "llm")
_AXIS_COLUMNS = {"vit": ("vit_item", "vit_pos"), "vit_out": ("out_item", "out_pos"),
                 "proj": ("proj_item", "proj_pos"), "llm": ("sample", "llm_pos")}


def axis_columns(axis: str) -> tuple[str, str]:
    """(item column, position column) of a token axis."""
    if axis not in _AXIS_COLUMNS:
        raise KeyError(f"unknown token axis {axis!r}; axes: {', '.join(AXES)}")
    return _AXIS_COLUMNS[axis]


def patch_index(patches: pd.DataFrame, grids: dict) -> np.ndarray:
    """Row-major index of each patch in its tile's grid."""
    if len(patches) == 0:
        return np.zeros(0, dtype=np.int64)
    keys = list(zip(patches["sample"], patches["image"], patches["tile"]))
    if grids and all(k in grids for k in set(keys)):
        cols = np.array([grids[k][1] for k in keys], dtype=np.int64)
    else:
        cols = patches.groupby(["sample", "image", "tile"])["col"].transform("max").to_numpy() + 1
    return patches["row"].to_numpy() * cols + patches["col"].to_numpy()


def gather(x: Shaped[torch.Tensor, "*tok d"], axis: str, rows: pd.DataFrame) -> Shaped[torch.Tensor, "n d"]:
    """Vectors [n, d] of ``rows`` (a frame or a dict of arrays with the axis columns) from a site tensor on ``axis``,
    NaN where a row has no token there. x: [items, seq, d], or [seq, d] / [1, seq, d] for a flat
    axis (item column -1)."""
    item_col, pos_col = axis_columns(axis)
    d = x.shape[-1]
    pos = np.asarray(rows[pos_col])
    items = np.asarray(rows[item_col])
    ok = pos >= 0
    dev = lambda a: torch.tensor(a, dtype=torch.long, device=x.device)  # noqa: E731 - a copy: pandas' arrays are read-only
    if len(pos) and ok.all():       # every row has a token here (the common case): one indexing op
        if (items >= 0).all():
            return x[dev(items), dev(pos)]
        if (items < 0).all():
            return x.reshape(-1, d)[dev(pos)]
    out = torch.full((len(pos), d), float("nan"), dtype=x.dtype, device=x.device)
    if not ok.any():
        return out
    flat = ok & (items < 0)
    if flat.any():
        out[dev(np.flatnonzero(flat))] = x.reshape(-1, d)[dev(pos[flat])]
    nested = ok & (items >= 0)
    if nested.any():
        out[dev(np.flatnonzero(nested))] = x[dev(items[nested]), dev(pos[nested])]
    return out


def _frame(rows: list[dict] | dict | pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """A TokenMap table with exactly ``columns`` (int64 but ``role``), from rows (list of dicts)
    or columns (dict of arrays: the fast path layouts take, no per-row Python)."""
    if isinstance(rows, dict):
        rows = _columns(rows, columns)
        n = len(next(iter(rows.values()))) if rows else 0
        ints = [c for c in columns if c != "role"]
        block = np.full((n, len(ints)), -1, dtype=np.int64)     # one int64 block: no per-column consolidation
        for k, c in enumerate(ints):
            if rows.get(c) is not None:
                block[:, k] = rows[c]
        df = pd.DataFrame(block, columns=ints)
        if "role" in columns:
            df.insert(columns.index("role"), "role", np.asarray(rows.get("role", [None] * n), dtype=object))
        return df
    df = pd.DataFrame(rows)
    if "patch" in columns and "patch" not in df.columns:
        df["patch"] = -1                       # filled from the grids in TokenMap.__post_init__
    df = df.reindex(columns=columns)
    for c in columns:
        if c != "role" and df[c].dtype != np.int64:
            df[c] = df[c].astype("int64")
    return df.reset_index(drop=True)


def _columns(given: dict, columns: list[str]) -> dict[str, np.ndarray]:
    """A table given as columns, each as the TokenMap stores it (int64, ``role`` as objects)."""
    n = len(next(iter(given.values()))) if given else 0
    out = {}
    for c in columns:
        v = given.get(c)
        if v is None:
            out[c] = np.full(n, None, dtype=object) if c == "role" else np.full(n, -1, dtype=np.int64)
        else:
            out[c] = np.asarray(v, dtype=object if c == "role" else np.int64)
    return out


_TABLES = {"patches": PATCH_COLUMNS, "special": SPECIAL_COLUMNS, "llm_tokens": LLM_COLUMNS}


class TokenMap:
    """``patches``, ``special`` and ``llm_tokens`` (DataFrames), ``roles`` ([batch, seq] codes into
    ROLES) and ``grids`` ({(sample, image, tile): (rows, cols)}; tile -1: an any-res canvas).

    Layouts may give the tables as dicts of numpy columns: they then stay columns until a table is
    first read as a DataFrame, and ``column(table, name)`` reads them without building one (the
    activation cache reads a few columns of every batch's map and never needs the frames)."""

    def __init__(self, patches, special, llm_tokens, roles: np.ndarray,
                 grids: dict[tuple[int, int, int], tuple[int, int]] | None = None) -> None:
        self.roles = roles
        self.grids = dict(grids or {})
        self._cols: dict[str, dict[str, np.ndarray]] = {}
        self._frames: dict[str, pd.DataFrame] = {}
        for name, given in (("patches", patches), ("special", special), ("llm_tokens", llm_tokens)):
            if isinstance(given, dict) and (name != "patches" or given.get("patch") is not None):
                self._cols[name] = _columns(given, _TABLES[name])
            else:
                self._frames[name] = self._normalised(name, given)

    def _normalised(self, name: str, given) -> pd.DataFrame:
        f = _frame(given, _TABLES[name])
        if name == "patches" and len(f) and (f["patch"] < 0).any():
            f["patch"] = patch_index(f, self.grids).astype("int64")
        return f

    def _table(self, name: str) -> pd.DataFrame:
        f = self._frames.get(name)
        if f is None:
            f = self._frames[name] = _frame(self._cols.pop(name), _TABLES[name])
        return f

    def column(self, table: str, name: str) -> np.ndarray:
        """One column of ``patches``, ``special`` or ``llm_tokens`` as a numpy array."""
        cols = self._cols.get(table)
        return cols[name] if cols is not None else self._frames[table][name].to_numpy()

    def size(self, table: str) -> int:
        cols = self._cols.get(table)
        return len(next(iter(cols.values()))) if cols is not None else len(self._frames[table])

    patches = property(lambda self: self._table("patches"), lambda self, v: self._set("patches", v))
    special = property(lambda self: self._table("special"), lambda self, v: self._set("special", v))
    llm_tokens = property(lambda self: self._table("llm_tokens"), lambda self, v: self._set("llm_tokens", v))

    def _set(self, name: str, value) -> None:
        self._cols.pop(name, None)
        self._frames[name] = self._normalised(name, value)

    def __repr__(self) -> str:
        return (f"TokenMap({self.size('patches')} patches, {self.size('special')} special, "
                f"{self.size('llm_tokens')} llm tokens, roles {tuple(self.roles.shape)})")

    # -- selections -----------------------------------------------------------------------
    def index(self, axis: str, rows: pd.DataFrame) -> tuple[torch.Tensor, ...]:
        """Index tuple selecting `rows` (a subset of `patches`, `special` or `llm_tokens`) on a
        site tensor of the given axis: ``tensor[tm.index("proj", rows)]`` -> [n, d]. Rows that do
        not exist on that axis (-1) are dropped; duplicates (merged patches) are kept once."""
        item, pos = _AXIS_COLUMNS[axis]
        if pos not in rows.columns:
            raise KeyError(f"rows have no {pos!r} column (axis {axis!r})")
        rows = rows[rows[pos] >= 0]
        flat = len(rows) > 0 and bool((rows[item] < 0).all()) if item != "sample" else False
        keys = rows[[pos]] if flat else rows[[item, pos]]
        keys = keys.drop_duplicates()
        cols = [torch.tensor(keys[c].to_numpy(), dtype=torch.long) for c in keys.columns]  # copy: pandas arrays are read-only
        return tuple(cols)

    def mask(self, axis: str, select: np.ndarray, shape: Sequence[int]) -> Bool[torch.Tensor, "copies *tok"]:
        """Per copy c, the tokens on ``axis`` of the patches where ``select[c]`` is True.

        select: bool [C, n_patches] over the rows of ``patches``; shape: the site tensor's token
        shape (without the hidden dim), e.g. [items, seq]. Patches without a token there are skipped."""
        item_col, pos_col = axis_columns(axis)
        item = self.patches[item_col].to_numpy()
        pos = self.patches[pos_col].to_numpy()
        c, j = np.nonzero(np.asarray(select, dtype=bool))
        ok = pos[j] >= 0
        c, j = c[ok], j[ok]
        out = torch.zeros(len(select), *shape, dtype=torch.bool)
        as_long = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
        if len(shape) == 1:
            out[as_long(c), as_long(pos[j])] = True
        else:
            out[as_long(c), as_long(item[j]), as_long(pos[j])] = True
        return out

    def gather(self, x: Shaped[torch.Tensor, "*tok d"], axis: str, rows: pd.DataFrame) -> Shaped[torch.Tensor, "n d"]:
        """Vectors [n, d] of ``rows`` from a site tensor on ``axis`` (see ``gather``)."""
        return gather(x, axis, rows)

    def llm_positions(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Distinct (sample, llm_pos) pairs that `rows` reach in the LLM."""
        return rows.loc[rows["llm_pos"] >= 0, ["sample", "llm_pos"]].drop_duplicates().reset_index(drop=True)

    def role_mask(self, *roles: str) -> torch.Tensor:
        """Boolean [batch, seq] mask of LLM positions with any of the given roles."""
        codes = [ROLE[r] for r in roles]
        return torch.as_tensor(np.isin(self.roles, codes))

    def for_sample(self, sample: int) -> pd.DataFrame:
        return self.patches[self.patches["sample"] == sample]

    def records(self) -> list[dict]:
        """JSON-ready list over LLM image tokens (what `mechsink inspect --json` prints)."""
        out = []
        for r in self.llm_tokens.itertuples(index=False):
            out.append({"sample": int(r.sample), "llm_pos": int(r.llm_pos), "role": r.role, "image": int(r.image),
                        "tile": int(r.tile), "row": int(r.row), "col": int(r.col)})
        return out

    def grid(self, sample: int = 0, image: int = 0, tile: int = 0) -> tuple[int, int]:
        return self.grids[(sample, image, tile)]
