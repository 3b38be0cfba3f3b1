"""Figure helpers: a tidy DataFrame in, a matplotlib Figure out.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas instead of pyplot, so they
render the same headless, never switch the backend of a notebook that imports this module, and
need no ``plt.close``. Jupyter still displays a returned Figure.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mechsink.report.canvas import label as _label
from mechsink.report.canvas import new_figure  # noqa: F401  (every figure starts here)
from mechsink.report.manifest import ReportError

# Fixed colours for the conditions analyses compare, so every figure reads the same way.
CONDITION_COLOURS = {
    "sink": "#c0392b",
    "sinks": "#c0392b",
    "random": "#7f8c8d",
    "nonsink": "#2471a3",
    "nonsinks": "#2471a3",
    "diff": "#1e8449",
    "full": "#34495e",
}


def _require(df: pd.DataFrame, columns: Sequence[str | None], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ReportError(f"{what} needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c is not None and c not in df.columns]
    if missing:
        raise ReportError(f"{what}: DataFrame lacks columns {missing}; it has {list(df.columns)}")
    if df.empty:
        raise ReportError(f"{what}: DataFrame is empty")


def _levels(df: pd.DataFrame, col: str | None, order: Sequence | None) -> list:
    if col is None:
        return [None]
    return list(order) if order is not None else list(pd.unique(df[col]))


def _colours(levels: list, palette: Mapping | Sequence | str | None) -> dict:
    if isinstance(palette, Mapping):
        return {lv: palette[lv] for lv in levels}
    if palette is None and all(str(lv).lower() in CONDITION_COLOURS for lv in levels if lv is not None):
        return {lv: CONDITION_COLOURS.get(str(lv).lower(), "#34495e") for lv in levels}
    colours = sns.color_palette(palette or "colorblind", n_colors=max(len(levels), 1))
    return dict(zip(levels, colours))


def _yerr(sub: pd.DataFrame, y: str, low: str | None, high: str | None):
    if low is None or high is None:
        return None
    return np.vstack([sub[y] - sub[low], sub[high] - sub[y]]).clip(min=0)


def _no_negative_zero(text: str) -> str:
    return text[1:] if text.startswith("-") and not any(c in "123456789" for c in text.split("e")[0]) else text


def _integer_axis(ax, values, axis: str = "x") -> None:
    """Integer ticks when the values are integers (layers, counts): no "1.5" layer."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    if len(v) and bool(np.all(np.mod(v, 1) == 0)):
        (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def effect_plot(
    df: pd.DataFrame,
    *,
    x: str = "label",
    y: str = "mean",
    hue: str | None = "condition",
    low: str | None = "ci_low",
    high: str | None = "ci_high",
    order: Sequence | None = None,
    hue_order: Sequence | None = None,
    palette: Mapping | Sequence | str | None = None,
    title: str | None = None,
    ylabel: str = "effect",
) -> Figure:
    """Point estimates with CI bars, one dodged marker per (x, hue): sink vs random effects.

    df: long format, one row per (x, hue) with columns y, low, high — e.g.
    :func:`mechsink.stats.comparison_frame`. A dashed line marks zero effect.
    """
    _require(df, [x, y, hue, low, high], "effect_plot")
    xs, hues = _levels(df, x, order), _levels(df, hue, hue_order)
    colours = _colours(hues, palette)
    fig, ax = new_figure(max(4.0, 1.2 * len(xs) + 2.5), 4.0)
    width = 0.7
    for j, h in enumerate(hues):
        sub = df if h is None else df[df[hue] == h]
        sub = sub.set_index(x).reindex(xs).dropna(subset=[y])
        pos = np.array([xs.index(v) for v in sub.index], float)
        if len(hues) > 1:
            pos += (j - (len(hues) - 1) / 2) * width / len(hues)
        ax.errorbar(pos, sub[y], yerr=_yerr(sub, y, low, high), fmt="o", ms=7, capsize=4, lw=1.6,
                    color=colours[h], label=None if h is None else str(h))
    ax.axhline(0.0, color="black", lw=0.8, ls="--", zorder=0)
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_xlim(-0.6, len(xs) - 0.4)
    if hue is not None:  # outside the axes: estimates and intervals are never hidden
        ax.legend(title=hue, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _label(ax, title, "", ylabel)
    return fig


def layer_heatmap(
    table: pd.DataFrame,
    *,
    index: str | None = None,
    columns: str | None = None,
    values: str | None = None,
    cmap: str = "viridis",
    center: float | None = None,
    annot: bool | None = None,
    fmt: str = ".2f",
    cbar_label: str | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """Heatmap of a wide table (rows x columns, e.g. layer x head); or pivot a long table.

    With index/columns/values the long DataFrame is pivoted first (duplicates are averaged).
    Cells are annotated when the grid is small enough to read (<= 16 x 16) unless annot says.
    """
    if index is not None or columns is not None or values is not None:
        _require(table, [index, columns, values], "layer_heatmap")
        table = table.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise ReportError("layer_heatmap needs a non-empty DataFrame")
    grid = table.apply(pd.to_numeric, errors="coerce")
    if annot is None:
        annot = grid.shape[0] <= 16 and grid.shape[1] <= 16
    fig, ax = new_figure(min(14.0, 1.5 + 0.55 * grid.shape[1] + 1.5), min(12.0, 1.2 + 0.4 * grid.shape[0] + 0.8))
    if annot is True:     # our own labels: no "-0.00" for values that round to zero
        annot = grid.map(lambda v: "" if pd.isna(v) else _no_negative_zero(format(v, fmt))).to_numpy()
        fmt = ""
    sns.heatmap(grid, ax=ax, cmap=cmap, center=center, annot=annot, fmt=fmt, linewidths=0.4,
                cbar_kws={"label": cbar_label} if cbar_label else None)
    _label(ax, title, xlabel, ylabel)
    return fig


def accuracy_by_layer(
    df: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "accuracy",
    hue: str | None = None,
    low: str | None = None,
    high: str | None = None,
    hue_order: Sequence | None = None,
    palette: Mapping | Sequence | str | None = None,
    chance: float | None = None,
    title: str | None = None,
    ylabel: str = "accuracy",
    xlabel: str | None = None,
) -> Figure:
    """One line per hue level (e.g. probe accuracy from sink vs non-sink tokens) across layers.

    low/high draw a shaded CI band; chance draws a dotted reference line.
    """
    _require(df, [x, y, hue, low, high], "accuracy_by_layer")
    hues = _levels(df, hue, hue_order)
    colours = _colours(hues, palette)
    fig, ax = new_figure(6.4, 4.0)
    for h in hues:
        sub = (df if h is None else df[df[hue] == h]).sort_values(x)
        ax.plot(sub[x], sub[y], marker="o", color=colours[h], label=None if h is None else str(h))
        if low is not None and high is not None:
            ax.fill_between(sub[x], sub[low], sub[high], color=colours[h], alpha=0.2, lw=0)
    _integer_axis(ax, df[x])
    if chance is not None:
        ax.axhline(chance, color="black", ls=":", lw=1, label="chance")
    if hue is not None or chance is not None:
        ax.legend(frameon=False)
    _label(ax, title, x if xlabel is None else xlabel, ylabel)
    return fig


def norm_histogram(
    norms,
    threshold: float | None = None,
    *,
    bins: int = 60,
    log_y: bool = True,
    colour: str = "#2471a3",
    title: str | None = None,
    xlabel: str = "token L2 norm",
) -> Figure:
    """Histogram of token norms with the sink threshold marked and the count above it.

    norms: any array-like of shape [...] (flattened); NaN are dropped.
    """
    values = np.asarray(norms, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ReportError("norm_histogram needs at least one finite norm")
    fig, ax = new_figure(6.4, 4.0)
    ax.hist(values, bins=bins, color=colour, alpha=0.85, log=log_y)
    if threshold is not None:
        above = int(np.count_nonzero(values >= threshold))
        ax.axvline(threshold, color=CONDITION_COLOURS["sink"], ls="--", lw=1.5,
                   label=f"threshold {threshold:g}: {above} of {values.size} above ({100 * above / values.size:.2f} %)")
        ax.legend(frameon=False)
    _label(ax, title, xlabel, "tokens")
    return fig


def binned_bar(
    df: pd.DataFrame,
    *,
    x: str = "bin",
    y: str = "value",
    hue: str | None = None,
    low: str | None = None,
    high: str | None = None,
    order: Sequence | None = None,
    hue_order: Sequence | None = None,
    palette: Mapping | Sequence | str | None = None,
    title: str | None = None,
    ylabel: str | None = None,
    xlabel: str | None = None,
) -> Figure:
    """Grouped bars of a precomputed value per bin (e.g. accuracy per question type), with CI bars.

    Intervals are taken from low/high columns, never re-estimated here.
    """
    _require(df, [x, y, hue, low, high], "binned_bar")
    xs, hues = _levels(df, x, order), _levels(df, hue, hue_order)
    colours = _colours(hues, palette)
    fig, ax = new_figure(max(4.0, 0.9 * len(xs) * max(1, len(hues)) + 2.0), 4.0)
    width = 0.8 / len(hues)
    for j, h in enumerate(hues):
        sub = (df if h is None else df[df[hue] == h]).set_index(x).reindex(xs).dropna(subset=[y])
        pos = np.array([xs.index(v) for v in sub.index], float) + (j - (len(hues) - 1) / 2) * width
        ax.bar(pos, sub[y], width=width * 0.95, color=colours[h], label=None if h is None else str(h),
               yerr=_yerr(sub, y, low, high), capsize=3, error_kw={"lw": 1.2})
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    if hue is not None:
        ax.legend(title=hue, frameon=False)
    _label(ax, title, x if xlabel is None else xlabel, y if ylabel is None else ylabel)
    return fig


# -- one entry point ---------------------------------------------------------------------------------
# Result class -> the function below that draws it (looked up at call time).
_PLOTTERS = {
    "AblationResult": "ablation_figure", "PatchResult": "patch_heatmap", "AttributionResult": "attribution_heatmap",
    "ProbeResult": "probe_figure", "RelevanceMaps": "relevance_figure", "ReorderResult": "reorder_figure",
    "SubsetResult": "subset_figure", "NormProfile": "norm_profile_figure", "SinkSet": "sink_norm_figure",
}


def plot(result, **kw) -> Figure:
    """The standard figure of any mechsink result: ``plot(ablate(model, data))`` in a notebook."""
    name = _PLOTTERS.get(type(result).__name__)
    if name is None or name not in globals():
        raise ReportError(f"no figure for a {type(result).__name__}; results with figures: {', '.join(_PLOTTERS)}")
    return globals()[name](result, **kw)


# -- sink results ------------------------------------------------------------------------------------
def norm_profile_figure(profile, title: str | None = None) -> Figure:
    """Median over images of (largest token norm / median norm) per ViT layer, the outlier line dotted."""
    t = profile.table()
    fig, ax = new_figure(6.4, 3.4)
    ax.plot(t["layer"], t["median_max_over_median"], marker="o", color="#2471a3")
    ax.axhline(profile.config.ratio if profile.config is not None else 3.0, color="#999999", ls=":", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _label(ax, title, "ViT layer", "median over images of max/median norm")
    return fig


def sink_norm_figure(sinks, title: str | None = None) -> Figure:
    """Token norms relative to their image's median at the detection site; sinks far right."""
    pat = sinks.patches
    rel = pat["norm"] / pat.groupby(["sample", "image", "tile"])["norm"].transform("median")
    spec = sinks.spec
    return norm_histogram(rel, threshold=spec.params.get("ratio") if spec.rule in ("relative", "ratio") else None,
                          title=title, xlabel="norm / median norm of the image")


# -- semantic results --------------------------------------------------------------------------------
# Probes, relevance maps, visual subsets and reordering (mechsink.probing, .analyses, .interventions).
_TOKEN_SET_COLOURS = {"sinks": CONDITION_COLOURS["sinks"], "nonsinks": CONDITION_COLOURS["nonsinks"],
                      "image": CONDITION_COLOURS["full"], "cls": "#1e8449", "mean": "#8e44ad"}


def probe_figure(result, title: str | None = None) -> Figure:
    """Probe accuracy (with CI band) by site in model order, one line per token set; chance dotted.
    result: a ProbeResult or its frame."""
    df = getattr(result, "frame", result)
    _require(df, ["token_set", "site", "depth", "accuracy", "ci_low", "ci_high", "chance", "label"], "probe_figure")
    order = [t for t in _TOKEN_SET_COLOURS if t in set(df["token_set"])]
    order += [t for t in pd.unique(df["token_set"]) if t not in order]
    label = df["label"].iloc[0]
    palette = {t: _TOKEN_SET_COLOURS.get(t, "#34495e") for t in order}
    fig = accuracy_by_layer(df, x="depth", y="accuracy", hue="token_set", low="ci_low", high="ci_high",
                            hue_order=order, palette=palette, chance=float(df["chance"].max()),
                            title=title or f"probe accuracy for {label!r}", ylabel="balanced accuracy", xlabel="site")
    ax = fig.axes[0]
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # never over the lines
    ticks = df.drop_duplicates("depth").sort_values("depth")
    ax.set_xticks(ticks["depth"].to_numpy(), ticks["site"].tolist(), rotation=30, ha="right", fontsize=8)
    return fig


def draw_map(ax, rmap: np.ndarray, image=None, *, marker: tuple[int, int] | None = None, alpha: float = 0.6,
             cmap: str = "magma") -> None:
    """Draw a [rows, cols] relevance map over ``image`` (stretched to the image; exact for square
    images the processor does not crop) on a matplotlib axes; ``marker`` = (row, col) of the token."""
    rows, cols = rmap.shape
    if image is not None:
        w, h = image.size
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, w, h, 0))
    else:
        w, h = cols, rows
    ax.imshow(rmap, extent=(0, w, h, 0), alpha=alpha if image is not None else 1.0, cmap=cmap,
              interpolation="nearest")
    if marker is not None:
        r, c = marker
        ax.scatter([(c + 0.5) * w / cols], [(r + 0.5) * h / rows], s=30, marker="x", color="cyan")
    ax.set_xticks([])
    ax.set_yticks([])


def relevance_figure(maps, images: Sequence | None = None, *, per_set: int = 3, alpha: float = 0.6,
                     names: tuple[str, str] = ("sink", "non-sink")) -> Figure:
    """Up to ``per_set`` sink maps (top row) and non-sink maps (bottom row) of a RelevanceMaps, each
    over its image. images: per sample, an image or a list of images (``batch.images``); None draws
    the maps alone. names: the two token sets' names in the panel titles (e.g. a fallback set's)."""
    f = maps.frame.reset_index(drop=True)
    if f.empty:
        raise ReportError("relevance_figure: no maps to draw")
    picks = [f.index[f["is_sink"]][:per_set], f.index[~f["is_sink"]][:per_set]]
    ncols = max(1, max(len(p) for p in picks))
    fig = Figure(figsize=(2.6 * ncols, 5.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, ncols, squeeze=False)
    for r, (label, idx) in enumerate(zip(names, picks)):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(idx):
                ax.axis("off")
                continue
            i = int(idx[c])
            row = f.loc[i]
            im = None
            if images is not None:
                im = images[int(row["sample"])]
                im = im[int(row["image"])] if isinstance(im, (list, tuple)) else im
            draw_map(ax, maps.maps[i], im, marker=(int(row["row"]), int(row["col"])), alpha=alpha)
            ax.set_title(f"{label} ({int(row['row'])},{int(row['col'])}) spread {row['spread']:.2f}", fontsize=8)
    return fig


def _renamed(df: pd.DataFrame, col: str, labels: Mapping | None) -> pd.DataFrame:
    """``df`` with the values of ``col`` renamed by ``labels`` (e.g. {"sinks": "top3_norm"} when the
    token set is a fallback, so legends never call non-sinks sinks)."""
    if not labels:
        return df
    return df.assign(**{col: df[col].map(lambda v: labels.get(v, v))})


def subset_figure(result, by: str = "question_type", title: str | None = None, labels: Mapping | None = None) -> Figure:
    """Accuracy (Wilson CIs) per ``by`` group with each visual input (image tokens, sinks only,
    non-sinks only) of a SubsetResult. labels: names to show for the subsets."""
    t = _renamed(result.table((by,)), "subset", labels)
    cfg = result.config
    order = [(labels or {}).get(s, s) for s in cfg.subsets] if cfg is not None else list(pd.unique(t["subset"]))
    colour = {(labels or {}).get(k, k): v for k, v in _TOKEN_SET_COLOURS.items()}
    return effect_plot(t, x=by, y="accuracy", hue="subset", low="ci_low", high="ci_high", hue_order=order,
                       palette={s: colour.get(s, "#34495e") for s in order}, ylabel="accuracy",
                       title=title or f"visual input ({cfg.mode if cfg is not None else ''})")


def reorder_figure(result, by: str = "question_type", title: str | None = None) -> Figure:
    """Accuracy (Wilson CIs) per ``by`` group and condition of a ReorderResult."""
    t = result.table((by,))
    return effect_plot(t, x=by, y="accuracy", hue="condition", low="ci_low", high="ci_high",
                       ylabel="accuracy", title=title or "visual-token order")


# -- causal results ----------------------------------------------------------------------------------
# Ablation, patching and attribution (mechsink.ablation, .patching, .sweep, .attribution).
def ablation_figure(result, title: str | None = None, labels: Mapping | None = None) -> Figure:
    """Sink vs random effect (and their difference) with CIs over images of an AblationResult.
    labels: names to show for the conditions (e.g. {"sink": "top3_norm"} for a fallback set)."""
    from mechsink.stats import comparison_frame
    df = _renamed(comparison_frame({result.label: result.comparison()}), "condition", labels)
    palette = {(labels or {}).get(k, k): v for k, v in CONDITION_COLOURS.items()}
    return effect_plot(df, title=title, palette={h: palette.get(h, "#34495e") for h in pd.unique(df["condition"])},
                       ylabel=f"effect on {result.config.metric.name}")


def patch_heatmap(result, values: str = "recovery", labels: Mapping | None = None, **kw) -> Figure:
    """site x unit heatmap of a PatchResult: normalised recovery, or ``values="effect"`` (the change
    of the metric). labels: names to show for the units (columns)."""
    metric = getattr(getattr(result.config, "metric", None), "name", "metric")
    label = "normalised recovery" if values == "recovery" else f"change in {metric}"
    t = result.table(values)
    if labels:
        t = t.rename(columns=lambda c: labels.get(c, c))
    return layer_heatmap(t, cbar_label=label, center=0.0 if values == "effect" else None,
                         xlabel=result.unit, ylabel="site", **kw)


def attribution_heatmap(result, values: str = "attribution", **kw) -> Figure:
    """site x unit heatmap of an AttributionResult (``values="exact"`` after ``agreement``)."""
    metric = getattr(getattr(result.config, "metric", None), "name", "metric")
    return layer_heatmap(result.table(values), center=0.0, cbar_label=f"{values} (change in {metric})",
                         xlabel=result.unit, ylabel="site", **kw)


# -- beyond the paper: drawn in figures_beyond.py (kept apart for the file-size limit) -------------
from mechsink.report.figures_beyond import compare_figure, register_figure, var_figure  # noqa: E402,F401

_PLOTTERS.update({"CompareResult": "compare_figure", "RegisterResult": "register_figure", "VarResult": "var_figure"})
