"""The `mechsink` command line: one Typer app; every command takes --json."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Mechanistic interpretability of ViT attention sinks in vision-language models.")



@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what is being done.")):
    """Mechanistic interpretability of ViT attention sinks in vision-language models."""
    import logging
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def emit(payload: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    else:
        sys.stdout.write((human(payload) if human else json.dumps(payload, indent=2, default=_jsonable)) + "\n")


def _jsonable(o):
    import numpy as np
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body: every failure the user can act on becomes one line on stderr and exit
    code 2 (a MechsinkError, a missing, unwritable or full file system location, an interrupt)."""
    import errno

    from .errors import MechsinkError

    def fail(msg: str, code: int = 2):
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(code)
    try:
        return fn()
    except MechsinkError as e:
        fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except FileNotFoundError as e:
        fail(f"file not found: {e.filename or e}")
    except KeyboardInterrupt:
        fail("interrupted; finished batches are saved where --out points, and the same command resumes", 130)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        if e.errno == errno.ENOSPC:
            fail(f"no space left on the device{where}; free some space and run the same command to resume")
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fail(f"cannot write{where}: permission denied or read-only; choose another --out")
        if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
            fail(f"{e.filename or 'a path'} is a file where a folder is needed (or the reverse); choose another --out")
        fail(f"{e.strerror or str(e).strip().splitlines()[0] if str(e).strip() else e}{where}")


# -- shared options ----------------------------------------------------------------------------------
ModelOpt = typer.Option(..., "--model", "-m", help="Zoo name, save_pretrained folder or HF id.")
DataOpt = typer.Option(None, "--data", "-d", help="Dataset: bundled name, folder, JSONL/CSV, HF dataset dir, "
                       "pope:/mme:/mmstar: file. Default: the model's bundled evaluation set.")
RuleOpt = typer.Option(None, "--rule", help="Sink rule or preset: relative (default), fixed, sigma, robust_z, ratio, "
                       "topk, gap, quantile, llava-1.5.")
ParamOpt = typer.Option(None, "--param", "-p", help="Rule parameter KEY=VALUE (repeatable), e.g. -p tau=100.")
DetectSiteOpt = typer.Option(None, "--detect-site", help="Site whose token norms define sinks (default vit.out).")
LimitOpt = typer.Option(None, "--limit", "-n", help="Use only the first N samples.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...")
DtypeOpt = typer.Option(None, "--dtype", help="Model dtype: float32 | bfloat16 | float16.")
DeviceMapOpt = typer.Option(None, "--device-map", help="'auto' spreads a large model over the GPUs (accelerate).")
BatchOpt = typer.Option(8, "--batch-size", help="Images per forward.")
ErrorsOpt = typer.Option(None, "--errors", help="Write the skipped images (and why) to this JSONL.")
OutOpt = typer.Option(Path("mechsink-report"), "--out", "-o", help="Report directory (work/ in it is started afresh).")
ResumeOpt = typer.Option(False, "--resume", help="Reuse OUT/work (activation caches) of an earlier run.")


def open_model(name: str, device: str | None, dtype: str | None, device_map: str | None):
    """The one place a command loads its model."""
    from . import load
    from .report.pipeline import offline_if_hub_unreachable
    offline_if_hub_unreachable(name)
    return load(name, device=None if device_map else device, dtype=dtype, device_map=device_map)


def parse_params(items: list[str] | None) -> dict[str, float]:
    from .errors import MechsinkError
    out = {}
    for it in items or []:
        if "=" not in it:
            raise MechsinkError(f"--param expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise MechsinkError(f"--param {k.strip()} must be a number, got {v!r}") from None
    return out


def sink_rule(rule: str | None, params: list[str] | None = None, site: str | None = None):
    """The SinkSpec of --rule / --param / --detect-site."""
    from .sinks import SinkSpec
    return SinkSpec.from_options(rule, site=site, **parse_params(params))


def open_data(model: str, data: str | None, images: Path | None = None, limit: int | None = None):
    """The dataset a command runs on: --data, else --images (a folder), else the model's bundled set."""
    from .data import default_data, open_dataset
    from .errors import MechsinkError
    if data is not None and images is not None:
        raise MechsinkError("give --data or --images, not both")
    if images is not None:
        return open_dataset(images, format="folder", limit=limit)
    if data is None:
        data = default_data(Path(model).name if Path(model).is_dir() else model)
    return open_dataset(data, limit=limit)


def report_skipped(log, path: Path | None) -> None:
    """Say how many images were skipped (and where they are listed) on stderr."""
    if len(log):
        try:
            where = f"; listed in {log.write(path)}" if path is not None else "; list them with --errors FILE"
        except OSError as e:       # the result is still printed: a side file never costs the run
            where = f"; could not write {path} ({e.strerror or e}): {', '.join(r.sample_id for r in log)[:300]}"
        typer.echo(f"skipped {len(log)} image(s) that could not be read or processed{where}", err=True)


@app.command()
def inspect(model: str = ModelOpt,
            image: Optional[Path] = typer.Option(None, "--image", help="Image file (default: a built-in test image)."),
            prompt: Optional[str] = typer.Option(None, "--prompt", help="Question or full prompt with the placeholder."),
            device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
            device_map: Optional[str] = DeviceMapOpt, as_json: bool = JsonOpt):
    """Print every site (with its shape for this input) and the TokenMap."""
    def body():
        from .inspect import inspect_model
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
        from .data import ErrorLog
        from .sinks import detect_dataset
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
        from .cache.extract import extract
        from .data import ErrorLog
        from .sites import expand
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
          as_json: bool = JsonOpt):
    """Linear probes: what sinks vs non-sinks vs CLS vs mean-pooled tokens encode, at every cached site."""
    def body():
        from .probing import ProbeConfig, probe as run_probe
        config = ProbeConfig(label=label, token_sets=tuple(t for t in token_sets.split(",") if t),
                             sites=tuple(sites.split(",")) if sites else None, model=model, k=folds, seed=seed)
        res = run_probe(cache_dir, config, out=out)
        if out is not None and len(res.frame):
            from .report.figures import probe_figure
            probe_figure(res).savefig(Path(out) / "accuracy_by_layer.png", dpi=120)
        return res.to_records()
    rows = guarded(body)
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['token_set']:9s} {r['site']:32s} acc {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  "
        f"control {r['control_accuracy']:.3f}  selectivity {r['selectivity']:+.3f}" for r in rs))


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


MetricOpt = typer.Option("logprob", "--metric", help="logprob (gold answer) | logit_diff | accuracy | kl")
AnswersOpt = typer.Option(None, "--answers", help="Two answers for logit_diff/accuracy, e.g. yes,no.")


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
        from .ablation import AblationConfig, ablate as run
        from .data import ErrorLog
        from .metrics import Metric
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
        from .data import ErrorLog, open_dataset
        from .metrics import Metric
        from .patching import PatchConfig, patch_dataset
        from .sites import expand
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


@app.command()
def demo(out: Path = OutOpt, resume: bool = ResumeOpt, as_json: bool = JsonOpt):
    """The whole pipeline on the bundled toy LVLM (+ planted-llava as positive control) -> HTML report."""
    _report_run(None, out, as_json, resume=resume)


@app.command()
def report(model: Optional[str] = typer.Option(None, "--model", "-m", help="Zoo name, folder or HF id (default toy-llava)."),
           data: Optional[str] = DataOpt,
           control: Optional[str] = typer.Option(None, "--control", help="Positive control (default planted-llava; none)."),
           from_manifest: Optional[Path] = typer.Option(None, "--from", help="Re-run a manifest.json; check its numbers."),
           config: Optional[Path] = typer.Option(None, "--config", "--recipe", help="ReportConfig JSON, e.g. a recipe in "
                                                 "configs/paper/ (options given here override it)."),
           limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Questions for detection, probes, subsets, "
                                               "reorder (default 240)."),
           causal_limit: Optional[int] = typer.Option(None, "--causal-limit", help="Questions for ablation, half for "
                                                      "patching (default 96)."),
           draws: Optional[int] = typer.Option(None, "--draws", help="Random draws per question (default 16)."),
           seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every random draw (default 0)."),
           device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, device_map: Optional[str] = DeviceMapOpt,
           out: Path = OutOpt, resume: bool = ResumeOpt, as_json: bool = JsonOpt):
    """Run the report pipeline on any supported model and dataset (GPU for real models)."""
    overrides = {k: v for k, v in dict(model=model, data=data, limit=limit, causal_limit=causal_limit, draws=draws,
                                       seed=seed, device=device, dtype=dtype, device_map=device_map).items()
                 if v is not None}
    if control is not None:
        overrides["control"] = None if control.lower() == "none" else control
    _report_run(overrides, out, as_json, from_manifest=from_manifest, config_file=config, resume=resume)


def _report_run(overrides: dict | None, out: Path, as_json: bool, *, from_manifest: Path | None = None,
                config_file: Path | None = None, resume: bool = False) -> None:
    def body():
        from .report.pipeline import ReportConfig, compare_numbers, from_manifest as read_manifest, read_config, run_report
        old = None
        if from_manifest is not None:
            cfg = read_manifest(from_manifest)
            old = json.loads(Path(from_manifest).read_text()).get("numbers", {})
        elif config_file is not None:
            cfg = read_config(config_file)
        else:
            cfg = ReportConfig()
        if overrides:
            cfg = ReportConfig.from_dict({**cfg.to_dict(), **overrides})
        from .models import check_device
        check_device(cfg.device)
        index = run_report(cfg, out, resume=resume)
        manifest = json.loads((index.parent / "manifest.json").read_text())
        res = {"index": str(index), "manifest": str(index.parent / "manifest.json"),
               "numbers": manifest.get("numbers", {})}
        if old is not None:
            diffs = compare_numbers(old, res["numbers"])
            res["reproduced"] = not diffs
            res["differing"] = diffs
            if diffs:
                typer.echo(f"error: {len(diffs)} number(s) differ from {from_manifest}: {', '.join(diffs[:5])}", err=True)
        return res
    res = guarded(body)
    emit(res, as_json, lambda r: f"report: {r['index']}\nmanifest: {r['manifest']} ({len(r['numbers'])} numbers)"
         + ("" if "reproduced" not in r else f"\nreproduced: {r['reproduced']}"))
    if res.get("reproduced") is False:
        raise typer.Exit(1)


# -- planning and self-checks (twins, real models) ---------------------------------------------------
@app.command()
def plan(model: str = ModelOpt,
         n: int = typer.Option(1000, "--n", help="Samples in the dataset."),
         sites: str = typer.Option("vit.out,proj.out", "--sites", help="Comma-separated sites to cache."),
         tokens: str = typer.Option("image", "--tokens", help="Token selections, as for `mechsink cache`."),
         image_size: str = typer.Option("640x480", "--image-size", help="WIDTHxHEIGHT of the planned images."),
         prompt: Optional[str] = typer.Option(None, "--prompt", help="Question text used to count prompt tokens."),
         batch_size: int = typer.Option(8, "--batch-size", help="Images per forward."),
         dtype: str = typer.Option("bfloat16", "--dtype", help="Model dtype on the device."),
         store_dtype: str = typer.Option("float16", "--store-dtype", help="Cache dtype."),
         patterns: Optional[str] = typer.Option(None, "--patterns", help="Attention-pattern sites that will be read."),
         draws: int = typer.Option(16, "--draws", help="Random draws per sample in the report's causal sections."),
         as_json: bool = JsonOpt):
    """Tokens, bytes, disk, GPU memory and forwards of a run, from the model's structure (meta device)."""
    def body():
        from .errors import MechsinkError
        from .plan import PlanConfig, plan as make_plan
        try:
            w, h = (int(v) for v in image_size.lower().split("x"))
        except ValueError:
            raise MechsinkError(f"--image-size expects WIDTHxHEIGHT, got {image_size!r}") from None
        return make_plan(PlanConfig(model, n=n, sites=tuple(_csv(sites) or ()), tokens=tuple(_csv(tokens) or ()),
                                    image_size=(w, h), prompt=prompt, batch_size=batch_size, dtype=dtype,
                                    store_dtype=store_dtype, patterns=tuple(_csv(patterns) or ()), draws=draws))
    p = guarded(body)
    from .plan import human as plan_text
    emit(p, as_json, plan_text)


@app.command()
def selfcheck(device: Optional[str] = DeviceOpt,
              dtype: str = typer.Option("float32", "--dtype", help="dtype of the twin checks: float32 | bfloat16 | float16."),
              only: Optional[str] = typer.Option(None, "--only", help="Comma-separated check names (default: all)."),
              as_json: bool = JsonOpt):
    """Known-answer checks on this device (planted sinks, null twin, self-patching, TransformerLens, a twin
    end to end): a pass/fail table; exit code 1 when any check fails."""
    def body():
        from .selfcheck import as_dicts, selfcheck as run_checks
        return as_dicts(run_checks(device, dtype, _csv(only)))
    rows = guarded(body)

    def human(rs):
        from .selfcheck import Check, table
        return table([Check(**r) for r in rs], device)
    emit(rows, as_json, human)
    if not all(r["passed"] for r in rows):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


@app.command()
def verify(cache_dir: Path = typer.Option(..., "--cache", help="Store directory written by `mechsink cache`."),
           repair: bool = typer.Option(False, "--repair", help="Delete damaged shards (a rerun of `cache` recomputes "
                                       "them) and rebuild a damaged index."),
           as_json: bool = JsonOpt):
    """Check every file of a store against its recorded size and crc32; exit 2 if any is damaged."""
    def body():
        from .cache import verify as verify_store
        return verify_store(cache_dir, repair=repair)
    res = guarded(body)

    def human(r):
        lines = [f"store {r['store']}: {r['shards']} shard(s), {r['samples']} sample(s), {r['rows']} row(s), "
                 f"{r['bytes_checked'] / 2**20:.1f} MiB checked" + ("" if r["merged"] else ", not merged")]
        lines += [f"  damaged: {p['problem']}" for p in r["problems"]]
        lines += [f"  repaired: {a}" for a in r["repaired"]] + ([f"  next: {r['next']}"] if r["next"] else [])
        return "\n".join(lines + ([] if r["problems"] else ["ok"]))
    emit(res, as_json, human)
    if res["problems"] and not res["repaired"]:
        first = res["problems"][0]["problem"]
        typer.echo(f"error: {len(res['problems'])} damaged file(s) in {res['store']}; first: {first}", err=True)
        raise typer.Exit(2)



from . import cli_beyond  # noqa: E402  (compare, registers, var, export: registered on this app)

cli_beyond.register(app, sys.modules[__name__])
