"""Commands beside the seed paper's analyses: compare, registers, var, export."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (
    _csv, AnswersOpt, app, BatchOpt, DataOpt, DeviceOpt, DtypeOpt, emit, guarded, JsonOpt, LimitOpt, MetricOpt,
    ModelOpt, open_data, open_model, ParamOpt, RuleOpt, sink_rule)


@app.command()
def export(cache_dir: Path = typer.Option(..., "--cache", help="Store directory written by `mechsink cache`."),
           out: Path = typer.Option(..., "--out", help="Directory of the Hugging Face datasets dataset."),
           sites: Optional[str] = typer.Option(None, "--sites", help="Sites to export, e.g. vit.out (default all)."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export."),
           as_json: bool = JsonOpt):
    """Export a store to a Hugging Face `datasets` dataset (datasets.load_from_disk opens --out)."""
    def body():
        from ..cache.export import export as run
        ds = run(cache_dir, out, sites=_csv(sites), overwrite=overwrite)
        return {"out": str(out), "rows": len(ds), "columns": list(ds.column_names)}
    emit(guarded(body), as_json, lambda r: f"exported {r['rows']} rows to {r['out']} ({', '.join(r['columns'])})")


def _metric(metric: str, answers: str | None):
    from ..metrics import Metric
    return Metric(metric, **({"answers": tuple(_csv(answers))} if answers else {}))


def _ci(e: dict) -> str:
    return f"{e['mean']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]"


@app.command()
def compare(model: str = ModelOpt, data: Optional[str] = DataOpt,
            selections: str = typer.Option("sinks,fastv(0, 0.5),vit_attention(0.5),norm_topk(1)", "--selections",
                                           help="Token sets compared with matched random, comma-separated."),
            k: Optional[int] = typer.Option(None, "--k", help="Tokens per set (default: the image's sink count)."),
            site: str = typer.Option("proj.out", "--site", help="Where tokens are removed."),
            mode: str = typer.Option("zero", "--mode", help="zero | mean | resample | drop | knockout"),
            draws: int = typer.Option(16, "--draws", help="Random control draws per sample."),
            metric: str = MetricOpt, answers: Optional[str] = AnswersOpt, rule: Optional[str] = RuleOpt,
            param: Optional[list[str]] = ParamOpt, limit: Optional[int] = LimitOpt, batch_size: int = BatchOpt,
            device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, as_json: bool = JsonOpt):
    """Sinks vs FastV, VisionZip and norm top-k tokens: overlap and ablation effect vs matched random."""
    def body():
        from ..analyses.compare import CompareConfig, compare_selections
        from ..selection import _split
        cfg = CompareConfig(selections=tuple(_split(selections)), k=k, site=site, mode=mode, n_draws=draws,
                            metric=_metric(metric, answers), batch_size=batch_size)
        m = open_model(model, device, dtype, None)
        res = compare_selections(m, open_data(model, data, limit=limit), cfg, sinks=sink_rule(rule, param))
        return res.summary()
    emit(guarded(body), as_json, lambda r: "\n".join(
        f"{s}: effect {_ci({'mean': v['effect'], 'ci_low': v['effect_low'], 'ci_high': v['effect_high']})}, "
        f"random {v['random']:.4f}, p={v['p_value']:.3g}, Jaccard with sinks "
        f"{v.get('J:sinks', float('nan')) if v.get('J:sinks') is not None else float('nan'):.2f}"
        for s, v in r["selections"].items()))


@app.command()
def registers(model: str = ModelOpt, data: Optional[str] = DataOpt,
              neurons: int = typer.Option(10, "--neurons", help="At most this many register neurons."),
              min_ratio: float = typer.Option(5.0, "--min-ratio", help="Outlier/other activation ratio to count."),
              metric: str = MetricOpt, answers: Optional[str] = AnswersOpt, rule: Optional[str] = RuleOpt,
              param: Optional[list[str]] = ParamOpt, limit: Optional[int] = LimitOpt, batch_size: int = BatchOpt,
              device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, as_json: bool = JsonOpt):
    """Test-time registers: find register neurons, shift them to an extra ViT token, measure before/after."""
    def body():
        from ..interventions.registers import RegisterConfig, registers as run
        cfg = RegisterConfig(n_neurons=neurons, min_ratio=min_ratio, metric=_metric(metric, answers),
                             batch_size=batch_size)
        m = open_model(model, device, dtype, None)
        return run(m, open_data(model, data, limit=limit), cfg, sinks=sink_rule(rule, param)).summary()
    emit(guarded(body), as_json, lambda r: (
        f"register neurons (layer, neuron): {r['neurons']}\n  sinks/image {r['sinks_before']:.2f} -> "
        f"{r['sinks_after']:.2f}; max norm {r['norm_before']['q1']:.1f} -> {r['norm_after']['q1']:.1f}\n"
        f"  {r['metric']} {_ci(r['clean'])} -> {_ci(r['shifted'])}, diff {_ci(r['diff'])}, p={r['p_value']:.3g}"))


@app.command()
def var(model: str = ModelOpt, data: Optional[str] = DataOpt,
        p: float = typer.Option(0.6, "--p", help="Fraction of sink attention redistributed."),
        image_threshold: float = typer.Option(0.2, "--image-threshold", help="Image attention a head row needs."),
        rho: float = typer.Option(0.5, "--rho", help="Largest sink share of that attention."),
        metric: str = MetricOpt, answers: Optional[str] = AnswersOpt, rule: Optional[str] = RuleOpt,
        param: Optional[list[str]] = ParamOpt, limit: Optional[int] = LimitOpt, batch_size: int = BatchOpt,
        device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, as_json: bool = JsonOpt):
    """VAR: redistribute a fraction p of image-centric heads' sink attention over the other image tokens."""
    def body():
        from ..interventions.var import VarConfig, var as run
        cfg = VarConfig(p=p, image_threshold=image_threshold, rho=rho, metric=_metric(metric, answers),
                        batch_size=batch_size)
        m = open_model(model, device, dtype, None)
        return run(m, open_data(model, data, limit=limit), cfg, sinks=sink_rule(rule, param)).summary()
    emit(guarded(body), as_json, lambda r: (f"{r['metric']} clean {_ci(r['clean'])} -> VAR {_ci(r['var'])}, "
                                            f"diff {_ci(r['diff'])}, p={r['p_value']:.3g}"))
