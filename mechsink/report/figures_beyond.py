"""Figures of the analyses beyond the seed paper: token-importance comparison, test-time registers,
VAR. ``mechsink.report.figures.plot`` dispatches to them; they import nothing from ``figures``."""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechsink.report.canvas import label as _label
from mechsink.report.canvas import new_figure


def compare_figure(result, title: str | None = None) -> Figure:
    """A CompareResult: each selection's ablation effect and its matched-random effect (CIs) on the
    left, the mean per-image Jaccard overlap of every pair of sets on the right."""
    t = result.table()
    sets = [*t["selection"], "random"]
    fig = Figure(figsize=(11.0, 4.2))
    FigureCanvasAgg(fig)
    ax, hx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1.0]})
    y = np.arange(len(t))
    ax.errorbar(t["effect"], y, xerr=[t["effect"] - t["effect_low"], t["effect_high"] - t["effect"]], fmt="o",
                color="#c0392b", label="selection")
    ax.scatter(t["random"], y, marker="x", color="#7f8c8d", label="matched random (mean)")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_yticks(y, [f"{s}  (p={p:.2g})" for s, p in zip(t["selection"], t["p_value"])])
    ax.invert_yaxis()
    ax.legend(frameon=False, fontsize=8)
    _label(ax, title, f"effect on {result.config.metric.name} (equal count)", None)
    jac = pd.DataFrame(index=sets[:-1], columns=sets, dtype=float)
    for _, r in t.iterrows():
        for s in sets:
            jac.loc[r["selection"], s] = r[f"J:{s}"]
    sns.heatmap(jac.astype(float), ax=hx, vmin=0, vmax=1, annot=True, fmt=".2f", cmap="Blues",
                cbar_kws={"label": "mean Jaccard per image"})
    hx.set_xticklabels(hx.get_xticklabels(), rotation=30, ha="right", fontsize=7)
    hx.set_yticklabels(hx.get_yticklabels(), fontsize=7)
    fig.tight_layout()
    return fig


def register_figure(result, title: str | None = None) -> Figure:
    """A RegisterResult: patch norms before and after the register shift (log count), with the
    sinks per image and the metric before/after in the legend."""
    s = result.summary()
    f = result.frame
    fig, ax = new_figure(6.4, 3.6)
    bins = np.linspace(0, float(np.nanmax(f[["norm_before", "norm_after"]].to_numpy())) * 1.02 + 1e-9, 50)
    ax.hist(f["norm_before"], bins=bins, alpha=0.6, color="#c0392b",
            label=f"before: {s['sinks_before']:.2g} sinks/image, {s['metric']} {s['clean']['mean']:.3g}")
    ax.hist(f["norm_after"], bins=bins, alpha=0.6, color="#2471a3",
            label=f"after: {s['sinks_after']:.2g} sinks/image, {s['metric']} {s['shifted']['mean']:.3g}")
    ax.set_yscale("log")
    ax.legend(frameon=False, fontsize=8)
    _label(ax, title or f"test-time register ({len(s['neurons'])} neuron(s))", "patch norm", "patches")
    return fig


def var_figure(result, title: str | None = None) -> Figure:
    """A VarResult: the metric clean and with VAR, with CIs."""
    s = result.summary()
    fig, ax = new_figure(3.6, 3.4)
    for x, key, colour in [(0, "clean", "#7f8c8d"), (1, "var", "#8e44ad")]:
        e = s[key]
        ax.errorbar([x], [e["mean"]], yerr=[[e["mean"] - e["ci_low"]], [e["ci_high"] - e["mean"]]], fmt="o",
                    color=colour)
    ax.set_xticks([0, 1], ["clean", f"VAR p={s['p']:g}"])
    ax.set_xlim(-0.5, 1.5)
    _label(ax, title or f"diff {s['diff']['mean']:.3g}, p={s['p_value']:.2g}", None, s["metric"])
    return fig

