"""The shape of the code base, checked: no import cycles, the library apart from the harness, small files,
results written by the registry only, and a report that is up to date."""

import ast
import json
from pathlib import Path

import pytest

from kvshift.experiments.base import VERDICTS
from kvshift.experiments.registry import EXPERIMENTS
from kvshift.experiments.report import render

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "kvshift"
LIBRARY = ("ops", "layers", "models")
HARNESS = ("train", "experiments", "hf", "eval", "bench", "data", "tasks")
MAX_LINES = 400


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """kvshift modules imported by `path`, at any depth (deferred imports count too). `from P import m` is an
    edge to the module P.m when that is a module, else to P; a package is imported before its submodules
    anyway, so that is no edge of its own."""
    out = set()
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(base)
    return {n for n in out if n.startswith("kvshift")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in SRC.rglob("*.py")}
    return {m: {n for n in _imports(p, m, set(mods)) if n in mods and n != m} for m, p in mods.items()}


def test_no_import_cycles(graph):
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_library_imports_no_harness(graph):
    area = lambda name: name.split(".")[1] if "." in name else ""  # noqa: E731
    bad = [(m, n) for m in graph for n in graph[m] if area(m) in LIBRARY and area(n) in HARNESS + ("utils",)]
    assert not bad, bad


def test_no_module_over_the_size_limit():
    big = {str(p.relative_to(REPO)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big


def test_nothing_points_outside_the_repository():
    words = ("PAPER.md", "ANCHORS.md", "FAMILY.md", "../shared")
    hits = [f"{p.relative_to(REPO)}: {w}" for p in list(SRC.rglob("*")) + list((REPO / "scripts").rglob("*"))
            + list((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
            if p.is_file() and p.suffix in (".py", ".sh", ".md", ".toml", ".yaml") for w in words if w in p.read_text()]
    assert not hits, hits


def test_results_hold_registry_evidence_only():
    """Every results directory belongs to a registered experiment, every summary uses the verdict vocabulary."""
    names = set(EXPERIMENTS)
    for d in sorted(p for p in (REPO / "results").iterdir() if p.is_dir()):
        owner = next((n for n in names if d.name in (n, f"{n}-cpu", f"{n}-gpu") or d.name.startswith(n + "-")), None)
        assert owner or d.name in ("corpus",), f"results/{d.name} is not written by a registered experiment"
        s = d / "summary.json"
        if s.is_file():
            summary = json.loads(s.read_text())
            assert summary["verdict"] in VERDICTS, (d.name, summary["verdict"])
            assert summary["experiment"] in names, d.name
        assert not list(d.rglob("*.log")) and not list(d.rglob("log.txt")), f"logs in results/{d.name}"
        assert not list(d.rglob("*.safetensors")) and not list(d.rglob("*.pt")), f"checkpoints in results/{d.name}"


def test_report_is_up_to_date():
    """docs/REPRODUCTION.md is exactly what `kvshift report` makes of the committed results."""
    assert (REPO / "docs" / "REPRODUCTION.md").read_text() == render(REPO / "results"), \
        "docs/REPRODUCTION.md is stale: run `kvshift report`"


def test_every_doc_the_code_names_exists():
    import re

    named = set()
    for p in list(SRC.rglob("*.py")) + list((REPO / "scripts").rglob("*.sh")) + [REPO / "README.md"]:
        named |= set(re.findall(r"docs/[A-Za-z_]+\.md", p.read_text()))
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, missing
