"""The house rules of the package, checked on its source (no import of it): no import cycle between its
modules, counting imports inside functions and under ``TYPE_CHECKING``; no function over 80 lines outside
the Triton kernels and the figure code."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gaincell"
MAX_FUNCTION_LINES = 80
EXEMPT = ("attention/kernels/", "figures/")  # Triton kernels and figure code


def module_files(package: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every module of ``package``."""
    found = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported_modules(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package's modules that ``module`` imports anywhere in its file (a ``from pkg import sub``
    counts as importing ``pkg.sub`` when that is a module, else ``pkg``)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            names = [s for s in subs if s in modules] + ([base] if any(s not in modules for s in subs) else [])
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_cycles(package: Path) -> List[List[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    modules = module_files(package)
    edges = {m: imported_modules(m, p, modules) for m, p in modules.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> List[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith(EXEMPT):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_import_cycle_in_the_package():
    assert import_cycles(PACKAGE) == []


def test_no_function_over_80_lines():
    assert long_functions(PACKAGE) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """A cycle through an import inside a function and one under TYPE_CHECKING, and a long function."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg.sub import c\n")  # into the cycle, not part of it
    assert import_cycles(pkg) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (pkg / "long.py").write_text("def g():\n" + "    x = 1\n" * 80)
    assert long_functions(pkg) == ["long.py:1 g (81 lines)"]
