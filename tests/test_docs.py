"""The documentation is true: its Python runs, its CLI reference is the Typer app's, its recipes load.

- every ```python block of docs/quickstart.md runs, in order, in one namespace (offline, zoo models);
- every ```python block of each docs/analyses/*.md page runs, in one namespace per page;
- the option tables of docs/cli.md are generated from `mechsink.cli.app`, and every `mechsink ...`
  command line in the docs uses a real command and real options;
- every configs/paper recipe loads into the real config classes, round-trips, and carries estimates.

Regenerate the CLI tables after changing a command:  python tests/test_docs.py --write-cli
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAPER = ROOT / "configs" / "paper"
TOY_WEIGHTS = ROOT / "mechsink" / "zoo" / "toy_llava" / "config.json"
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_TABLE = re.compile(r"(<!-- options: ([\w-]+) -->\n)(.*?)(<!-- /options -->)", re.S)


def code_blocks(path: Path, lang: str) -> list[str]:
    return [body for tag, body in _BLOCK.findall(path.read_text()) if tag == lang]


def run_blocks(blocks: list[str], where: str, workdir: Path) -> dict:
    """exec each block in one namespace, in `workdir`; a failure names the page and block."""
    import os

    import matplotlib.pyplot as plt
    ns: dict = {"__name__": "__docs__"}
    old = os.getcwd()
    os.chdir(workdir)
    try:
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"{where}[block {i}]", "exec"), ns)
            except Exception as e:
                raise AssertionError(f"{where}, python block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    finally:
        os.chdir(old)
        plt.close("all")
    return ns


# -- Python in the docs ------------------------------------------------------------------------------
def test_quickstart_runs(tmp_path):
    blocks = code_blocks(DOCS / "quickstart.md", "python")
    assert len(blocks) >= 8
    toy = [i for i, b in enumerate(blocks) if '"toy-llava"' in b]
    assert toy == [len(blocks) - 1], "the toy-llava block is the last one"
    if not TOY_WEIGHTS.exists():
        blocks = blocks[:-1]          # the trained toy is bundled by its training script; run the rest
    ns = run_blocks(blocks, "docs/quickstart.md", tmp_path)
    # the tour's known answers on planted-llava
    assert sorted(set(ns["sinks"].sinks["patch"])) == [0, 14, 21]
    assert ns["accuracy"](ns["clean"]) == 1.0
    table = ns["pr"].table()
    assert table.loc["proj.out", "sinks"] == pytest.approx(1.0, abs=1e-4)
    assert abs(table.loc["proj.out", "random"]) < 1e-4


def test_toy_block_runs_when_the_toy_is_bundled(tmp_path):
    if not TOY_WEIGHTS.exists():
        pytest.skip("toy-llava weights are not bundled in this checkout")
    block = code_blocks(DOCS / "quickstart.md", "python")[-1]
    ns = run_blocks(["from mechsink.data import open_dataset\nfrom mechsink.sinks import detect\nimport mechsink",
                     block], "docs/quickstart.md (toy)", tmp_path)
    assert len(ns["toy_sinks"].patches) == 12 * 144


ANALYSES = sorted((DOCS / "analyses").glob("*.md"))


@pytest.mark.parametrize("page", ANALYSES, ids=[p.stem for p in ANALYSES])
def test_analysis_page_runs(page, tmp_path):
    blocks = code_blocks(page, "python")
    assert blocks, f"{page.name} has no python block"
    run_blocks(blocks, f"docs/analyses/{page.name}", tmp_path)


def test_other_python_blocks_compile():
    """Blocks that need a GPU or a benchmark on disk are not run, but they must be valid Python."""
    for page in [DOCS / "gpu.md", DOCS / "concepts.md", PAPER / "README.md"]:
        for i, code in enumerate(code_blocks(page, "python")):
            compile(code, f"{page.name}[block {i}]", "exec")


def test_analysis_pages_share_one_shape():
    want = ["What it is for", "When to use", "Canonical call", "Gotchas"]
    assert len(ANALYSES) >= 12
    for page in ANALYSES:
        heads = re.findall(r"^## (.+)$", page.read_text(), re.M)
        assert heads == want, f"{page.name}: sections {heads}"


def test_internal_links_resolve():
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


# -- the CLI reference ---------------------------------------------------------------------------------
def _commands() -> dict:
    import typer

    from mechsink.cli import app
    return dict(typer.main.get_command(app).commands)


def _type_name(p) -> str:
    if p.is_flag:
        return "flag"
    ann = getattr(getattr(p, "type_descriptor", None), "annotation", None)
    name = {str: "text", int: "integer", float: "number", Path: "path"}.get(ann)
    if name is None:
        name = "text" if p.multiple else str(getattr(ann, "__name__", ann))
    return f"{name}, repeatable" if p.multiple else name


def _default(p) -> str:
    if p.required:
        return "required"
    if p.is_flag or p.default is None or (p.multiple and not p.default):
        return ""
    return f"`{p.default}`"


def option_table(command) -> str:
    """The markdown table of one command's options, from the Typer app."""
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for p in command.params:
        flags = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        text = " ".join((p.help or "").split()).replace("|", "\\|")
        rows.append(f"| {flags} | {_type_name(p)} | {_default(p)} | {text} |")
    return "\n".join(rows) + "\n"


def render_cli(text: str) -> str:
    """docs/cli.md with every generated option table replaced by the app's current one."""
    cmds = _commands()

    def sub(m):
        name = m.group(2)
        if name not in cmds:
            raise AssertionError(f"docs/cli.md documents `mechsink {name}`, which the app does not have")
        return m.group(1) + option_table(cmds[name]) + m.group(4)
    return _TABLE.sub(sub, text)


def test_cli_reference_matches_the_app():
    text = (DOCS / "cli.md").read_text()
    documented = [m.group(2) for m in _TABLE.finditer(text)]
    assert sorted(documented) == sorted(_commands()), "docs/cli.md must have one option table per command"
    assert render_cli(text) == text, "docs/cli.md is out of date: run  python tests/test_docs.py --write-cli"


def _command_lines() -> list[tuple[str, list[str]]]:
    out = []
    for page in [*DOCS.rglob("*.md"), PAPER / "README.md", ROOT / "README.md"]:
        for tag, body in _BLOCK.findall(page.read_text()):
            if tag not in ("bash", "sh", ""):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if not re.search(r"(^|[\s/])mechsink\s+[a-z]", line):
                    continue
                words = shlex.split(line)
                for i, w in enumerate(words):
                    if w.endswith("mechsink") and i + 1 < len(words) and not words[i + 1].startswith("-"):
                        out.append((f"{page.name}: {line}", words[i + 1:]))
                        break
    return out


def test_documented_command_lines_use_real_options():
    cmds = _commands()
    lines = _command_lines()
    assert len(lines) >= 20
    for where, words in lines:
        name, args = words[0], words[1:]
        assert name in cmds, f"{where}: no command {name!r}"
        known = {o for p in cmds[name].params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
        for w in args:
            if w.startswith("-") and not re.fullmatch(r"-\d.*", w):
                assert w.split("=")[0] in known, f"{where}: {name} has no option {w}"


# -- the paper recipes ---------------------------------------------------------------------------------
REPORTS = sorted(PAPER.glob("*.report.json"))
RECIPES = sorted(PAPER.glob("*.recipe.json"))


def test_one_report_and_one_recipe_per_model():
    names = lambda files, suffix: sorted(p.name[: -len(suffix)] for p in files)  # noqa: E731
    assert names(REPORTS, ".report.json") == names(RECIPES, ".recipe.json")
    assert {"llava-1.5-7b", "qwen2.5-vl-7b", "llava-onevision-7b"} <= set(names(RECIPES, ".recipe.json"))


@pytest.mark.parametrize("path", REPORTS, ids=[p.stem for p in REPORTS])
def test_report_config_loads(path):
    from mechsink.report.pipeline import ReportConfig
    from mechsink.sinks import SinkSpec
    d = json.loads(path.read_text())
    cfg = ReportConfig.from_dict(d)               # what `mechsink report --config FILE` does
    assert cfg.to_dict() == d
    assert SinkSpec.from_dict(cfg.sinks).to_dict() == cfg.sinks
    assert cfg.device == "cuda" and cfg.model.count("/") == 1


def _estimate_ok(e: dict, where: str) -> None:
    assert isinstance(e.get("gpu_memory_gb"), int) and isinstance(e.get("gpu_minutes"), int), where
    assert 0 <= e["gpu_memory_gb"] <= 80 and e["how"], where      # fits one 80 GB GPU, and says how


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_into_the_real_configs(path):
    from mechsink.ablation import AblationConfig
    from mechsink.cache.extract import TOKENS
    from mechsink.data import FORMATS
    from mechsink.models import adapters
    from mechsink.patching import PatchConfig
    from mechsink.probing import ProbeConfig
    from mechsink.sinks import SinkSpec
    from mechsink.sites import Site

    r = json.loads(path.read_text())
    assert "estimate" in r["estimates_note"].lower()
    assert SinkSpec.from_dict(r["sinks"]).to_dict() == r["sinks"]
    report = json.loads((PAPER / r["report"]["config"]).read_text())
    assert report["sinks"] == r["sinks"] and report["model"] == r["model"]["id"]
    _estimate_ok(r["report"]["estimate"], f"{path.name}: report")
    for site in [*r["sites"]["vit"], *r["sites"]["llm"]]:
        Site.parse(site)
    for name, d in r["data"].items():
        fmt = d["spec"].split(":", 1)[0] if ":" in d["spec"] else None
        assert fmt in FORMATS or d["spec"].endswith((".jsonl", ".json", ".csv", ".parquet")), f"{name}: {d['spec']}"
    a = r["analyses"]
    assert {"sinks", "attention", "cache", "probe", "ablation", "patch", "visual_subsets", "reorder"} <= set(a)
    for kind, runs in a.items():
        for i, run in enumerate(runs):
            where = f"{path.name}: {kind}[{i}]"
            assert run["data"] in r["data"], where
            if kind == "probe":
                assert run["estimate"]["gpu_memory_gb"] == 0, where
            else:
                _estimate_ok(run["estimate"], where)
    for run in a["ablation"]:
        assert AblationConfig.from_dict(run["config"]).to_dict() == run["config"]
    for run in a["patch"]:
        assert PatchConfig(**run["config"]).to_dict() == run["config"]
        assert run["source"] in ("shuffle", "noise", "blank")
    for run in a["probe"]:
        cfg = ProbeConfig.from_dict(run["config"])
        assert cfg.to_dict() == run["config"]
        assert cfg.label == r["data"][run["data"]]["label"]
    for run in a["cache"]:
        for site in run["args"]["sites"]:
            Site.parse(site)
        assert set(run["args"]["tokens"]) <= set(TOKENS)
    arch = {"llava-hf/llava-1.5-7b-hf": "LlavaForConditionalGeneration",
            "Qwen/Qwen2.5-VL-7B-Instruct": "Qwen2_5_VLForConditionalGeneration",
            "llava-hf/llava-onevision-qwen2-7b-ov-hf": "LlavaOnevisionForConditionalGeneration"}[r["model"]["id"]]
    assert arch in adapters()


def test_recipe_sites_exist_in_the_architecture():
    """Every block site names a layer the real model has (depths from the published configs)."""
    from mechsink.sites import Site
    depth = {"llava-1.5-7b": (24, 32), "qwen2.5-vl-7b": (32, 28), "llava-onevision-7b": (26, 28)}
    for path in RECIPES:
        r = json.loads(path.read_text())
        n_vit, n_llm = depth[r["recipe"]]
        sites = [*r["sites"]["vit"], *r["sites"]["llm"]]
        sites += [s for run in r["analyses"]["cache"] for s in run["args"]["sites"]]
        sites += [s for run in r["analyses"]["patch"] for s in run["config"]["sites"]]
        for s in map(Site.parse, sites):
            if s.is_block:
                assert s.layer < (n_vit if s.part == "vit" else n_llm), f"{path.name}: {s}"
        for run in r["analyses"]["ablation"]:
            assert all(l < n_llm for l in run["config"]["layers"] or [])


if __name__ == "__main__":       # python tests/test_docs.py --write-cli
    if sys.argv[1:] == ["--write-cli"]:
        p = DOCS / "cli.md"
        p.write_text(render_cli(p.read_text()))
        print(f"wrote {p}")
    else:
        sys.exit("usage: python tests/test_docs.py --write-cli")
