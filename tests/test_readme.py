"""The README's kernel examples run as written and print what the README shows under them, so they cannot rot.

An example is a ```python block whose first line is `# example: NAME`; the ```text block right after it is its
output. The printed text must match it word for word and every number to within 1e-3 (relative, at least 1e-3
absolute), which allows the last printed digit to move with the machine's float rounding and nothing more."""
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
KERNEL_EXAMPLES = ("kd_loss", "kd_loss_linear", "kd_loss_sparse", "divergences")
TORCHRUN_EXAMPLES = ("sharded",)  # run by torchrun on 2 processes; rank 0 prints
BLOCK = re.compile(r"```python\n(# example: (\S+)[^\n]*\n.*?)```\s*```text\n(.*?)```", re.S)
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def readme_examples(text: str) -> dict:
    """NAME → (code, the line its block starts on, expected output)."""
    found = {}
    for match in BLOCK.finditer(text):
        code, name, output = match.groups()
        assert name not in found, f"README has two examples named {name}"
        found[name] = (code, text.count("\n", 0, match.start(1)), output)
    return found


def same_output(printed: str, expected: str) -> bool:
    if NUMBER.split(printed.strip()) != NUMBER.split(expected.strip()):
        return False
    numbers = zip(NUMBER.findall(printed), NUMBER.findall(expected))
    return all(abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(b))) for a, b in numbers)


def test_readme_holds_one_example_of_each_kernel():
    assert sorted(readme_examples(README.read_text())) == sorted(KERNEL_EXAMPLES + TORCHRUN_EXAMPLES)


@pytest.mark.parametrize("name", KERNEL_EXAMPLES)
def test_readme_kernel_example_runs_and_prints_its_output(name):
    examples = readme_examples(README.read_text())
    assert name in examples, f"README has no ```python block starting with '# example: {name}'"
    code, line, expected = examples[name]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # line numbers in a traceback are README's
        exec(compile("\n" * line + code, str(README), "exec"), {"__name__": f"readme_{name}"})
    assert same_output(printed.getvalue(), expected), (printed.getvalue(), expected)


@pytest.mark.parametrize("name", TORCHRUN_EXAMPLES)
def test_readme_distributed_example_runs_under_torchrun(name, tmp_path):
    code, _, expected = readme_examples(README.read_text())[name]
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert same_output(run.stdout, expected), (run.stdout, expected)


def test_output_comparison_allows_rounding_only():
    assert same_output("loss 5.5151, ref 5.5152\n", "loss 5.5151, ref 5.5151")
    assert not same_output("loss 5.5251, ref 5.5151", "loss 5.5151, ref 5.5151")
    assert not same_output("loss 5.5151, plain 5.5151", "loss 5.5151, ref 5.5151")
    assert not same_output("loss 5.5151", "loss 5.5151, ref 5.5151")
