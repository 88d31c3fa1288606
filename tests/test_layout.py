"""The layout the code promises (docs: README "Where things are"): packages import only downwards, and no module
imports, at any depth, a module that imports it back."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("inference", "serving", "training", "data_prep", "webui")
#: What each package may import of ours: the core (inference, serving) nothing above it; training and data_prep
#: the core; the web page talks to the API over HTTP only.
ALLOWED = {"inference": {"inference", "serving"}, "serving": {"serving"}, "training": {"inference", "training"},
           "data_prep": {"inference", "data_prep"}, "webui": {"webui", "serving"}}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (a lazy import is a dependency too), except
    under ``if TYPE_CHECKING:``."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        deps = set()
        for name in _imports(path):
            parts = name.split(".")
            known = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in modules), None)
            if known and known != mod:
                deps.add(known)
        graph[mod] = deps
    return graph


def test_packages_import_only_downwards():
    upward = [f"{m} -> {d}" for m, deps in _graph().items() for d in sorted(deps)
              if d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    """Tarjan's strongly connected components of the import graph: every one must be a single module."""
    graph = _graph()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles
