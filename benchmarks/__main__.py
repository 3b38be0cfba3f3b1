"""``python -m benchmarks [--device cpu|cuda] [--quick] [--json out.json]``: run the sections,
print the table, write the JSON (see benchmarks/README.md)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("cache", "streaming", "sweep", "ablation", "projection")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny-llava only, fewer rounds (about 2 minutes)")
    p.add_argument("--json", type=Path, help="write every row and the run's settings here")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--models", help="comma-separated (default: tiny-llava with --quick, else tiny-llava,vitb-llava,twin-llava)")
    p.add_argument("--repeats", type=int, help="timed rounds per comparison (default 3 quick, 4 full)")
    p.add_argument("--draws", type=int, default=32, help="random draws in the ablation section")
    p.add_argument("--stream-images", help="N,10N images of the streaming section (default 40,400 quick, 200,2000 full)")
    p.add_argument("--twin-stream-images", default="20,200",
                   help="N,10N images of the twin (cut depth) in the streaming section (default 20,200)")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="clock the targets are judged on; auto: CPU time when the machine is busy with other work")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-memory runs of the cache section")
    p.add_argument("--tl-all", action="store_true", help="also time TransformerLens run_with_cache of every hook point")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    a.models = [m.strip() for m in (a.models or ("tiny-llava" if a.quick else "tiny-llava,vitb-llava,twin-llava")).split(",")]
    a.repeats = a.repeats or (3 if a.quick else 4)
    try:
        a.stream_images = tuple(int(x) for x in (a.stream_images or ("40,400" if a.quick else "200,2000")).split(","))
        assert len(a.stream_images) == 2 and 0 < a.stream_images[0] < a.stream_images[1]
        a.twin_stream_images = tuple(int(x) for x in a.twin_stream_images.split(","))
        assert len(a.twin_stream_images) == 2 and 0 < a.twin_stream_images[0] < a.twin_stream_images[1]
    except (ValueError, AssertionError):
        p.error("--stream-images / --twin-stream-images take two increasing counts, e.g. 200,2000")
    return a


def choose_clock(requested: str, load: float) -> tuple[str, str]:
    if requested != "auto":
        return requested, "asked for"
    cores = os.cpu_count() or 1
    if load > 0.75 * cores:
        return "cpu", f"load average {load:.1f} on {cores} CPUs: wall-clock times are mostly other jobs' waits"
    return "wall", f"load average {load:.1f} on {cores} CPUs"


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    torch.set_num_threads(args.threads)
    from . import ablation, cache, projection, streaming, sweep
    from .harness import judge
    from .models import Skip, build
    modules = {"cache": cache, "streaming": streaming, "sweep": sweep, "ablation": ablation, "projection": projection}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    models, skipped = {}, {}
    for name in args.models:
        try:
            m = build(name)
        except Skip as e:
            skipped[name] = str(e)
            print(f"[skipping {name}: {e}]", file=sys.stderr)
            continue
        m.hf.to(args.device)
        models[name] = m
    rows = []
    with tempfile.TemporaryDirectory(prefix="mechsink-bench-") as tmp:
        work = args.workdir or Path(tmp)
        for s in args.sections:
            t = time.perf_counter()
            rows += modules[s].section(models, args, work)
            print(f"[{s}: {time.perf_counter() - t:.0f} s]", file=sys.stderr)
    load = max(load0, os.getloadavg()[0])
    clock, why = choose_clock(args.clock, load)
    judge(rows, clock)
    return {"rows": [r.to_dict() for r in rows], "clock": clock, "clock_reason": why, "skipped": skipped,
            "projection": getattr(projection, "LAST", None),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "load_average": [load0, os.getloadavg()[0]],
                        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name()},
            "total_s": time.perf_counter() - t0}


def table(result: dict) -> str:
    from .harness import fmt
    clock = result["clock"]
    head = ["section", "model", "variant", "wall s", "cpu s", "ratio wall", "ratio cpu", "÷", "goal", "met", "notes"]
    lines = []
    for r in result["rows"]:
        e = r["extra"]
        notes = []
        for k in ("max_rel_diff_vs_hooks", "tl_max_abs_diff_vs_exact", "attribution_spearman", "max_abs_diff_vs_naive",
                  "reference_max_abs_diff_vs_exact"):
            if k in e and (k != "tl_max_abs_diff_vs_exact" or r["variant"] == "tl") and \
                    (k != "reference_max_abs_diff_vs_exact" or r["variant"] == "reference") and \
                    (k != "attribution_spearman" or r["variant"] == "attribution"):
                notes.append(f"{k}={e[k]:.3g}")
        if "run_peak_mb" in e:
            notes.append(f"rss+{e['run_peak_mb']:.0f}MB")
        for k, v in e.items():
            if k.startswith(("run_peak_mb_", "merge_peak_mb_", "loop_peak_mb_", "read_peak_mb_")) or \
                    k.startswith(("probe_peak_mb_", "ablate_peak_mb_", "result_mb_")) or \
                    k in ("read_peak_ratio", "checksum_read_ratio", "verify_mb_per_s", "growth_mb", "result_growth_mb"):
                notes.append(f"{k}={v:.1f}")
        if "ratio_cpu_vs_exact" in e:
            notes.append(f"vs exact {e['ratio_wall_vs_exact']:.3g} wall / {e['ratio_cpu_vs_exact']:.3g} cpu")
        if r["variant"] == "tl" and r["section"] == "sweep":
            notes.append(f"timed {e['tl_cells_timed']}/{e['cells']} cells")
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        goal = "-" if not r["goal"] else r["goal"] + (f" & < {'/'.join(r['peers'])}" if r["peers"] else "")
        lines.append([r["section"], r["model"], r["variant"], fmt(r["wall_s"]), fmt(r["cpu_s"]), fmt(r["ratio_wall"]),
                      fmt(r["ratio_cpu"]), r["baseline"] or "-", goal, met, " ".join(notes)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(l, widths)) for l in lines]
    out.append(f"goals judged on the {clock} ratio ({result['clock_reason']}); total {result['total_s']:.0f} s")
    for name, why in result.get("skipped", {}).items():
        out.append(f"skipped {name}: {why}")
    if result.get("projection"):
        from .projection import table as projection_table
        pr = result["projection"]
        out += ["", projection_table(pr) if "rows" in pr else pr["label"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = run(args)
    print(table(result))
    if args.json:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
