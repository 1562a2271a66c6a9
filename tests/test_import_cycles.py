"""No module of fastkd/ imports one that imports it back, directly or through others.

Imports are read with ast from the source, at any depth: an import inside a function still ties the two modules
(one that exists to dodge a cycle hides it, it does not remove it), and so do imports under TYPE_CHECKING. An
import that is lazy for speed says so in a comment on its line or the line above, containing "lazy:"; only those
are left out.
"""
import ast
from pathlib import Path

import pytest

import fastkd

PACKAGE = Path(fastkd.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in root.rglob("*.py")}


def imported(path: Path, name: str, known: set) -> set:
    """The fastkd modules that `path` (module `name`) imports, except the ones marked lazy."""
    source = path.read_text()
    lines = source.splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        here = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
        if "lazy:" in here:
            continue
        for target in names:
            # `from .x import y`: y may be a module or a name in x; the module is what the import runs.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def import_graph(root: Path = PACKAGE) -> dict[str, set]:
    found = modules(root)
    # A package's own __init__ runs before any of its modules: not an edge a module chooses.
    return {name: {t for t in imported(path, name, set(found)) if not name.startswith(t + ".")}
            for name, path in found.items()}


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as its members."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_fastkd_module_imports_one_that_imports_it_back():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("lazy_comment, expect_cycle", [("", True), ("  # lazy: only the CLI needs it", False)])
def test_the_cycle_check_sees_imports_inside_functions(tmp_path, lazy_comment, expect_cycle):
    root = tmp_path / "fastkd"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (root / "b.py").write_text(f"def g():\n    from .a import f{lazy_comment}\n    return f\n")
    assert (cycles(import_graph(root)) == [["fastkd.a", "fastkd.b"]]) == expect_cycle
