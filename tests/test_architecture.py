"""The map of the house holds: layers only import downwards, modules form no cycle, no file sprawls,
the CLI holds no library code and figures live only in report/ (docs/architecture.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mechsink"

# Layer of every top-level module or package (DESIGN.md): a module may import its own layer or below.
LAYERS = {
    1: ["errors", "atomic", "config", "results", "memory"],
    2: ["sites", "tokens", "selection", "models", "trace", "engine", "metrics", "stats", "data", "batching", "lens", "distributed"],
    3: ["sinks", "cache", "probing", "ablation", "patching", "sweep", "sources", "attribution", "analyses",
        "interventions", "inspect", "plan", "export", "importance"],
    4: ["zoo", "testing"],
    5: ["report", "selfcheck"],
    6: ["cli", "__main__"],
}
LAYER = {name: k for k, names in LAYERS.items() for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["mechsink", *parts])] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every mechsink module ``name`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("mechsink"):
                while t and t not in MODULES:          # a name imported from a module -> that module
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    missing = sorted({_top(n) for n in MODULES if _top(n) and _top(n) not in LAYER})
    assert not missing, f"modules without a layer in DESIGN.md / this test: {missing}"


def test_imports_only_go_down():
    bad = []
    for name, deps in GRAPH.items():
        if not _top(name):
            continue                                    # the package root re-exports the public API
        for d in deps:
            if _top(d) and LAYER[_top(d)] > LAYER[_top(name)]:
                bad.append(f"{name} (layer {LAYER[_top(name)]}) imports {d} (layer {LAYER[_top(d)]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    # Packages import their own submodules by design (__init__ re-exports); a cycle is any other loop.
    def edges(n):
        return {d for d in GRAPH[n] if not (n.startswith(d + ".") and MODULES[d].name == "__init__.py")
                and not (d.startswith(n + ".") and MODULES[n].name == "__init__.py")}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for d in sorted(edges(n)):
            visit(d)
        stack.pop()
    for n in sorted(GRAPH):
        visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# The activation store's and probing's modules in dependency order (docs/architecture.md): each
# imports only earlier ones.
ORDERS = {"cache": ["layout", "rows", "tensorfile", "samples", "locks", "store", "index", "writer", "integrity",
                    "extract", "export"],
          "probing": ["config", "linear", "labels", "columns", "sets", "features", "fit", "scoring", "result", "run"]}


@pytest.mark.parametrize("package", sorted(ORDERS))
def test_the_modules_of_a_package_import_in_order(package):
    order = ORDERS[package]
    mods = {f"mechsink.{package}.{m}" for m in order}
    assert {n for n in MODULES if n.startswith(f"mechsink.{package}.")} == mods, f"a {package} module is missing"
    bad = [f"{m} imports {d}" for k, m in enumerate(order) for d in GRAPH[f"mechsink.{package}.{m}"]
           if d in mods and order.index(d.rsplit(".", 1)[1]) >= k]
    assert not bad, bad


def test_no_file_sprawls():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines (split them by concept): {long}"


def test_no_command_glue_in_the_library():
    glue = [f"{p.relative_to(PKG)}:{node.name}" for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] != "cli"
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.FunctionDef)
            and node.name.endswith("_command")]
    assert not glue, f"CLI glue outside cli/: {glue}"


@pytest.mark.parametrize("word", ["matplotlib", "seaborn"])
def test_figures_only_in_report(word):
    users = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
             if not p.relative_to(PKG).parts[0] == "report" and p.relative_to(PKG).parts[0] != "zoo"
             and any(isinstance(n, (ast.Import, ast.ImportFrom)) and word in ast.unparse(n)
                     for n in ast.walk(ast.parse(p.read_text())))]
    assert not users, f"{word} imported outside report/: {users}"


def test_hooks_only_in_trace():
    users = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
             if p.name != "trace.py" and p.relative_to(PKG).parts[0] != "zoo"
             and "register_forward" in p.read_text()]
    assert not users, f"torch hooks registered outside trace.py: {users}"
