"""Package structure, read from the source's AST: no import cycles between packages, no library import
of the demo, no torch/transformers in the runtime.

Nodes are `dream_export.<subpackage>` (or a top-level module such as `cli`, `io`, `errors`, `families`).
Every import counts, including those inside functions: a lazy import still couples two packages.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dream_export"

def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # `from dream_export import cli` names a module, not an attribute
            out.update(f"{mod}.{a.name}" for a in node.names if (PKG.parent / f"{mod}.{a.name}".replace(".", "/")).exists()
                       or (PKG.parent / (f"{mod}.{a.name}".replace(".", "/") + ".py")).exists())
    return out


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def _node(module: str) -> str | None:
    """Package-level node of a dream_export module (None outside the project)."""
    parts = module.split(".")
    if parts[0] != "dream_export" or len(parts) < 2:
        return None
    return parts[1]


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def _package_edges(mods: dict[str, set[str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, imps in mods.items():
        a = _node(mod)
        for imp in imps:
            b = _node(imp)
            if a and b and a != b:
                edges[a].add(b)
    return edges


def test_no_import_cycles_between_packages():
    edges = _package_edges(_modules())
    assert not _cycles(edges), f"import cycles between packages: {_cycles(edges)}"


def test_no_import_cycles_between_modules():
    mods = _modules()
    edges = {m: {i for i in imps if i in mods and i != m} for m, imps in mods.items()}
    assert not _cycles(edges), f"import cycles between modules: {_cycles(edges)}"


def test_library_never_imports_the_demo():
    offenders = sorted(f"{mod} imports {imp}" for mod, imps in _modules().items()
                       if _node(mod) not in ("demo", "cli") for imp in imps if _node(imp) == "demo")
    assert not offenders, offenders


@pytest.mark.parametrize("banned", ["torch", "transformers", "matplotlib"])
def test_runtime_package_never_imports(banned):
    offenders = sorted(f"{mod} imports {imp}" for mod, imps in _modules().items() if _node(mod) == "runtime"
                       for imp in imps if imp.split(".")[0] == banned)
    assert not offenders, offenders


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path):
    """The graph is built from every import statement, function-level ones included."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from dream_export.demo import scenes\n    import torch.nn\n")
    tree = ast.parse(f.read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"dream_export.demo"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
