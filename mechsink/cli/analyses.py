"""Commands over models and caches: inspect, sinks, cache, probe, ablate, patch."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (
    _csv, AnswersOpt, app, BatchOpt, DataOpt, DetectSiteOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, emit, ErrorsOpt,
    guarded, JsonOpt, LimitOpt, MetricOpt, ModelOpt, open_data, open_model, ParamOpt, report_skipped, RuleOpt,
    sink_rule)


@app.command()
def inspect(model: str = ModelOpt,
            image: Optional[Path] = typer.Option(None, "--image", help="Image file (default: a built-in test image)."),
            prompt: Optional[str] = typer.Option(None, "--prompt", help="Question or full prompt with the placeholder."),
            device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
            device_map: Optional[str] = DeviceMapOpt, as_json: bool = JsonOpt):
    """Print every site (with its shape for this input) and the TokenMap."""
    def body():
        from ..inspect import inspect_model
        return inspect_model(open_model(model, device, dtype, device_map), image=image, prompt=prompt)
    payload = guarded(body)

    def human(p):
        lines = [f"{p['model']}  ({p['family']}: {p['vit_layers']} ViT blocks, {p['llm_layers']} LLM blocks)", "", "sites:"]
        lines += [f"  {n:40s} {tuple(p['shapes'][n])}" for n in p["sites"]]
        lines += ["", f"token map: {len(p['token_map'])} image tokens in the LLM"]
        lines += [f"  llm_pos {t['llm_pos']:4d}  image {t['image']} tile {t['tile']} row {t['row']:2d} col {t['col']:2d}  {t['role']}"
                  for t in p["token_map"][:12]]
        if len(p["token_map"]) > 12:
            lines.append(f"  ... ({len(p['token_map']) - 12} more)")
        return "\n".join(lines)
    emit(payload, as_json, human)


@app.command()
def sinks(model: str = ModelOpt,
          images: Optional[Path] = typer.Option(None, "--images", help="Folder of images (neutral default prompt)."),
          data: Optional[str] = DataOpt, rule: Optional[str] = RuleOpt, param: Optional[list[str]] = ParamOpt,
          site: Optional[str] = DetectSiteOpt,
          prompt: Optional[str] = typer.Option(None, "--prompt", help="Question for every image (default: the dataset's)."),
          limit: Optional[int] = LimitOpt, batch_size: int = BatchOpt, errors: Optional[Path] = ErrorsOpt,
          device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
          device_map: Optional[str] = DeviceMapOpt, as_json: bool = JsonOpt):
    """Detect ViT sinks per image: patch, row, col, norm, LLM position."""
    def body():
        from ..data import ErrorLog
        from ..sinks import detect_dataset
        spec = sink_rule(rule, param, site)
        ds = open_data(model, data, images, limit)
        m = open_model(model, device, dtype, device_map)
        log = ErrorLog()
        found = detect_dataset(m, ds, spec, batch_size=batch_size, prompt=prompt, errors=log, progress=not as_json)
        recs = found.to_records()
        report_skipped(log, errors)
        if not found.patches["is_sink"].any():
            typer.echo(f"no sinks under rule {spec.rule} {spec.params} at {spec.site}; the largest norm is "
                       f"{found.patches['norm'].max():.4g} (try --rule topk -p k=3, or --rule fixed -p tau=...)", err=True)
        return recs
    recs = guarded(body)

    def human(rs):
        lines = []
        for r in rs:
            where = ", ".join(f"#{s['patch']}(r{s['row']},c{s['col']}) norm {s['norm']:.1f} -> llm {s['llm_pos']}" for s in r["sinks"])
            lines.append(f"{r['image']}: {len(r['sinks'])} sink(s) {where}")
        return "\n".join(lines)
    emit(recs, as_json, human)


@app.command()
def cache(model: str = ModelOpt, data: Optional[str] = DataOpt,
          images: Optional[Path] = typer.Option(None, "--images", help="Folder of images instead of --data."),
          sites: str = typer.Option("vit.out,proj.out", "--sites", help="Comma-separated site names (* for every layer)."),
          tokens: str = typer.Option("image", "--tokens", help="Token selections: image,sinks,cls,register,newline,text,answer."),
          out: Path = typer.Option(..., "--out", "-o", help="Store directory (resumed if it exists)."),
          store_dtype: str = typer.Option("float16", "--store-dtype", help="Storage dtype: float16 | bfloat16 | float32."),
          batch_size: int = BatchOpt, rule: Optional[str] = RuleOpt,
          param: Optional[list[str]] = ParamOpt, site: Optional[str] = DetectSiteOpt,
          prompt: Optional[str] = typer.Option(None, "--prompt", help="Question for every image (default: the dataset's)."),
          limit: Optional[int] = LimitOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
          device_map: Optional[str] = DeviceMapOpt, as_json: bool = JsonOpt):
    """Write activations at sites x token selections to a sharded, resumable store."""
    def body():
        from ..cache.extract import extract
        from ..data import ErrorLog
        from ..sites import expand
        spec = sink_rule(rule, param, site)
        ds = open_data(model, data, images, limit)
        m = open_model(model, device, dtype, device_map)
        log = ErrorLog()
        store = extract(m, ds, sites=expand(_csv(sites) or [], m.n_vit_layers, m.n_llm_layers), tokens=_csv(tokens) or [],
                        out=out, store_dtype=store_dtype, batch_size=batch_size, sinks=spec, prompt=prompt,
                        errors=log, progress=not as_json)
        return {"out": str(store.path), "id": store.id, "summary": store.summary, "errors": log.summary()}
    res = guarded(body)
    emit(res, as_json, lambda r: f"store {r['out']} ({r['id'][:12]}): {r['summary'].get('n_rows', '?')} rows, "
                                 f"{r['errors'].get('n_skipped', 0)} image(s) skipped")


@app.command()
def probe(cache_dir: Path = typer.Option(..., "--cache", help="Store directory written by `mechsink cache`."),
          label: str = typer.Option(..., "--label", help="Label column of the store's index (e.g. planted_label)."),
          token_sets: str = typer.Option("sinks,nonsinks,cls,mean", "--token-sets", help="Comma-separated token sets to probe (as cached)."),
          sites: Optional[str] = typer.Option(None, "--sites", help="Comma-separated; default: every cached site."),
          model: str = typer.Option("logistic", "--probe", help="logistic | ridge"),
          folds: int = typer.Option(5, "--folds", help="Cross-validation folds."), seed: int = typer.Option(0, "--seed", help="Seed."),
          out: Optional[Path] = typer.Option(None, "--out", help="Save probes, results and figure here."),
          memory_mb: float = typer.Option(1024.0, "--memory-mb", help="Features of a (token set, site) held in "
                                          "memory up to this size; larger ones stream from the cache (same probe)."),
          as_json: bool = JsonOpt):
    """Linear probes: what sinks vs non-sinks vs CLS vs mean-pooled tokens encode, at every cached site."""
    def body():
        from ..probing import ProbeConfig, probe as run_probe
        config = ProbeConfig(label=label, token_sets=tuple(t for t in token_sets.split(",") if t),
                             sites=tuple(sites.split(",")) if sites else None, model=model, k=folds, seed=seed)
        res = run_probe(cache_dir, config, out=out, memory_mb=memory_mb)
        if out is not None and len(res.frame):
            from ..report.figures import probe_figure
            probe_figure(res).savefig(Path(out) / "accuracy_by_layer.png", dpi=120)
        return res.to_records()
    rows = guarded(body)
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['token_set']:9s} {r['site']:32s} acc {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  "
        f"control {r['control_accuracy']:.3f}  selectivity {r['selectivity']:+.3f}" for r in rs))


@app.command()
def ablate(model: str = ModelOpt, data: Optional[str] = DataOpt,
           site: str = typer.Option("proj.out", "--site", help="Where tokens are removed."),
           mode: str = typer.Option("zero", "--mode", help="zero | mean | resample | drop | knockout"),
           draws: int = typer.Option(32, "--draws", help="Random control draws per sample."),
           match: Optional[str] = typer.Option(None, "--match", help="Also match controls on: border,row,foreground."),
           layers: Optional[str] = typer.Option(None, "--layers", help="LLM layers for knockout, e.g. 0,1,2."),
           metric: str = MetricOpt, answers: Optional[str] = AnswersOpt, rule: Optional[str] = RuleOpt,
           param: Optional[list[str]] = ParamOpt, limit: Optional[int] = LimitOpt, batch_size: int = BatchOpt,
           seed: int = typer.Option(0, "--seed", help="Seed of the random control draws."),
           out: Optional[Path] = typer.Option(None, "--out", help="Save the results (and errors.jsonl) here."),
           errors: Optional[Path] = ErrorsOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
           device_map: Optional[str] = DeviceMapOpt, as_json: bool = JsonOpt):
    """Remove sinks vs matched random tokens: paired effects, bootstrap CIs, permutation test."""
    def body():
        from ..ablation import AblationConfig, ablate as run
        from ..data import ErrorLog
        from ..metrics import Metric
        cfg = AblationConfig(site=site, mode=mode, n_draws=draws, match=tuple(_csv(match) or ()),
                             metric=Metric(metric, **({"answers": tuple(_csv(answers))} if answers else {})),
                             layers=tuple(int(x) for x in _csv(layers)) if layers else None, seed=seed,
                             batch_size=batch_size)
        spec = sink_rule(rule, param)
        ds = open_data(model, data, limit=limit)
        m = open_model(model, device, dtype, device_map)
        log = ErrorLog()
        res = run(m, ds, cfg, sinks=spec, errors=log, out=out, progress=not as_json)
        if out is not None:
            log.write(out)
        report_skipped(log, errors)
        return {**res.to_dict(), "data": getattr(ds, "name", None), "n_unreadable": len(log)}
    r = guarded(body)

    def human(r):
        f = lambda e: f"{e['mean']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]"  # noqa: E731
        return (f"{model}: {mode} @ {site}, metric {r.get('metric', metric)}, {r['n_images']} images ({r['n_questions']} q.)\n"
                f"  sink effect   {f(r['sink_effect'])}\n  random effect {f(r['random_effect'])}\n"
                f"  difference    {f(r['diff'])}\n  p (sink > random) = {r['p_value']:.4g}")
    emit(r, as_json, human)


@app.command()
def patch(model: str = ModelOpt, data: Optional[str] = DataOpt,
          source: Optional[str] = typer.Option(None, "--source", help="Dataset of source images (same order)."),
          corruption: str = typer.Option("shuffle", "--corruption", help="Without --source: shuffle | noise | blank."),
          sites: str = typer.Option("proj.out", "--sites", help="Comma-separated sites, or llm.blocks.*.hook_resid_pre."),
          tokens: str = typer.Option("sinks,random,image", "--tokens",
                                     help="Token selections to patch: sinks, nonsinks, image, random, random(match=border)."),
          sweep: Optional[str] = typer.Option(None, "--sweep", help="Patch every position instead: patches | all."),
          metric: str = MetricOpt, answers: Optional[str] = AnswersOpt,
          draws: int = typer.Option(8, "--draws", help="Random draws per question."), rule: Optional[str] = RuleOpt,
          param: Optional[list[str]] = ParamOpt, limit: Optional[int] = LimitOpt, batch_size: int = BatchOpt,
          seed: int = typer.Option(0, "--seed", help="Seed of the random draws and the image shuffle."),
          out: Optional[Path] = typer.Option(None, "--out", help="Save the results (and errors.jsonl) here."),
          errors: Optional[Path] = ErrorsOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
          device_map: Optional[str] = DeviceMapOpt, as_json: bool = JsonOpt):
    """Activation patching from source into base: normalised recovery per site x token set."""
    def body():
        from ..data import ErrorLog, open_dataset
        from ..metrics import Metric
        from ..patching import PatchConfig, patch_dataset
        from ..sites import expand
        spec = sink_rule(rule, param)
        ds = open_data(model, data, limit=limit)
        src = open_dataset(source, limit=limit) if source is not None else None
        m = open_model(model, device, dtype, device_map)
        cfg = PatchConfig(sites=tuple(expand(_csv(sites) or [], m.n_vit_layers, m.n_llm_layers)), selections=tokens,
                          positions=sweep, n_draws=draws, seed=seed, batch_size=batch_size,
                          metric=Metric(metric, **({"answers": tuple(_csv(answers))} if answers else {})))
        log = ErrorLog()
        res = patch_dataset(m, ds, cfg, source=src, corruption=corruption, sinks=spec, errors=log, out=out,
                            progress=not as_json)
        if out is not None:
            log.write(out)
        report_skipped(log, errors)
        return {**res.to_dict(), "source": source or corruption, "data": getattr(ds, "name", None),
                "n_unreadable": len(log)}
    r = guarded(body)

    def human(r):
        lines = [f"{model}: recovery (metric {r.get('metric', metric)}, {r.get('n_images')} images, {r.get('n_questions')} q.)"]
        for site, row in r["recovery"].items():
            lines.append(f"  {site:32s} " + "  ".join(f"{u}={v:.3f}" for u, v in list(row.items())[:8]))
        return "\n".join(lines)
    emit(r, as_json, human)
