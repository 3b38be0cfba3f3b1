"""The `mechsink` command line: one Typer app; every command takes --json."""
from __future__ import annotations

import json
import os
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
