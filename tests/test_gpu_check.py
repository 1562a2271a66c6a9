"""The GPU check's driver (benchmarks/gpu_check.py) on stand-in steps: results that survive a kill, per-step limits
that kill the whole process group, --only / --from, skips for missing packages; and the benchmarks' out-of-memory
errors, which fail a case instead of skipping it. The real steps run in CI as `gpu_check.sh --rehearse`."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check")
Step = gpu_check.Step


def py(code):
    return [sys.executable, "-c", code]


def run(tmp_path, monkeypatch, steps, *args):
    monkeypatch.setenv("OUT", str(tmp_path))
    code = gpu_check.main(["--rehearse", *args], steps=steps)
    records = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    return code, records


def test_each_step_appends_its_line_and_rewrites_the_summary_the_moment_it_ends(tmp_path, monkeypatch):
    # The second step checks, while it runs, that the first one's results are already on disk.
    check = ("import json, pathlib; out = pathlib.Path(r'%s'); "
             "assert json.loads((out / 'steps.jsonl').read_text())['step'] == 'first'; "
             "summary = (out / 'summary.md').read_text(); "
             "assert '| first | ok |' in summary and '| second | running |' in summary" % tmp_path)
    steps = [Step("first", 10, 60, [py("print('one')")]), Step("second", 10, 60, [py(check)])]
    code, records = run(tmp_path, monkeypatch, steps)
    assert code == 0 and [(r["step"], r["status"]) for r in records] == [("first", "ok"), ("second", "ok")]
    assert set(records[0]) == {"step", "status", "seconds", "reason", "log"}
    assert "\none\n# exit status 0 after" in (tmp_path / "first.log").read_text()


def test_a_step_over_its_limit_is_killed_with_its_children_and_recorded_as_timeout(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    spawn = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(600)']); open(r'%s', 'w').write(str(child.pid)); time.sleep(600)" % pid_file)
    steps = [Step("hangs", 10, 5, [py(spawn)]), Step("after", 10, 60, [py("pass")])]
    code, records = run(tmp_path, monkeypatch, steps)
    assert code == 1 and [(r["step"], r["status"]) for r in records] == [("hangs", "timeout"), ("after", "ok")]
    assert "limit of 5 s" in records[0]["reason"]
    child = int(pid_file.read_text())
    for _ in range(500):  # SIGKILL is delivered at once; the child may take a moment to be scheduled and die
        if gone_or_zombie(child):
            break
        time.sleep(0.01)
    assert gone_or_zombie(child)


def gone_or_zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_failing_step_is_recorded_and_the_steps_after_it_still_run(tmp_path, monkeypatch):
    steps = [Step("breaks", 10, 60, [py("raise SystemExit(4)"), py("print('not reached')")]),
             Step("after", 10, 60, [py("pass")])]
    code, records = run(tmp_path, monkeypatch, steps)
    assert code == 1 and [(r["step"], r["status"]) for r in records] == [("breaks", "failed"), ("after", "ok")]
    assert "exit status 4" in records[0]["reason"]
    assert "not reached" not in (tmp_path / "breaks.log").read_text()
    assert "- breaks: failed: exit status 4" in (tmp_path / "summary.md").read_text()


def test_a_second_call_with_from_finishes_what_a_first_call_with_only_began(tmp_path, monkeypatch):
    steps = [Step(name, 10, 60, [py("pass")]) for name in ("a", "b", "c")]
    run(tmp_path, monkeypatch, steps, "--only", "a,c")
    assert "| b | not run |" in (tmp_path / "summary.md").read_text()
    code, records = run(tmp_path, monkeypatch, steps, "--from", "b")
    assert code == 0 and [r["step"] for r in records] == ["a", "c", "b", "c"]
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in "abc")


@pytest.mark.parametrize("args,message", [
    (["--only", "a,nope"], "gpu_check: error: --only: unknown step 'nope' (steps: a, b)"),
    (["--from", "nope"], "gpu_check: error: --from: unknown step 'nope' (steps: a, b)"),
    (["--only", "a", "--from", "b"], "gpu_check: error: --only and --from exclude each other"),
])
def test_an_unknown_step_is_one_line_exit_2_and_runs_nothing(tmp_path, monkeypatch, capsys, args, message):
    steps = [Step(name, 10, 60, [py("pass")]) for name in ("a", "b")]
    monkeypatch.setenv("OUT", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(args, steps=steps)
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "steps.jsonl").exists()


def test_a_step_that_needs_a_missing_optional_package_is_skipped_with_why(tmp_path, monkeypatch):
    (tmp_path / "packages.json").write_text(json.dumps({"missing_optional": ["nvidia.dali"]}))
    steps = [Step("dali", 10, 60, [py("raise SystemExit(1)")], needs=("nvidia.dali",)),
             Step("torch", 10, 60, [py("pass")], needs=("numpy",))]
    code, records = run(tmp_path, monkeypatch, steps)
    assert code == 0 and [(r["step"], r["status"]) for r in records] == [("dali", "skipped"), ("torch", "ok")]
    assert "- dali: skipped: nvidia.dali does not import" in (tmp_path / "summary.md").read_text()


def test_a_missing_core_package_in_the_preflight_stops_the_check(tmp_path, monkeypatch):
    steps = [Step("preflight", 10, 60, [py(f"raise SystemExit({gpu_check.CORE_MISSING})")]),
             Step("after", 10, 60, [py("pass")])]
    code, records = run(tmp_path, monkeypatch, steps)
    assert code == 1 and [(r["step"], r["status"]) for r in records] == [("preflight", "failed")]
    assert "| after | not run |" in (tmp_path / "summary.md").read_text()


def test_the_pytest_skips_of_a_step_are_listed_under_could_not_run(tmp_path, monkeypatch):
    steps = [Step("tier", 10, 60, [py("print('SKIPPED [3] tests/test_gpu.py:29: needs a CUDA GPU')")])]
    run(tmp_path, monkeypatch, steps)
    assert "- tier: skipped [3] tests/test_gpu.py:29: needs a CUDA GPU" in (tmp_path / "summary.md").read_text()


def test_a_benchmark_file_cut_short_by_a_killed_step_is_named_in_the_summary_and_the_check_goes_on(
        tmp_path, monkeypatch):
    steps = [Step("killed", 10, 60, [py("open(r'%s', 'w').close()" % (tmp_path / "step_bench.json"))]),
             Step("after", 10, 60, [py("pass")])]
    code, records = run(tmp_path, monkeypatch, steps)
    assert code == 0 and [r["step"] for r in records] == ["killed", "after"]
    assert "step_bench.json could not be read (JSONDecodeError" in (tmp_path / "summary.md").read_text()


def test_a_step_the_default_tier_covers_only_collects_in_the_rehearsal_and_runs_on_the_gpu(tmp_path, monkeypatch):
    steps = [Step("tests", 10, 60, [py("import sys; print('arguments', sys.argv[1:])")], collect_in_rehearsal=True)]
    run(tmp_path, monkeypatch, steps)
    assert "arguments ['--collect-only']" in (tmp_path / "tests.log").read_text()
    monkeypatch.setenv("OUT", str(tmp_path / "gpu"))
    assert gpu_check.main([], steps=steps) == 0
    assert "arguments []" in (tmp_path / "gpu" / "tests.log").read_text()
    assert {s.name for s in gpu_check.STEPS if s.collect_in_rehearsal} == {"kernel-tests", "linear-tests"}


def test_the_steps_fit_one_600_s_device_call_with_a_minute_to_spare():
    assert sum(step.gpu_s for step in gpu_check.STEPS) <= 540
    assert gpu_check.STEPS[0].name == "preflight" and gpu_check.STEPS[1].name == "warm"


def test_where_pip_cannot_install_fastkd_it_is_imported_from_a_path_shim(tmp_path):
    failing_pip = [sys.executable, "-c", "raise SystemExit(1)"]
    assert load("install").main(tmp_path, failing_pip) == 0
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fastkd-path"))
    proc = subprocess.run([sys.executable, "-c", "import fastkd.kernels.kd_loss as k; print(k.__file__)"], env=env,
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "fastkd-path" / "fastkd" / "kernels" / "kd_loss.py")


def test_every_step_after_the_shim_is_laid_out_imports_from_it_and_the_summary_says_so(tmp_path, monkeypatch):
    make_shim = "import pathlib; pathlib.Path(r'%s').mkdir(); pathlib.Path(r'%s').write_text('')" % (
        tmp_path / "fastkd-path", tmp_path / "fastkd-path" / "shimmed_probe.py")
    steps = [Step("preflight", 10, 60, [py(make_shim), py("import shimmed_probe")]),
             Step("after", 10, 60, [py("import shimmed_probe")])]
    code, records = run(tmp_path, monkeypatch, steps)
    assert code == 0 and [r["status"] for r in records] == ["ok", "ok"]
    assert "pip could not install fastkd" in (tmp_path / "summary.md").read_text()


class Benchmark:
    """Stands in for pytest-benchmark's fixture: runs the function once."""
    extra_info = {}

    def pedantic(self, fn, rounds, warmup_rounds):
        fn()


def out_of_memory(*args):
    raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")


def raises_out_of_memory(case, *args):
    try:
        case(Benchmark(), *args)
    except torch.OutOfMemoryError:
        return True
    except pytest.skip.Exception as skip:  # the case skipped itself: what this must not do
        pytest.fail(f"the out-of-memory error became a skip: {skip}")
    return False


def test_out_of_memory_fails_a_kd_loss_benchmark_case_instead_of_skipping_it(monkeypatch):
    bench = load("test_kd_loss_bench")
    monkeypatch.setitem(bench.PROVIDERS, "fastkd", out_of_memory)
    assert raises_out_of_memory(bench.test_kd_loss_forward_backward, (4, 8, torch.float32), "fastkd")


def test_out_of_memory_fails_a_kd_loss_linear_benchmark_case_instead_of_skipping_it(monkeypatch):
    bench = load("test_kd_loss_linear_bench")
    monkeypatch.setattr(bench, "SHAPE", (4, 8, 16))
    monkeypatch.setattr(bench, "_peak_extra_bytes", out_of_memory)
    assert raises_out_of_memory(bench.test_kd_loss_linear_forward_backward, "fastkd_linear")


def test_the_preflight_imports_every_fastkd_module_and_runs_none(tmp_path):
    """It imports each module pkgutil finds, `python -m` entry points (__main__) included: one that runs its
    program on import (an argparse exit, here) stops the check in its first step."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "preflight.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout + proc.stderr
