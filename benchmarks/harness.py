"""Timing and memory measurement shared by every section.

Times: the variants of a comparison run **interleaved** — round r runs every variant once, in an
order rotated by r — after warm-up rounds that are thrown away. A variant's figure is the median
over rounds, and a ratio is the median over rounds of the *paired* per-round ratio to the
baseline, so slow drifts of a shared machine hit numerator and denominator alike. Wall-clock
(``time.perf_counter``) and process CPU time (``time.process_time``, every thread of the process)
are both kept: on a machine shared with other jobs the CPU figure is the steadier one.

Memory: the peak resident set of a variant is read in a fresh Python process (``python -m
benchmarks.rss``) from ``/proc/self/status``: ``VmHWM`` is reset through
``/proc/self/clear_refs`` after imports, model and warm-up, so ``run_peak_mb`` is what the run
itself adds on top of the memory it started with.
"""
from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
TARGET_MODEL = "vitb-llava"     # the targets are stated for the ViT-B/16-sized model
GOAL_MODELS = (TARGET_MODEL, "twin-llava")   # the cache goal holds at real widths: also the LLaVA-1.5 twin


@dataclass
class Timing:
    """Per-round measurements of one variant (warm-up excluded)."""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu)


def compare(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
            before: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Run every variant ``warmup + repeats`` times, interleaved; return the timed rounds.

    before: called with the variant name before each (untimed) run, e.g. to empty an output folder.
    """
    names = list(variants)
    out = {n: Timing() for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if before is not None:
                before(name)
            os.sync()       # no run pays for another's pending disk writes
            gc.collect()
            w, c = time.perf_counter(), time.process_time()
            variants[name]()
            _sync()
            w, c = time.perf_counter() - w, time.process_time() - c
            if r >= warmup:
                out[name].wall.append(w)
                out[name].cpu.append(c)
    return out


def _sync() -> None:
    """Wait for queued GPU work, so that a run's time includes it."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def ratio(t: dict[str, Timing], name: str, base: str, clock: str = "wall") -> float:
    """Median over rounds of t[name] / t[base] (paired by round)."""
    a, b = getattr(t[name], clock), getattr(t[base], clock)
    return statistics.median(x / y for x, y in zip(a, b))


@dataclass
class Row:
    """One line of the results table (and one record of the JSON).

    ratio_wall / ratio_cpu: this variant's time over the baseline's (median of per-round ratios);
    a memory row holds its memory ratio in both. goal: e.g. "<= 1.05", judged on the ratio of the
    headline clock; ``peers``: variants whose ratio this one must also beat.
    """
    section: str
    model: str
    variant: str
    wall_s: float | None = None
    cpu_s: float | None = None
    ratio_wall: float | None = None
    ratio_cpu: float | None = None
    baseline: str | None = None
    goal: str | None = None
    peers: tuple[str, ...] = ()
    met: bool | None = None
    extra: dict = field(default_factory=dict)

    def ratio(self, clock: str) -> float | None:
        return self.ratio_cpu if clock == "cpu" else self.ratio_wall

    def to_dict(self) -> dict:
        return asdict(self)


def judge(rows: list[Row], clock: str) -> None:
    """Set ``met`` on every row with a goal, from the ratios of ``clock``."""
    for r in rows:
        if not r.goal:
            continue
        op, value = r.goal.split()
        x = r.ratio(clock)
        ok = x <= float(value) if op == "<=" else x >= float(value)
        for p in r.peers:
            other = [o for o in rows if (o.section, o.model, o.variant) == (r.section, r.model, p)]
            ok = ok and all(x < o.ratio(clock) for o in other)
        r.met = bool(ok)


def timing_rows(section: str, model: str, t: dict[str, Timing], base: str, **extra) -> list[Row]:
    """A Row per variant with its medians and its ratios to ``base`` (plus the spread of the
    per-round ratios: ``ratio_wall_iqr`` / ``ratio_cpu_iqr``)."""
    rows = []
    for n in t:
        spread = {f"ratio_{c}_iqr": iqr([x / y for x, y in zip(getattr(t[n], c), getattr(t[base], c))]) for c in ("wall", "cpu")}
        rows.append(Row(section, model, n, t[n].wall_s, t[n].cpu_s, ratio(t, n, base), ratio(t, n, base, "cpu"), base,
                        extra={**extra, **spread, "rounds": len(t[n].wall)}))
    return rows


def iqr(xs: list[float]) -> list[float]:
    """[25th, 75th] percentile (the spread of the per-round ratios)."""
    if len(xs) < 2:
        return [xs[0], xs[0]] if xs else []
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


# -- memory ----------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1))


def reset_peak() -> int:
    """Reset the peak-RSS mark of this process; returns the current RSS in kB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    return _status_kb("VmHWM")


def added_mb(peak_kb: int, start_kb: int) -> float:
    """What a run added to the process at its peak, in MB, never below 0: the kernel's RSS counters
    are approximate, so a run that only hands memory back (``memory.trim``) can read its peak a few
    pages under the start mark."""
    return max(0, peak_kb - start_kb) / 1024


def measure_rss(args: list[str], timeout: float = 600, device: str = "cpu") -> dict:
    """Run ``python -m benchmarks.rss *args`` in a fresh process and return its JSON report
    (``peak_mb``: whole-process peak; ``start_mb``/``run_peak_mb``: RSS before the measured run and
    what the run added at its peak; on a GPU also ``gpu_peak_mb``)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1",
           "MECHSINK_BENCH_DEVICE": device}
    p = subprocess.run([sys.executable, "-m", "benchmarks.rss", *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory run {' '.join(args)} failed: {tail}")
    return json.loads(lines[-1])


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)
