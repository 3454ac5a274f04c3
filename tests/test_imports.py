"""Import hygiene of the two packages, ``mars_kernels`` and ``mars``.

* Every module imports.
* The module-level import graph has no cycles. Edges come from the import
  statements executed when a module is first imported: those at module level,
  including inside module-level ``if``/``try``/``with`` blocks, but not those
  inside functions or classes, nor under ``if TYPE_CHECKING:`` (never run).
  ``from pkg import name`` is an edge to the module ``pkg.name`` when that
  module exists, else to ``pkg`` (its ``__init__``). The implicit import of a
  parent package when a submodule is imported is not an edge: a package
  ``__init__`` importing its submodules, which import their siblings with
  ``from . import sibling``, is not a cycle.
* No private name crosses modules: ``from X import _name`` is refused when
  ``_name`` is an attribute of another module (a function, class or constant
  meant for its own module). A private *module* (``_validate``, ``_autograd``,
  the compiled extension ``_C``, the Triton ``_*_kernels`` files) is private to
  its package: it may be imported by the modules of the package that holds it
  (and of its subpackages), by no one else.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mars_kernels", "mars")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Every module of the packages: dotted name -> file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


MODULES = _modules()
# Compiled extension modules exist as shared objects, not .py files.
EXTENSIONS = {f"{_module_name(p.parent)}.{p.name.split('.')[0]}" for package in PACKAGES
              for p in (ROOT / package).rglob("*.so")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """The import statements run when the module is imported."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                stack[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack[:0] = node.body + [n for h in node.handlers for n in h.body] + node.orelse + node.finalbody
        elif isinstance(node, ast.With):
            stack[:0] = node.body
        # function and class bodies run later, if at all


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(target module, imported name or None, line) of each module-level import,
    targets restricted to the two packages."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    known = set(MODULES) | EXTENSIONS
    for node in _module_level_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, None, node.lineno
            continue
        source = _resolve(module, node)
        if source.split(".")[0] not in PACKAGES:
            continue
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if sub in known:
                yield sub, None, node.lineno
            else:
                yield source, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module
    (or a self-import), found with Tarjan's algorithm."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                comps.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_module_list_covers_both_packages():
    assert {"mars_kernels", "mars", "mars.model", "mars.train", "mars.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:  # an optional third-party dependency (e.g. transformers)
        if exc.name is None or exc.name.split(".")[0] in PACKAGES:
            raise
        pytest.skip(f"{module} needs {exc.name}, not installed")


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_cross_modules():
    bad = []
    for module in MODULES:
        for target, name, line in _imports(module):
            where = f"{MODULES[module].relative_to(ROOT)}:{line}"
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{where}: from {target} import {name}")
            private = [i for i, part in enumerate(target.split(".")) if part.startswith("_") and not part.startswith("__")]
            if private:  # a private module: only its own package may import it
                owner = ".".join(target.split(".")[: private[0]])
                if not (module == owner or module.startswith(owner + ".")):
                    bad.append(f"{where}: {module} imports {target}, private to {owner}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_checker_sees_cycles_and_private_imports():
    """The graph helpers on a made-up graph, so a silent checker cannot pass."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import x\nif TYPE_CHECKING:\n    import y\ntry:\n    import z\nexcept ImportError:\n    pass\n"
                     "def f():\n    import w\n")
    assert [n.names[0].name for n in _module_level_imports(tree)] == ["x", "z"]
