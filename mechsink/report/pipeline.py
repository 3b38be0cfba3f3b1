"""The whole analysis, end to end, as one reproducible report (``mechsink demo`` / ``mechsink report``).

For the main model: sink detection and per-layer norms, norm-vs-attention statistics, an
activation cache with linear probes, sinks-vs-matched-random ablation, a patching sweep,
sink-only / non-sink-only input per question type and sink-to-the-front. For the control model
(by default ``planted-llava``, whose answer provably runs through its sinks) the detection and
causal sections again, so a reader sees what a real effect looks like next to the main result.

Everything that shapes a number is in ``ReportConfig``; the manifest stores it, so
``mechsink report --from manifest.json`` re-runs the same analysis and checks the numbers.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import MechsinkError
from .context import (CONTROL_SECTIONS, MAIN_SECTIONS, PAPER_SECTIONS, PROBE_LABELS, SECTIONS,  # noqa: F401
                      WORK_MARK, ReportConfig, _Ctx, _num, _part, _subset)

log = logging.getLogger("mechsink")


def run_report(config: ReportConfig, out: str | os.PathLike = "mechsink-report", *, sections=None,
               control_sections=None, resume: bool = False) -> Path:
    """Run the pipeline and write ``out/index.html`` + ``out/manifest.json``; returns index.html.

    Intermediate results (activation caches) go to ``out/work``, which is started afresh unless
    ``resume`` is set, so a re-run (``report --from``) never silently reuses old work. A run that
    fails removes what it created (all of ``out`` when it made it) and logs what it left.

    Under ``torchrun`` every rank runs every section on its share of the chunks and gets the
    merged results (the numbers of a single process); rank 0 alone prepares ``out/work``, draws the
    figures and writes the report, the others write only their part of the shared activation cache.
    Every rank returns once index.html is written. A failure in an analysis is raised on every rank
    (``distributed.fail_together``); a crash ends its process and torchrun stops the others."""
    import shutil
    from ..distributed import barrier, fail_together, rank
    out = Path(out)
    lead = rank() == 0
    created = False
    with fail_together():                      # rank 0 checks and prepares; the others wait for it
        if lead:
            if out.exists() and not out.is_dir():
                raise MechsinkError(f"report directory {out} exists and is not a directory")
            created = not out.exists()
    work = out / "work"
    try:
        with fail_together():
            if lead:
                if work.exists() and not resume:
                    if not (work / WORK_MARK).exists():
                        raise MechsinkError(f"{work} exists and was not written by mechsink; choose another --out")
                    shutil.rmtree(work)
                work.mkdir(parents=True, exist_ok=True)
                (work / WORK_MARK).write_text("intermediate results of a mechsink report; safe to delete\n")
        index = _run(config, out, work, sections, control_sections)
        barrier()                              # index.html is there for every rank
        return index
    except BaseException:
        if not lead:
            raise
        if created:
            shutil.rmtree(out, ignore_errors=True)
            log.warning("report failed: removed %s, which it had created", out)
        elif (work / WORK_MARK).exists():
            shutil.rmtree(work, ignore_errors=True)
            log.warning("report failed: removed %s; the rest of %s is as it was before the run", work, out)
        raise


def _run(config: ReportConfig, out: Path, work: Path, sections, control_sections) -> Path:
    from .. import __version__
    from ..distributed import rank
    from . import findings
    from .html import Report
    lead = rank() == 0
    if not lead:                # the other ranks compute every number but draw and write nothing
        Report = _unwritten()   # noqa: N806
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    t0 = time.perf_counter()
    main = _context(config.model, config.data, config, work, "main")
    rep = Report(config.title or f"mechsink report: {main.model.name}", config=config.to_dict(),
                 seeds={"seed": config.seed}, models={}, data={})
    n_img, n_q = findings.counts(main.data)
    rep.text(f"mechsink {__version__}. Model **{main.model.name}** ({main.model.adapter.family}) on "
             f"**{main.data.name}** ({n_img} images, {n_q} questions; statistics treat the image as the "
             f"independent unit). Every number below is also in `manifest.json`; "
             f"`mechsink report --from manifest.json` re-runs this analysis.")
    _register(rep, main)
    _overview(rep, main)
    run_sections(rep, main, config, sections or config.sections or MAIN_SECTIONS)
    if config.control:
        ctl = _context(config.control, config.control_data, config, work, "control")
        _register(rep, ctl)
        rep.section(f"Positive control: {ctl.model.name}",
                    "A model whose answer is known to run through its sinks (planted by the weights). The same "
                    "sections on it show what a real sink effect looks like next to the main model's result.")
        run_sections(rep, ctl, config, control_sections or config.control_sections or CONTROL_SECTIONS)
    findings.write(rep, main.findings + (ctl.findings if config.control else []))
    rep.section("Run")
    from ..distributed import world
    ranks = f" x {world()} ranks (torchrun)" if world() > 1 else ""
    rep.text(f"Finished in {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU thread(s){ranks}"
             f"{' / ' + str(main.model.device) if main.model.device.type != 'cpu' else ''}.")
    return rep.write(out) if lead else out / "index.html"


def run_sections(rep, ctx: _Ctx, config: ReportConfig, sections) -> None:
    from tqdm.auto import tqdm
    from ..distributed import rank
    from .paper_sections import _decoding, _diysink, _relevance
    from .sections import _ablation, _attention, _detection, _patching, _probes, _reorder, _subsets
    table = {"detection": _detection, "attention": _attention, "probes": _probes, "ablation": _ablation,
             "patching": _patching, "subsets": _subsets, "reorder": _reorder, "relevance": _relevance,
             "decoding": _decoding, "diysink": _diysink}
    bad = set(sections) - set(table)
    if bad:
        raise MechsinkError(f"unknown report section(s) {sorted(bad)}; sections: {', '.join(table)}")
    lead = rank() == 0                  # progress and log lines: rank 0's under torchrun
    for name in tqdm(list(sections), desc=f"report {ctx.model.name}", unit="section", disable=not lead):
        if lead:
            log.info("%s: %s", ctx.model.name, name)
        try:
            table[name](rep, ctx, config)
        except MechsinkError as e:      # an analysis this model cannot run: said, recorded, not hidden
            if name == "detection":
                raise
            from .findings import add
            why = str(e).strip().splitlines()[0]
            (log.warning if lead else log.debug)("%s: section %s not run: %s", ctx.model.name, name, why)
            rep.text(f"**Section `{name}` not run on {ctx.model.name}:** {why}")
            rep.number(f"{ctx.key}.sections.{name}.not_run", 1)
            add(ctx.findings, f"{ctx.key}.findings.{name}", ctx.model.name, f"not run: {why}")


def _unwritten():
    """The Report class of a rank other than 0: numbers and findings kept, figures closed undrawn."""
    import sys
    from .html import Report

    class Unwritten(Report):
        def figure(self, fig, caption=None, **kw):
            if "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close(fig)
            return self

        def write(self, out_dir):
            raise MechsinkError("only rank 0 writes the report")
    return Unwritten


# -- set-up -----------------------------------------------------------------------------------------
def offline_if_hub_unreachable(*names: str | None, timeout: float = 3.0) -> bool:
    """A Hugging Face id (not a zoo name or folder) with the hub unreachable within ``timeout`` s: the
    hub client goes offline before anything loads, so a cached copy still opens and anything else
    fails at once in one line instead of a flood of retries. True when it switched (said on stderr)."""
    import socket
    import sys
    from urllib.parse import urlparse
    ids = [n for n in names if n and "/" in str(n) and not Path(str(n)).expanduser().exists()]
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        if not ids or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            return False
        return socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close() or False
    except OSError:
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if "huggingface_hub" in sys.modules:               # already imported: its constants were read
            sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
        print(f"note: {url.hostname} is unreachable; looking for {', '.join(ids)} in the local cache only",
              file=sys.stderr)
        return True


def _context(name: str, data: str | None, config: ReportConfig, work: Path, key: str) -> _Ctx:
    from .. import load
    from ..data import default_data, open_dataset
    from ..sinks import SinkSpec
    offline_if_hub_unreachable(name)
    from ..distributed import world
    device = config.device
    if device == "cuda" and world() > 1:        # under torchrun: each rank its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    model = load(name, device=None if config.device_map else device, dtype=config.dtype,
                 device_map=config.device_map)
    ds = open_dataset(data or default_data(Path(name).name if Path(name).is_dir() else name))
    spec = SinkSpec.from_dict(config.sinks) if config.sinks else SinkSpec()
    return _Ctx(key=key, model=model, data=ds, spec=spec, causal_spec=spec, work=work / key)


def _register(rep, ctx: _Ctx) -> None:
    from .manifest import hash_directory
    src = ctx.model.source
    rep.models[ctx.model.name] = {"source": src, "sha256": hash_directory(src)} if Path(str(src)).is_dir() else {"source": src}
    rep.data[ctx.data.name] = ctx.data.fingerprint()


def _overview(rep, ctx: _Ctx) -> None:
    from .findings import counts
    m = ctx.model
    rep.section("Model and data")
    n_img, n_q = counts(ctx.data)
    rep.table(pd.DataFrame([{"model": m.name, "family": m.adapter.family, "ViT blocks": m.n_vit_layers,
                             "LLM blocks": m.n_llm_layers, "parameters": sum(p.numel() for p in m.hf.parameters()),
                             "dataset": ctx.data.name, "images": n_img, "questions": n_q}]), index=False)
    _num(rep, f"{ctx.key}.data.n_images", n_img)
    _num(rep, f"{ctx.key}.data.n_questions", n_q)
    metrics = Path(str(m.source)) / "metrics.json"
    if metrics.is_file():   # the bundled toy model ships its measured accuracy
        per = json.loads(metrics.read_text()).get("by_type", {})
        rows = [{"question type": k, "accuracy": v["accuracy"], "majority baseline": v.get("majority_baseline"),
                 "n": v.get("n")} for k, v in per.items()]
        if rows:
            rep.text("Accuracy of the model on its full evaluation set (`metrics.json`, measured when it was trained):")
            rep.table(pd.DataFrame(rows), index=False)
            for r in rows:
                _num(rep, f"{ctx.key}.model.accuracy.{r['question type']}", r["accuracy"])


# -- sections ---------------------------------------------------------------------------------------
# -- reproduction -----------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> ReportConfig:
    """A ReportConfig from a JSON file: a ReportConfig itself (``<model>.report.json``,
    ``<model>.paper.json``) or a paper recipe (``<model>.recipe.json``), whose ``report.config``
    names the ReportConfig file next to it."""
    path = Path(path)
    d = json.loads(path.read_text())
    if "recipe" in d:
        ref = (d.get("report") or {}).get("config")
        if not ref:
            raise MechsinkError(f"{path} is a recipe without a report config (report.config)")
        return read_config(path.parent / ref)
    return ReportConfig.from_dict(d)


def from_manifest(path: str | os.PathLike) -> ReportConfig:
    m = json.loads(Path(path).read_text())
    if "config" not in m:
        raise MechsinkError(f"{path} is not a mechsink manifest (no 'config')")
    return ReportConfig.from_dict(m["config"])


def compare_numbers(old: dict, new: dict, rtol: float = 1e-6) -> list[str]:
    """Keys whose values differ between two manifests' numbers (empty list = reproduced)."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if not np.isclose(a, b, rtol=rtol, atol=1e-9, equal_nan=True):
                diffs.append(k)
        elif a != b:
            diffs.append(k)
    return diffs
