"""Test-time registers (Jiang et al., "Vision Transformers Don't Need Trained Registers", arXiv
2506.08010): find the MLP neurons that make the high-norm outliers, then move their activation to
an extra token appended to the ViT sequence.

    neurons = register_neurons(model, dataset, RegisterConfig())     # ranked (layer, neuron) frame
    res = registers(model, dataset, RegisterConfig(), sinks=SinkSpec())
    res.summary()     # sinks per image before/after, norm quantiles before/after, metric with CIs

**Search.** Outlier positions are the sinks of the rule ``sinks=`` (default SinkSpec(): norm of the
features the projector reads). For every ViT layer and MLP neuron (``vit.blocks.{l}.mlp.hook_post``)
the mean activation at outlier positions is compared with the mean absolute activation at the other
patches; neurons are ranked by the outlier mean (as in the paper), and a neuron counts as a
register neuron when its outlier mean is positive and at least ``min_ratio`` times the rest
(at most ``n_neurons`` of them).

**Shift.** One zero token is appended to the ViT sequence (``trace.extra_tokens``). At every
register neuron the extra token gets the neuron's maximum over the sequence and every other token
gets zero; the extra token is dropped before the projector. The result compares, per image, the
sinks found by the same rule, the patch norms, and the LVLM's metric before and after
(``stats.compare_paired`` over images, two-sided).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ..batching import batches
from ..config import Config, coerce
from ..engine import clean
from ..errors import MechsinkError
from ..metrics import Metric
from ..results import Result
from ..selection import SinkSource, sink_table
from ..stats import compare_paired, image_keys
from ..trace import capture, extra_tokens


class RegisterError(MechsinkError, ValueError):
    """No outliers to search from, or bad settings."""


@dataclass(frozen=True)
class RegisterConfig(Config):
    """layers: ViT layers searched (None: all); n_neurons: at most this many register neurons;
    min_ratio: outlier mean / mean |activation| elsewhere needed to count."""
    layers: tuple[int, ...] | None = None
    n_neurons: int = 10
    min_ratio: float = 5.0
    metric: Metric = field(default_factory=Metric)
    batch_size: int = 8
    n_boot: int = 2000
    n_perm: int = 10000
    alpha: float = 0.05
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "metric", Metric.coerce(self.metric))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        if self.n_neurons < 1 or self.min_ratio < 0:
            raise RegisterError("n_neurons must be >= 1 and min_ratio >= 0")


def _default_sinks(sinks):
    if sinks is None:
        from ..sinks.detect import SinkSpec
        return SinkSpec()
    return sinks


def _sites(model, cfg: RegisterConfig) -> list[str]:
    layers = range(model.n_vit_layers) if cfg.layers is None else cfg.layers
    return [f"vit.blocks.{l}.mlp.hook_post" for l in layers]


def register_neurons(model, data, config: RegisterConfig | dict | None = None, *, sinks: SinkSource = None,
                     errors=None) -> pd.DataFrame:
    """Every searched neuron ranked: columns rank, layer, neuron, outlier_mean, other_mean (mean
    |activation| at non-outlier patches), ratio, register (bool). Raises if no image has outliers."""
    cfg = coerce(RegisterConfig, config)
    sinks = _default_sinks(sinks)
    sites = _sites(model, cfg)
    sum_out: dict[str, torch.Tensor] = {}
    sum_rest: dict[str, torch.Tensor] = {}
    n_out = n_rest = 0
    for chunk in batches(model, data, cfg.batch_size, errors=errors):
        b = chunk.batch
        t = sink_table(model, b, sinks)
        t = t[t["vit_pos"] >= 0]
        item, pos = torch.tensor(t["vit_item"].to_numpy()), torch.tensor(t["vit_pos"].to_numpy())
        flag = torch.tensor(t["is_sink"].to_numpy())
        acts = capture(model, b.inputs, sites, lambda s, x: x.detach().float()[item, pos].cpu())
        for s in sites:
            a = acts[s]
            sum_out[s] = sum_out.get(s, 0) + a[flag].sum(0)
            sum_rest[s] = sum_rest.get(s, 0) + a[~flag].abs().sum(0)
        n_out += int(flag.sum())
        n_rest += int((~flag).sum())
    if n_out == 0:
        raise RegisterError("no outliers (sinks) in the data: nothing to find register neurons from")
    rows = []
    for s in sites:
        layer = int(s.split(".")[2])
        o = (sum_out[s] / n_out).numpy()
        r = (sum_rest[s] / max(n_rest, 1)).numpy()
        for j in range(len(o)):
            rows.append((layer, j, float(o[j]), float(r[j])))
    f = pd.DataFrame(rows, columns=["layer", "neuron", "outlier_mean", "other_mean"])
    f["ratio"] = f["outlier_mean"] / f["other_mean"].clip(lower=1e-12)
    f = f.sort_values(["outlier_mean", "layer", "neuron"], ascending=[False, True, True], kind="stable")
    f = f.reset_index(drop=True)
    f.insert(0, "rank", np.arange(len(f)))
    ok = (f["outlier_mean"] > 0) & (f["ratio"] >= cfg.min_ratio)
    f["register"] = ok & (ok.cumsum() <= cfg.n_neurons)
    return f


def shift_edits(neurons: pd.DataFrame) -> dict:
    """{mlp.hook_post site: edit} moving each neuron's activation to the last (extra) token: the
    extra token gets the neuron's max over the sequence, every other token zero."""
    edits = {}
    for layer, g in neurons.groupby("layer"):
        idx = torch.tensor(g["neuron"].to_numpy())

        def edit(x, idx=idx):
            x = x.clone()
            peak = x[..., idx].amax(dim=-2)                   # [items, n]
            x[..., idx] = 0
            x[..., -1, idx] = peak.to(x.dtype)
            return x
        edits[f"vit.blocks.{int(layer)}.mlp.hook_post"] = edit
    return edits


@dataclass
class RegisterResult(Result):
    """``frame``: one row per patch: sample, id, image_key, patch, norm_before, norm_after,
    sink_before, sink_after, clean and shifted (the sample's metric; repeated over its patches).
    ``meta["neurons"]``: the register neurons as [layer, neuron] pairs."""
    config_class: ClassVar[type | None] = RegisterConfig

    def per_sample(self) -> pd.DataFrame:
        g = self.frame.groupby("sample", sort=True)
        out = g.agg(image_key=("image_key", "first"), clean=("clean", "first"), shifted=("shifted", "first"),
                    sinks_before=("sink_before", "sum"), sinks_after=("sink_after", "sum"),
                    max_norm_before=("norm_before", "max"), max_norm_after=("norm_after", "max"))
        return out.reset_index()

    def comparison(self, **kw):
        s = self.per_sample()
        c = self.config
        args = dict(n_boot=c.n_boot, n_perm=c.n_perm, alpha=c.alpha, alternative="two-sided", seed=c.seed,
                    units=s["image_key"].astype(str).to_numpy())
        return compare_paired(s["shifted"].to_numpy(), s["clean"].to_numpy(), **{**args, **kw})

    def summary(self) -> dict:
        s = self.per_sample()
        d = self.comparison().to_dict()
        q = [0.5, 0.9, 0.99, 1.0]
        f = self.frame
        return {"metric": self.config.metric.name, "neurons": self.meta.get("neurons", []),
                "sinks_before": float(s["sinks_before"].mean()), "sinks_after": float(s["sinks_after"].mean()),
                "norm_before": {f"q{k:g}": float(f["norm_before"].quantile(k)) for k in q},
                "norm_after": {f"q{k:g}": float(f["norm_after"].quantile(k)) for k in q},
                "clean": d["random"], "shifted": d["sink"], "diff": d["diff"], "p_value": d["p_value"], "n": d["n"]}


def registers(model, data, config: RegisterConfig | dict | None = None, *, sinks: SinkSource = None,
              neurons: pd.DataFrame | None = None, errors=None) -> RegisterResult:
    """Find register neurons (unless ``neurons`` is given: a frame with layer, neuron and, if
    present, a ``register`` flag), shift them to an extra token, and measure before/after."""
    cfg = coerce(RegisterConfig, config)
    sinks = _default_sinks(sinks)
    if neurons is None:
        neurons = register_neurons(model, data, cfg, sinks=sinks, errors=errors)
    chosen = neurons[neurons["register"]] if "register" in neurons else neurons
    if chosen.empty:
        raise RegisterError("no register neurons: nothing to shift (lower min_ratio?)")
    edits = shift_edits(chosen)
    frames = []
    for chunk in batches(model, data, cfg.batch_size, errors=errors):
        b = chunk.batch
        before = sink_table(model, b, sinks)
        base = clean(model, b, cfg.metric)["value"]
        with extra_tokens(model, 1, edits):
            after = sink_table(model, b, sinks)
            shifted = clean(model, b, cfg.metric)["value"]
        keys = image_keys(b.images)
        smp = before["sample"].to_numpy()
        base, shifted = np.asarray(base, dtype=float), np.asarray(shifted, dtype=float)
        frames.append(pd.DataFrame({
            "sample": np.asarray(chunk.indices)[smp], "id": np.asarray([str(i) for i in chunk.ids])[smp],
            "image_key": np.asarray(keys)[smp], "patch": before["patch"].to_numpy(),
            "norm_before": before["norm"].to_numpy() if "norm" in before else np.nan,
            "norm_after": after["norm"].to_numpy() if "norm" in after else np.nan,
            "sink_before": before["is_sink"].to_numpy(), "sink_after": after["is_sink"].to_numpy(),
            "clean": base[smp], "shifted": shifted[smp]}))
    if not frames:
        raise RegisterError("no data")
    pairs = [[int(l), int(n)] for l, n in zip(chosen["layer"], chosen["neuron"])]
    return RegisterResult(pd.concat(frames, ignore_index=True), cfg, {"model": getattr(model, "name", ""),
                                                                       "neurons": pairs})


__all__ = ["RegisterConfig", "RegisterError", "RegisterResult", "register_neurons", "registers", "shift_edits"]
