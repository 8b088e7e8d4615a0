"""The house's import rules (ARCHITECTURE.md), read from the source: every import statement, at module level or
inside a function (a lazy import is still a dependency), except those under `if TYPE_CHECKING:`.

- the math (diffusion/, models/, losses.py, stages/) imports no Ray, DeepSpeed, fsspec, s3fs or wandb, and none of
  storage/, data/, runtime/;
- runtime/ imports nothing from diffusion/, models/, stages/ or eval/ (it trains whatever stage it is handed);
- data/ imports nothing from stages/, models/ or runtime/;
- no import cycles between the package's modules.

Each rule is also run on a small package written here that breaks it, so a checker that found nothing would fail.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pagoda_dist"
MATH = ("diffusion", "models", "losses", "stages")
RULES = [
    # (importer prefixes, forbidden import prefixes)
    (MATH, ("ray", "deepspeed", "fsspec", "s3fs", "wandb", "boto3", "botocore", "storage", "data", "runtime")),
    (("runtime",), ("diffusion", "models", "stages", "eval", "losses")),
    (("data",), ("stages", "models", "runtime")),
]


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name (relative to the package, '' for its __init__) -> file."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(root: Path, name: str, path: Path) -> Iterator[str]:
    """What module `name` imports: package-relative names for the package's own modules ('' is its __init__),
    'ext:TOP' for a third-party top-level package."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_lines(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    own = _modules(root)
    top = root.name
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                yield ".".join(parts[1:]) if parts[0] == top else f"ext:{parts[0]}"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == top:
                base = node.module.split(".")[1:]
            else:
                yield f"ext:{(node.module or '').split('.')[0]}"
                continue
            for alias in node.names:  # `from pkg import submodule` depends on the submodule itself
                sub = ".".join([*base, alias.name])
                yield sub if sub in own else ".".join(base).strip(".")


def graph(root: Path) -> dict[str, set[str]]:
    return {name: set(imports(root, name, path)) for name, path in _modules(root).items()}


def rule_violations(root: Path) -> list[str]:
    found = []
    for name, deps in graph(root).items():
        for importers, forbidden in RULES:
            if not any(name == p or name.startswith(p + ".") for p in importers):
                continue
            for dep in deps:
                target = dep.removeprefix("ext:")
                if any(target == f or target.startswith(f + ".") for f in forbidden):
                    found.append(f"{name} imports {dep}")
    return sorted(found)


def cycles(root: Path) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    g = {k: {d for d in v if not d.startswith("ext:") and d != k} for k, v in graph(root).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_package_keeps_its_import_rules() -> None:
    assert rule_violations(PACKAGE) == []


def test_the_package_has_no_import_cycles() -> None:
    assert cycles(PACKAGE) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("rel, text, expected", [
    ("stages/step.py", "import ray\n", "stages.step imports ext:ray"),
    ("models/net.py", "def f():\n    from deepspeed import init\n", "models.net imports ext:deepspeed"),
    ("diffusion/ode.py", "from ..storage import ops\n", "diffusion.ode imports storage.ops"),
    ("runtime/loop.py", "from pagoda_dist.stages import build\n", "runtime.loop imports stages"),
    ("runtime/loop.py", "from pagoda_dist.eval.grid import save\n", "runtime.loop imports eval.grid"),
    ("data/reader.py", "from pagoda_dist.models import cond\n", "data.reader imports models.cond"),
    ("data/reader.py", "from ..stages.base import Batch\n", "data.reader imports stages.base"),
])
def test_a_broken_rule_is_found(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    root = _write(tmp_path / "pagoda_dist", {
        "__init__.py": "", "storage/__init__.py": "", "storage/ops.py": "", "stages/__init__.py": "",
        "stages/base.py": "", "models/__init__.py": "", "models/cond.py": "", "eval/__init__.py": "",
        "eval/grid.py": "", "runtime/__init__.py": "", "data/__init__.py": "",
        "stages/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import wandb\n",
        rel: text})
    assert rule_violations(root) == [expected]


def test_an_import_cycle_is_found_lazy_imports_included(tmp_path: Path) -> None:
    root = _write(tmp_path / "pagoda_dist", {
        "__init__.py": "", "eval/__init__.py": "", "pipeline.py": "from pagoda_dist.eval import evaluate\n",
        "eval/evaluate.py": "def f():\n    from pagoda_dist.pipeline import run\n", "chain.py": ""})
    assert cycles(root) == [["eval.evaluate", "pipeline"]]
