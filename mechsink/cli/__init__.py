"""The `mechsink` command line: one Typer app. Every command parses its options, calls one library
function and prints the result (``--json`` for machines); failures are one ``error:`` line, exit 2.

    common     the app, shared options, model/data opening, one-line failures
    analyses   inspect, sinks, cache, probe, ablate, patch
    reports    demo, report, plan, selfcheck, verify
    tools      compare, registers, var, export
"""
from . import analyses, reports, tools  # noqa: F401  (each module adds its commands to the app)
from .common import app, main

__all__ = ["app", "main"]
