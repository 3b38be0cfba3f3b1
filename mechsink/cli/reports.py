"""Commands over runs: demo, report, plan, selfcheck, verify."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import (
    _csv, app, DataOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, emit, guarded, JsonOpt, ModelOpt, OutOpt, ResumeOpt)


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
        from ..report.pipeline import ReportConfig, compare_numbers, from_manifest as read_manifest, read_config, run_report
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
        from ..models import check_device
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
    from ..distributed import rank
    if rank() != 0:             # under torchrun every rank ran the report; rank 0 wrote and prints it
        return
    emit(res, as_json, lambda r: f"report: {r['index']}\nmanifest: {r['manifest']} ({len(r['numbers'])} numbers)"
         + ("" if "reproduced" not in r else f"\nreproduced: {r['reproduced']}"))
    if res.get("reproduced") is False:
        raise typer.Exit(1)


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
        from ..errors import MechsinkError
        from ..plan import PlanConfig, plan as make_plan
        try:
            w, h = (int(v) for v in image_size.lower().split("x"))
        except ValueError:
            raise MechsinkError(f"--image-size expects WIDTHxHEIGHT, got {image_size!r}") from None
        return make_plan(PlanConfig(model, n=n, sites=tuple(_csv(sites) or ()), tokens=tuple(_csv(tokens) or ()),
                                    image_size=(w, h), prompt=prompt, batch_size=batch_size, dtype=dtype,
                                    store_dtype=store_dtype, patterns=tuple(_csv(patterns) or ()), draws=draws))
    p = guarded(body)
    from ..plan import human as plan_text
    emit(p, as_json, plan_text)


@app.command()
def selfcheck(device: Optional[str] = DeviceOpt,
              dtype: str = typer.Option("float32", "--dtype", help="dtype of the twin checks: float32 | bfloat16 | float16."),
              only: Optional[str] = typer.Option(None, "--only", help="Comma-separated check names (default: all)."),
              as_json: bool = JsonOpt):
    """Known-answer checks on this device (planted sinks, null twin, self-patching, TransformerLens, a twin
    end to end): a pass/fail table; exit code 1 when any check fails."""
    def body():
        from ..selfcheck import as_dicts, selfcheck as run_checks
        return as_dicts(run_checks(device, dtype, _csv(only)))
    rows = guarded(body)

    def human(rs):
        from ..selfcheck import Check, table
        return table([Check(**r) for r in rs], device)
    emit(rows, as_json, human)
    if not all(r["passed"] for r in rows):
        raise typer.Exit(1)


@app.command()
def verify(cache_dir: Path = typer.Option(..., "--cache", help="Store directory written by `mechsink cache`."),
           repair: bool = typer.Option(False, "--repair", help="Delete damaged shards (a rerun of `cache` recomputes "
                                       "them) and rebuild a damaged index."),
           as_json: bool = JsonOpt):
    """Check every file of a store against its recorded size and crc32; exit 2 if any is damaged."""
    def body():
        from ..cache import verify as verify_store
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
