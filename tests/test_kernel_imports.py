"""How fastkd.kernels' modules import each other and Triton: no module imports one that imports it back, and every
CPU entry point (and fastkd.fit) works in a process where `import triton` fails."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
PACKAGE = "fastkd.kernels"


def sibling_imports(source: str, siblings: set[str]) -> set[str]:
    """The modules of the package that `source` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module
            elif node.level == 0 and node.module and node.module.startswith(PACKAGE + "."):
                base = node.module[len(PACKAGE) + 1:]
            elif node.level == 0 and node.module == PACKAGE:
                base = None
            else:
                continue
            if base is None:  # `from . import a, b`
                found.update(alias.name for alias in node.names if alias.name in siblings)
            else:
                found.add(base.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1:].split(".")[0])
    return found & siblings


def import_graph(folder: Path) -> dict[str, set[str]]:
    modules = {path.stem: path.read_text() for path in folder.glob("*.py")}
    return {name: sibling_imports(source, set(modules)) - {name} for name, source in modules.items()}


def a_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules (first = last), or None."""
    state = {}  # name -> "open" while on the current path, "done" once all it reaches is cycle-free

    def visit(name, path):
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                cycle = visit(other, path + [other])
                if cycle:
                    return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": sibling_imports("from . import b", {"a", "b"}),
             "b": sibling_imports("def f():\n    from .a import x\n", {"a", "b"})}
    assert a_cycle(graph) == ["a", "b", "a"]


def test_no_kernels_module_imports_one_that_imports_it_back():
    graph = import_graph(KERNELS)
    assert {"kd_loss", "_kd_chunked", "_kd_common"} <= set(graph)
    assert a_cycle(graph) is None, " -> ".join(a_cycle(graph))


def test_no_kernels_module_re_exports_lazily_through_a_module_getattr():
    for path in KERNELS.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"], \
            path.name


WITHOUT_TRITON = textwrap.dedent("""
    import sys

    sys.modules["triton"] = None  # from here on, `import triton` raises ImportError
    import torch

    import fastkd
    from fastkd.kernels.kd_loss import KDLoss, kd_loss, kd_loss_linear, kd_loss_reference, kd_loss_sparse

    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("the blocker let Triton be imported")

    torch.manual_seed(0)
    s, t = torch.randn(6, 11, dtype=torch.float64) * 3, torch.randn(6, 11, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, -100, 10, 5, 1])
    values, indices = t.topk(4, dim=1)
    dense_topk = torch.full_like(t, float("-inf")).scatter_(1, indices, values)
    weight = torch.randn(11, 11, dtype=torch.float64)
    hidden = s @ torch.linalg.inv(weight).T
    calls = [(lambda x: kd_loss(x, t, y, temperature=2.0, alpha=0.3), s, lambda x: x, t),
             (lambda x: KDLoss(temperature=2.0, alpha=0.3)(x, t, y), s, lambda x: x, t),
             (lambda x: kd_loss_sparse(x, values, indices, y, temperature=2.0, alpha=0.3), s, lambda x: x, dense_topk),
             (lambda x: kd_loss_linear(x, weight, y, teacher_logits=t, temperature=2.0, alpha=0.3, chunk_size=4),
              hidden, lambda x: x @ weight.T, t)]
    for loss_of, x, logits_of, teacher in calls:
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss_of(x), x)
        x_ref = x.detach().clone().requires_grad_()
        (grad_ref,) = torch.autograd.grad(kd_loss_reference(logits_of(x_ref), teacher, y, temperature=2.0,
                                                            alpha=0.3), x_ref)
        torch.testing.assert_close(loss_of(x.detach()), kd_loss_reference(logits_of(x.detach()), teacher, y,
                                                                          temperature=2.0, alpha=0.3))
        torch.testing.assert_close(grad, grad_ref)

    summary = fastkd.fit(method="spaced", dataset="synthetic", teacher="tiny", student="tiny", epochs=1,
                         batch_size=32, interval=0.5, device="cpu", out=sys.argv[1], quiet=True)
    assert summary["steps"] > 0, summary
    assert sys.modules["triton"] is None, "something replaced the blocker"
    print("ran without triton")
""")


def test_every_cpu_entry_point_and_fit_run_where_triton_cannot_be_imported(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's machine: no interpreter
    done = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, str(tmp_path / "run")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "ran without triton" in done.stdout
