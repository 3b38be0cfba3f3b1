"""What every command shares: the Typer app, options, one-line failures, model and data opening."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

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

    from ..errors import MechsinkError

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
    from .. import load
    from ..report.pipeline import offline_if_hub_unreachable
    offline_if_hub_unreachable(name)
    return load(name, device=None if device_map else device, dtype=dtype, device_map=device_map)


def parse_params(items: list[str] | None) -> dict[str, float]:
    from ..errors import MechsinkError
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
    from ..sinks import SinkSpec
    return SinkSpec.from_options(rule, site=site, **parse_params(params))


def open_data(model: str, data: str | None, images: Path | None = None, limit: int | None = None):
    """The dataset a command runs on: --data, else --images (a folder), else the model's bundled set."""
    from ..data import default_data, open_dataset
    from ..errors import MechsinkError
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


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


MetricOpt = typer.Option("logprob", "--metric", help="logprob (gold answer) | logit_diff | accuracy | kl")


AnswersOpt = typer.Option(None, "--answers", help="Two answers for logit_diff/accuracy, e.g. yes,no.")


def main() -> None:  # pragma: no cover
    app()
