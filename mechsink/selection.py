"""Token selections as values: which visual (or text) tokens an analysis acts on.

    sinks, nonsinks, image                 patches by their sink flag (or all of them)
    random(k=None, match=(), norm_band=None)
                                           non-sink patches drawn at random: as many as there are
                                           sinks (matched per stratum of ``match``) or ``k`` each
    fastv(layer, ratio | k)                patches the last prompt token attends to most at LLM layer
                                           ``layer`` (FastV's kept tokens)
    vit_attention(ratio | k, layer=None)   patches receiving the most attention inside the ViT (from
                                           CLS where there is one, else mean over queries; VisionZip)
    norm_topk(k | ratio)                   the k patches of largest norm (the sink score)
    cls, register                          the ViT's special tokens
    newline, text, answer                  LLM positions by role

A selection is resolved for one batch against its **sink table** (``sink_table``: the TokenMap's
patch rows with ``is_sink``, ``norm`` and optional ``foreground``) into a boolean matrix over those
rows, one row per copy (``random`` gives one copy per draw); ``TokenMap.mask`` turns that into a
mask on any site's token axis. Ranking selections (fastv, vit_attention, norm_topk) read a score column of the table
(``Selection.score_column``), added by ``mechsink.importance.score_table``; the top ``k`` (or
``ratio`` of the sample's patches, at least one) are picked per sample, ties to the lower patch
row. Special and LLM-role selections resolve to rows of the TokenMap's
``special`` / LLM tables instead (``rows``). Draws for a sample depend only on (seed, its global
sample index), never on batching.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Bool
from PIL import Image

from .config import Config
from .errors import MechsinkError
from .tokens import ROLE, TokenMap, axis_columns

RANKING_KINDS = ("fastv", "vit_attention", "norm_topk")
PATCH_KINDS = ("sinks", "nonsinks", "image", "random") + RANKING_KINDS
SPECIAL_KINDS = ("cls", "register")
LLM_KINDS = ("newline", "text", "answer")
KINDS = PATCH_KINDS + SPECIAL_KINDS + LLM_KINDS
MATCH = ("border", "row", "foreground")


class SelectionError(MechsinkError, ValueError):
    """A token selection that cannot be resolved (unknown name, too few candidates, missing columns)."""


@dataclass(frozen=True)
class Selection(Config):
    """One token selection (see the module docstring); ``str()`` gives its name."""
    kind: str = "sinks"
    k: int | None = None
    match: tuple[str, ...] = ()
    norm_band: tuple[float, float] | None = None
    layer: int | None = None
    ratio: float | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if self.kind not in KINDS:
            raise SelectionError(f"unknown token selection {self.kind!r}; selections: {', '.join(KINDS)}")
        set_("match", tuple(dict.fromkeys([self.match] if isinstance(self.match, str) else self.match)))
        bad = set(self.match) - set(MATCH)
        if bad:
            raise SelectionError(f"unknown matching key(s) {sorted(bad)}; use {', '.join(MATCH)}")
        ranking = self.kind in RANKING_KINDS
        if self.kind != "random" and (self.match or self.norm_band is not None):
            raise SelectionError(f"match and norm_band apply to random selections, not {self.kind!r}")
        if self.kind not in ("random", *RANKING_KINDS) and self.k is not None:
            raise SelectionError(f"k, match and norm_band apply to random selections (k also to ranking ones), "
                                 f"not {self.kind!r}")
        if not ranking and (self.ratio is not None or self.layer is not None):
            raise SelectionError(f"ratio and layer apply to {', '.join(RANKING_KINDS)}, not {self.kind!r}")
        if ranking and (self.k is None) == (self.ratio is None):
            raise SelectionError(f"{self.kind} needs exactly one of k (tokens) or ratio (fraction of patches)")
        if self.kind == "fastv" and self.layer is None:
            raise SelectionError("fastv needs the LLM layer whose attention ranks the tokens (fastv(layer, ratio))")
        if self.kind == "norm_topk" and self.layer is not None:
            raise SelectionError("norm_topk ranks by the sink score; it takes no layer")
        if self.layer is not None:
            set_("layer", int(self.layer))
        if self.ratio is not None:
            if not 0.0 < float(self.ratio) <= 1.0:
                raise SelectionError(f"ratio must lie in (0, 1], got {self.ratio}")
            set_("ratio", float(self.ratio))
        if self.k is not None:
            if int(self.k) < 1:
                raise SelectionError(f"{self.kind}(k) needs k >= 1, got {self.k}")
            set_("k", int(self.k))
        if self.norm_band is not None:
            lo, hi = (float(v) for v in self.norm_band)
            if not 0.0 <= lo < hi <= 1.0:
                raise SelectionError(f"norm_band must be quantiles 0 <= lo < hi <= 1, got {self.norm_band}")
            set_("norm_band", (lo, hi))

    def __str__(self) -> str:
        if self.kind in RANKING_KINDS:
            args = ([f"layer={self.layer}"] if self.layer is not None else []) + \
                ([f"k={self.k}"] if self.k is not None else [f"ratio={self.ratio:g}"])
            return f"{self.kind}({', '.join(args)})"
        if self.kind != "random" or (self.k is None and not self.match and self.norm_band is None):
            return self.kind
        args = ([f"k={self.k}"] if self.k is not None else []) + \
            ([f"match={'+'.join(self.match)}"] if self.match else []) + \
            ([f"norm_band={self.norm_band[0]:g}-{self.norm_band[1]:g}"] if self.norm_band else [])
        return f"random({', '.join(args)})"

    @property
    def on_patches(self) -> bool:
        return self.kind in PATCH_KINDS

    @property
    def needs_sinks(self) -> bool:
        return self.kind in ("sinks", "nonsinks", "random")

    @property
    def ranking(self) -> bool:
        return self.kind in RANKING_KINDS

    @property
    def score_column(self) -> str | None:
        """The sink-table column a ranking selection ranks by (``norm``, ``fastv@2``,
        ``vit_attention@last``); None for the other kinds."""
        if self.kind == "norm_topk":
            return "norm"
        if self.kind in RANKING_KINDS:
            return f"{self.kind}@{'last' if self.layer is None else self.layer}"
        return None

    @classmethod
    def parse(cls, value: "str | Selection | dict") -> "Selection":
        """A selection from its name (``"sinks"``, ``"random(k=3, match=border+row)"``) or dict."""
        if isinstance(value, Selection):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        text = str(value).strip()
        m = re.fullmatch(r"(\w+)(?:\((.*)\))?", text)
        if not m or m.group(1) not in KINDS:
            raise SelectionError(f"unknown token selection {text!r}; selections: {', '.join(KINDS)}")
        kw: dict[str, Any] = {}
        positional = {"fastv": ["layer", "ratio"], "vit_attention": ["ratio"], "norm_topk": ["k"]}.get(m.group(1), [])
        for i, part in enumerate(filter(None, (p.strip() for p in (m.group(2) or "").split(",")))):
            key, eq, val = part.partition("=")
            key = key.strip()
            if not eq and i < len(positional):
                key, val = positional[i], part
            if key in ("layer", "ratio") and m.group(1) in RANKING_KINDS:
                kw[key] = int(val) if key == "layer" else float(val)
            elif key == "k":
                kw["k"] = int(val)
            elif key == "match":
                kw["match"] = tuple(v for v in val.strip().split("+") if v)
            elif key == "norm_band":
                kw["norm_band"] = tuple(float(v) for v in val.strip().split("-"))
            else:
                raise SelectionError(f"{text!r}: unknown argument {key!r} (random takes k, match, norm_band; "
                                     f"fastv layer, ratio|k; vit_attention ratio|k, layer; norm_topk k|ratio)")
        return cls(m.group(1), **kw)


sinks = Selection("sinks")
nonsinks = Selection("nonsinks")
image = Selection("image")
cls = Selection("cls")
register = Selection("register")
newline = Selection("newline")
text = Selection("text")
answer = Selection("answer")


def random(k: int | None = None, match: Sequence[str] = (), norm_band: tuple[float, float] | None = None) -> Selection:
    """Non-sink patches at random: per sample as many as its sinks (per stratum of ``match``:
    border, row, foreground), or ``k``; ``norm_band`` (lo, hi) keeps candidates whose norm lies in
    that quantile band of the sample's non-sink norms."""
    return Selection("random", k=k, match=tuple(match), norm_band=norm_band)


def fastv(layer: int, ratio: float | None = None, k: int | None = None) -> Selection:
    """The patches the last prompt token attends to most at LLM ``layer`` (mean over heads):
    the top ``ratio`` of each sample's patches (FastV keeps these) or the top ``k``."""
    return Selection("fastv", k=k, layer=layer, ratio=ratio)


def vit_attention(ratio: float | None = None, k: int | None = None, layer: int | None = None) -> Selection:
    """The patches receiving the most attention in ViT ``layer`` (None: the last; mean over
    heads) from the CLS token, or averaged over queries when the ViT has none: VisionZip's
    dominant tokens."""
    return Selection("vit_attention", k=k, layer=layer, ratio=ratio)


def norm_topk(k: int | None = None, ratio: float | None = None) -> Selection:
    """The ``k`` patches with the largest sink score (norm) per sample."""
    return Selection("norm_topk", k=k, ratio=ratio)


def parse_all(values: "str | Selection | Sequence[str | Selection]") -> tuple[Selection, ...]:
    """Selections from a name, a comma-separated list of names or a sequence."""
    if isinstance(values, (str, Selection)):
        values = _split(values) if isinstance(values, str) else [values]
    return tuple(Selection.parse(v) for v in values)


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [s.strip() for s in [*out, cur] if s.strip()]


# -- the sink table ---------------------------------------------------------------------------------
SinkSource = Any   # SinkSpec | SinkSet | Callable[[model, batch], SinkSet | DataFrame] | Sequence[int] | None


def sink_table(model, batch, sinks: SinkSource, foreground: Callable | None = None) -> pd.DataFrame:
    """The batch's patch table with ``is_sink`` and, when known, ``norm`` and ``foreground``;
    rows in ``batch.token_map.patches`` order.

    sinks: a SinkSpec (anything with ``detect(model, batch)``: detected here, one forward), a
    SinkSet of this batch, a function (model, batch) -> SinkSet or DataFrame, or fixed patch
    indices (e.g. planted sinks). foreground: (model, batch) -> bool per patch row.
    """
    tm = batch.token_map
    if sinks is None:
        raise SelectionError("no sink rule given: pass sinks=SinkSpec() (the default rule), a SinkSet or patch indices")
    if hasattr(sinks, "detect"):
        table = sinks.detect(model, batch).patches
    elif hasattr(sinks, "patches"):
        table = sinks.patches
    elif callable(sinks):
        got = sinks(model, batch)
        table = got.patches if hasattr(got, "patches") else got
    else:
        fixed = {int(p) for p in sinks}
        table = tm.patches.assign(is_sink=tm.patches["patch"].isin(fixed))
    if not isinstance(table, pd.DataFrame) or "is_sink" not in table.columns:
        raise SelectionError("the sink source must give a patch table with an is_sink column")
    if len(table) != len(tm.patches) or not np.array_equal(table["llm_pos"].to_numpy(), tm.patches["llm_pos"].to_numpy()):
        raise SelectionError("the sink table does not match this batch's patches; detect sinks on the same batch")
    table = table.reset_index(drop=True).copy()
    if "patch" not in table.columns:
        table["patch"] = tm.patches["patch"].to_numpy()
    table["is_sink"] = table["is_sink"].astype(bool)
    if foreground is not None:
        fg = np.asarray(foreground(model, batch), dtype=bool)
        if fg.shape != (len(table),):
            raise SelectionError(f"foreground gave {fg.shape} flags for {len(table)} patches")
        table["foreground"] = fg
    return table


def contrast_foreground(threshold: float = 0.1) -> Callable:
    """A foreground flag per patch from pixels: the patch's mean luminance differs from the image's
    median patch luminance by more than ``threshold`` (fraction of the 0-255 range). Fits images of
    objects on a plain background; for any-res tiles the whole image is gridded (approximate).
    Returns (model, batch) -> bool per row of ``batch.token_map.patches``."""
    def flags(model, batch) -> np.ndarray:
        tm = batch.token_map
        out = np.zeros(len(tm.patches), dtype=bool)
        for (s, i, t), idx in tm.patches.groupby(["sample", "image", "tile"]).indices.items():
            rows, cols = tm.grids[(s, i, t)]
            lum = np.asarray(batch.images[s][i].convert("L").resize((cols, rows), Image.BOX), dtype=float)
            fg = np.abs(lum - np.median(lum)) > threshold * 255
            p = tm.patches.iloc[idx]
            out[idx] = fg[p["row"].to_numpy(), p["col"].to_numpy()]
        return out
    return flags


# -- resolving --------------------------------------------------------------------------------------
def _strata(table: pd.DataFrame, tm: TokenMap, match: Sequence[str]) -> np.ndarray:
    """One integer key per patch row: patches may only stand in for sinks with the same key."""
    keys = [np.zeros(len(table), dtype=np.int64)]
    for m in match:
        if m == "border":
            grid = np.array([tm.grids.get((s, i, t), (0, 0)) for s, i, t in
                             zip(table["sample"], table["image"], table["tile"])]).reshape(-1, 2)
            r, c = table["row"].to_numpy(), table["col"].to_numpy()
            keys.append(((r == 0) | (c == 0) | (r == grid[:, 0] - 1) | (c == grid[:, 1] - 1)).astype(np.int64))
        elif m == "row":
            keys.append(table["row"].to_numpy().astype(np.int64))
        elif m == "foreground":
            if "foreground" not in table.columns:
                raise SelectionError("matching on foreground needs a foreground flag per patch (pass foreground=...)")
            keys.append(table["foreground"].to_numpy().astype(np.int64))
    return np.unique(np.stack(keys, 1), axis=0, return_inverse=True)[1].reshape(-1)


def draw_random(table: pd.DataFrame, tm: TokenMap, n_draws: int, *, axis: str, match: Sequence[str] = (),
                norm_band: tuple[float, float] | None = None, k: int | None = None, seed: int = 0,
                sample_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sinks and random non-sink patches as selections over the patch rows.

    Returns (select [1 + n_draws, n_rows] bool: row 0 the sinks, row 1 + d draw d; valid [B] bool;
    reason [B]: why a sample is invalid, "" otherwise). Without ``k`` every draw picks, per stratum
    of ``match``, as many non-sinks as there are sinks in that stratum (a sample without sinks is
    invalid); with ``k`` it picks ``k`` non-sinks per sample. Without replacement.
    """
    pos = table[axis_columns(axis)[1]].to_numpy()
    on_axis = pos >= 0
    strata = _strata(table, tm, match)
    is_sink = table["is_sink"].to_numpy() & on_axis
    samples = table["sample"].to_numpy()
    n_samples = int(tm.roles.shape[0])
    ids = list(range(n_samples)) if sample_ids is None else list(sample_ids)
    select = np.zeros((1 + n_draws, len(table)), dtype=bool)
    select[0] = is_sink
    valid = np.ones(n_samples, dtype=bool)
    reason = [""] * n_samples
    for s in range(n_samples):
        rows = np.nonzero(samples == s)[0]
        sink_rows = rows[is_sink[rows]]
        cands = rows[on_axis[rows] & ~is_sink[rows]]
        if k is None and len(sink_rows) == 0:
            valid[s], reason[s] = False, "no sinks"
            continue
        if norm_band is not None:
            if "norm" not in table.columns:
                raise SelectionError("norm_band needs a norm column: detect sinks with a SinkSpec")
            norms = table["norm"].to_numpy()[cands]
            q = pd.Series(norms).rank(pct=True, method="average").to_numpy()
            cands = cands[(q >= norm_band[0]) & (q <= norm_band[1])]
        rng = np.random.default_rng([seed, int(ids[s])])
        needs = [(None, k)] if k is not None else \
            [(key, int((strata[sink_rows] == key).sum())) for key in np.unique(strata[sink_rows])]
        for key, need in needs:
            pool = cands if key is None else cands[strata[cands] == key]
            if len(pool) < need:
                valid[s], reason[s] = False, f"too few matched controls ({len(pool)} for {need} {'tokens' if key is None else 'sinks'})"
                break
            picks = np.argsort(rng.random((n_draws, len(pool))), axis=1)[:, :need]
            select[1 + np.repeat(np.arange(n_draws), need), pool[picks].reshape(-1)] = True
        if not valid[s]:
            select[1:, rows] = False
    return select, valid, reason


def top_rows(table: pd.DataFrame, column: str, *, axis: str = "llm", k: int | None = None,
             ratio: float | None = None, counts: Sequence[int] | None = None) -> np.ndarray:
    """Bool over ``table``'s rows: per sample the rows (with a token on ``axis``) of largest
    ``column``: ``counts[s]`` of them, or ``k``, or ``ratio`` of the sample's rows (at least one).
    Ties go to the earlier row (stable sort), so the choice is deterministic."""
    if column not in table.columns:
        raise SelectionError(f"the sink table has no {column!r} scores: add them with mechsink.importance.score_table")
    on_axis = table[axis_columns(axis)[1]].to_numpy() >= 0
    score = table[column].to_numpy().astype(float)
    samples = table["sample"].to_numpy()
    out = np.zeros(len(table), dtype=bool)
    for s in np.unique(samples):
        rows = np.nonzero((samples == s) & on_axis)[0]
        if counts is not None:
            n = int(counts[int(s)])
        elif k is not None:
            n = int(k)
        else:
            n = max(1, int(round(float(ratio) * len(rows))))
        order = np.argsort(-score[rows], kind="stable")
        out[rows[order[:min(n, len(rows))]]] = True
    return out


@dataclass
class Resolved:
    """Selections resolved for one batch: one row of ``select`` per copy (name, draw)."""
    names: list[str]
    draws: list[int]
    select: Bool[np.ndarray, "copies rows"]
    valid: Bool[np.ndarray, "batch"]
    reason: list[str]


def resolve(selections: Sequence[Selection | str], table: pd.DataFrame, tm: TokenMap, *, axis: str = "llm",
            n_draws: int = 1, seed: int = 0, sample_ids: Sequence[int] | None = None) -> Resolved:
    """Patch selections as boolean rows over ``table`` (a sink table of this batch): one copy per
    selection, ``n_draws`` copies per random selection. ``valid`` is False for a sample where a
    random selection could not be drawn (no sinks, too few candidates)."""
    sels = [Selection.parse(s) for s in selections]
    off = [s for s in sels if not s.on_patches]
    if off:
        raise SelectionError(f"{', '.join(map(str, off))} are not image patches; this analysis acts on "
                             f"{', '.join(PATCH_KINDS)}")
    b = int(tm.roles.shape[0])
    names, draws, rows = [], [], []
    valid, reason = np.ones(b, dtype=bool), [""] * b
    for sel in sels:
        if sel.kind == "random":
            picked, ok, why = draw_random(table, tm, n_draws, axis=axis, match=sel.match, norm_band=sel.norm_band,
                                          k=sel.k, seed=seed, sample_ids=sample_ids)
            for i in np.flatnonzero(~ok & valid):
                reason[i] = why[i]
            valid &= ok
            names += [str(sel)] * n_draws
            draws += list(range(n_draws))
            rows += list(picked[1:])
        elif sel.ranking:
            names.append(str(sel))
            draws.append(0)
            rows.append(top_rows(table, sel.score_column, axis=axis, k=sel.k, ratio=sel.ratio))
        else:
            is_sink = table["is_sink"].to_numpy().astype(bool) if sel.needs_sinks else None
            row = {"sinks": is_sink, "nonsinks": None if is_sink is None else ~is_sink,
                   "image": np.ones(len(table), dtype=bool)}[sel.kind]
            names.append(str(sel))
            draws.append(0)
            rows.append(row)
    return Resolved(names, draws, np.stack(rows).astype(bool), valid, reason)


def rows(selection: Selection | str, tm: TokenMap) -> pd.DataFrame:
    """Rows of the TokenMap a special or LLM-role selection picks: for cls/register the ``special``
    rows, for newline/text/answer (sample, llm_pos, role) rows; patch selections give ``patches``
    rows (``image``) — sinks need a sink table (``resolve``)."""
    sel = Selection.parse(selection)
    if sel.kind in SPECIAL_KINDS:
        return tm.special[tm.special["role"] == sel.kind].reset_index(drop=True)
    if sel.kind == "newline":
        return tm.llm_tokens[tm.llm_tokens["role"] == "newline"].reset_index(drop=True)
    if sel.kind in ("text", "answer"):
        s, pos = np.nonzero(tm.roles == ROLE[sel.kind])
        return pd.DataFrame({"sample": s, "llm_pos": pos, "role": sel.kind, "image": -1, "tile": -1, "row": -1, "col": -1})
    if sel.kind == "image":
        return tm.patches
    raise SelectionError(f"{sel} depends on the sinks: resolve it against a sink table")
