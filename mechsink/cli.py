"""The `mechsink` command line: one Typer app; every command takes --json."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
    """Run a command body; a MechsinkError becomes a one-line message and exit code 2."""
    from .errors import MechsinkError
    try:
        return fn()
    except MechsinkError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except FileNotFoundError as e:
        typer.echo(f"error: file not found: {e.filename or e}", err=True)
        raise typer.Exit(2)


@app.command()
def inspect(model: str = typer.Option(..., "--model", "-m", help="Zoo name, save_pretrained folder or HF id."),
            image: Optional[Path] = typer.Option(None, "--image", help="Image file (default: a built-in test image)."),
            prompt: Optional[str] = typer.Option(None, "--prompt", help="Question or full prompt with the placeholder."),
            as_json: bool = JsonOpt):
    """Print every site (with its shape for this input) and the TokenMap."""
    def body():
        from . import load
        from .inspect import inspect_model
        return inspect_model(load(model), image=image, prompt=prompt)
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


def parse_params(items: list[str] | None) -> dict[str, float]:
    from .errors import MechsinkError
    out = {}
    for it in items or []:
        if "=" not in it:
            raise MechsinkError(f"--param expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = float(v)
    return out


def resolve_data(model: str, data: str | None, images: Path | None = None) -> str | None:
    """The dataset a command runs on: --data, else --images, else the model's bundled set."""
    if data is not None or images is not None:
        return data
    from .data import default_data
    return default_data(Path(model).name if Path(model).is_dir() else model)


@app.command()
def sinks(model: str = ModelOpt,
          images: Optional[Path] = typer.Option(None, "--images", help="Folder of images (neutral default prompt)."),
          data: Optional[str] = DataOpt, rule: Optional[str] = RuleOpt, param: Optional[list[str]] = ParamOpt,
          site: Optional[str] = DetectSiteOpt, prompt: Optional[str] = typer.Option(None, "--prompt"),
          limit: Optional[int] = LimitOpt, batch_size: int = typer.Option(8, "--batch-size"),
          errors: Optional[Path] = typer.Option(None, "--errors", help="Write unreadable images to this JSONL."),
          device: Optional[str] = DeviceOpt, as_json: bool = JsonOpt):
    """Detect ViT sinks per image: patch, row, col, norm, LLM position."""
    def body():
        from .data import ErrorLog
        from .sinks.detect import sinks_command
        log = ErrorLog()
        recs = sinks_command(model, images_dir=images, data=resolve_data(model, data, images), rule=rule,
                             params=parse_params(param), site=site, prompt=prompt, limit=limit,
                             batch_size=batch_size, device=device, errors=log)
        if len(log):
            typer.echo(f"skipped {len(log)} unreadable image(s)" + (f"; listed in {log.write(errors)}" if errors else ""),
                       err=True)
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
          sites: str = typer.Option("vit.out,proj.out", "--sites", help="Comma-separated site names."),
          tokens: str = typer.Option("image", "--tokens", help="Token roles: image,sinks,cls,register,newline,text,answer."),
          out: Path = typer.Option(..., "--out", "-o", help="Store directory (resumed if it exists)."),
          dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 | float32"),
          batch_size: int = typer.Option(8, "--batch-size"), rule: Optional[str] = RuleOpt,
          param: Optional[list[str]] = ParamOpt, site: Optional[str] = DetectSiteOpt,
          limit: Optional[int] = LimitOpt, device: Optional[str] = DeviceOpt, as_json: bool = JsonOpt):
    """Write activations at sites x token roles to a sharded, resumable store."""
    def body():
        from .cache.extract import cache_command
        return cache_command(model, data=resolve_data(model, data, images), images_dir=images, out=out, sites=sites,
                             tokens=tokens, dtype=dtype, batch_size=batch_size, rule=rule, params=parse_params(param),
                             site=site, limit=limit, device=device, progress=True)
    res = guarded(body)
    emit(res, as_json, lambda r: f"store {r['out']} ({r['id'][:12]}): {r['summary'].get('n_rows', '?')} rows, "
                                 f"{r['errors'].get('n_skipped', 0)} image(s) skipped")


@app.command()
def probe(cache_dir: Path = typer.Option(..., "--cache", help="Store directory written by `mechsink cache`."),
          label: str = typer.Option(..., "--label", help="Label column of the store's index (e.g. planted_label)."),
          token_sets: str = typer.Option("sinks,nonsinks,cls,mean", "--token-sets"),
          sites: Optional[str] = typer.Option(None, "--sites", help="Comma-separated; default: every cached site."),
          model: str = typer.Option("logistic", "--probe", help="logistic | ridge"),
          folds: int = typer.Option(5, "--folds"), seed: int = typer.Option(0, "--seed"),
          out: Optional[Path] = typer.Option(None, "--out", help="Save probes, results and figure here."),
          as_json: bool = JsonOpt):
    """Linear probes: what sinks vs non-sinks vs CLS vs mean-pooled tokens encode, at every cached site."""
    def body():
        from .probing import probe_command
        return probe_command(cache_dir, label, token_sets=[t for t in token_sets.split(",") if t],
                             sites=sites.split(",") if sites else None, model=model, folds=folds, seed=seed, out=out)
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
           limit: Optional[int] = LimitOpt, batch_size: int = typer.Option(8, "--batch-size"),
           seed: int = typer.Option(0, "--seed"), out: Optional[Path] = typer.Option(None, "--out"),
           device: Optional[str] = DeviceOpt, as_json: bool = JsonOpt):
    """Remove sinks vs matched random tokens: paired effects, bootstrap CIs, permutation test."""
    def body():
        from .ablation import ablate_command
        return ablate_command(model, resolve_data(model, data), site=site, mode=mode, draws=draws, metric=metric,
                              answers=_csv(answers), match=_csv(match) or (),
                              layers=[int(x) for x in _csv(layers)] if layers else None, rule=rule, limit=limit,
                              batch_size=batch_size, seed=seed, out=str(out) if out else None, device=device)
    r = guarded(body)

    def human(r):
        f = lambda e: f"{e['mean']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]"  # noqa: E731
        return (f"{model}: {mode} @ {site}, metric {r.get('metric', metric)}, n={r['n']}\n"
                f"  sink effect   {f(r['sink_effect'])}\n  random effect {f(r['random_effect'])}\n"
                f"  difference    {f(r['diff'])}\n  p (sink > random) = {r['p_value']:.4g}")
    emit(r, as_json, human)


@app.command()
def patch(model: str = ModelOpt, data: Optional[str] = DataOpt,
          source: Optional[str] = typer.Option(None, "--source", help="Dataset of source images (same order)."),
          corruption: str = typer.Option("shuffle", "--corruption", help="Without --source: shuffle | noise | blank."),
          sites: str = typer.Option("proj.out", "--sites", help="Comma-separated sites, or llm.blocks.*.hook_resid_pre."),
          tokens: str = typer.Option("sinks,random,image", "--tokens", help="Token sets to patch."),
          sweep: Optional[str] = typer.Option(None, "--sweep", help="Patch every position instead: patches | all."),
          metric: str = MetricOpt, answers: Optional[str] = AnswersOpt,
          draws: int = typer.Option(8, "--draws"), rule: Optional[str] = RuleOpt, limit: Optional[int] = LimitOpt,
          batch_size: int = typer.Option(8, "--batch-size"), seed: int = typer.Option(0, "--seed"),
          out: Optional[Path] = typer.Option(None, "--out"), device: Optional[str] = DeviceOpt, as_json: bool = JsonOpt):
    """Activation patching from source into base: normalised recovery per site x token set."""
    def body():
        from .patching import patch_command
        return patch_command(model, resolve_data(model, data), source=source, corruption=corruption,
                             sites=_expand_sites(model, _csv(sites)), tokens=_csv(tokens), metric=metric,
                             answers=_csv(answers), draws=draws, sweep_positions=sweep, rule=rule, limit=limit,
                             batch_size=batch_size, seed=seed, out=str(out) if out else None, device=device)
    r = guarded(body)

    def human(r):
        lines = [f"{model}: recovery (metric {r.get('metric', metric)}, n={r.get('n')})"]
        for site, row in r["recovery"].items():
            lines.append(f"  {site:32s} " + "  ".join(f"{u}={v:.3f}" for u, v in list(row.items())[:8]))
        return "\n".join(lines)
    emit(r, as_json, human)


def _expand_sites(model: str, sites: list[str]) -> list[str]:
    """`llm.blocks.*.hook_resid_pre` -> one site per layer (needs the model's depth)."""
    if not any("*" in s for s in sites):
        return sites
    from . import load
    m = load(model)
    out = []
    for s in sites:
        if "*" in s:
            part = s.split(".")[0]
            n = m.n_vit_layers if part == "vit" else m.n_llm_layers
            out += [s.replace("*", str(l)) for l in range(n)]
        else:
            out.append(s)
    return out


@app.command()
def demo(out: Path = typer.Option(Path("mechsink-report"), "--out", "-o", help="Report directory."),
         as_json: bool = JsonOpt):
    """The whole pipeline on the bundled toy LVLM (+ planted-llava as positive control) -> HTML report."""
    _report_run(None, out, as_json)


@app.command()
def report(model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default toy-llava)."),
           data: Optional[str] = DataOpt,
           control: Optional[str] = typer.Option(None, "--control", help="Positive-control model ('none' to skip)."),
           from_manifest: Optional[Path] = typer.Option(None, "--from", help="Re-run the analysis of a manifest.json "
                                                        "and check that its numbers are reproduced."),
           config: Optional[Path] = typer.Option(None, "--config", help="JSON file of ReportConfig settings."),
           limit: Optional[int] = LimitOpt,
           causal_limit: Optional[int] = typer.Option(None, "--causal-limit", help="Samples for ablation/patching."),
           draws: Optional[int] = typer.Option(None, "--draws"), seed: Optional[int] = typer.Option(None, "--seed"),
           device: Optional[str] = DeviceOpt,
           dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype: float32 | bfloat16 | float16."),
           out: Path = typer.Option(Path("mechsink-report"), "--out", "-o"), as_json: bool = JsonOpt):
    """Run the report pipeline on any supported model and dataset (GPU for real models)."""
    overrides = {k: v for k, v in dict(model=model, data=data, limit=limit, causal_limit=causal_limit, draws=draws,
                                       seed=seed, device=device, dtype=dtype).items() if v is not None}
    if control is not None:
        overrides["control"] = None if control.lower() == "none" else control
    _report_run(overrides, out, as_json, from_manifest=from_manifest, config_file=config)


def _report_run(overrides: dict | None, out: Path, as_json: bool, *, from_manifest: Path | None = None,
                config_file: Path | None = None) -> None:
    def body():
        from .pipeline import ReportConfig, compare_numbers, from_manifest as read_manifest, run_report
        old = None
        if from_manifest is not None:
            cfg = read_manifest(from_manifest)
            old = json.loads(Path(from_manifest).read_text()).get("numbers", {})
        elif config_file is not None:
            cfg = ReportConfig.from_dict(json.loads(Path(config_file).read_text()))
        else:
            cfg = ReportConfig()
        if overrides:
            cfg = ReportConfig.from_dict({**cfg.to_dict(), **overrides})
        index = run_report(cfg, out)
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
         prompt: Optional[str] = typer.Option(None, "--prompt"),
         batch_size: int = typer.Option(8, "--batch-size"),
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
