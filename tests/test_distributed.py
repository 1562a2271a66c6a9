"""torchrun with gloo on CPU: two data-parallel ranks train the same global batches as one process, end with
bit-identical weights, compile under DDP, and resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastkd import train as train_cli
from fastkd.engine import _checkpoint_due
from fastkd.schedule import steps

# 256 samples in global batches of 64: 4 batches per epoch, 32 samples per rank.
RUN = ["--teacher", "tiny", "--student", "tiny", "--train-subset", "256", "--batch-size", "64", "--epochs", "2",
       "--lr", "0.2", "--quiet", "--device", "cpu"]


def torchrun(args, nproc=2, kill_after=None):
    env = {k: v for k, v in os.environ.items() if k != "FASTKD_TEST_KILL_AFTER_STEP"}
    env["OMP_NUM_THREADS"] = "1"
    if kill_after:
        env["FASTKD_TEST_KILL_AFTER_STEP"] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "fastkd.train", *args],
                          env=env, capture_output=True, text=True, check=False, timeout=900)


def summary(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["summary"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    runs = {}
    for method in ("spaced", "spaced-self"):
        out = tmp_path_factory.mktemp(f"ddp-{method}")
        proc = torchrun(["--method", method, *RUN, "--out", str(out / "run"), "--trace", str(out / "trace")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[method] = (out, proc)
    return runs


@pytest.mark.parametrize("method", ["spaced", "spaced-self"])
def test_two_ranks_train_the_global_batches_of_one_process(method, two_rank_runs, tmp_path):
    out, proc = two_rank_runs[method]
    assert proc.stdout.count(f"fastkd {method}:") == 1  # rank 0 alone reports
    assert train_cli.main(["--method", method, *RUN, "--out", str(tmp_path / "run"),
                           "--trace", str(tmp_path / "trace")]) == 0
    two, one = (out / "trace").read_text().splitlines(), (tmp_path / "trace").read_text().splitlines()
    assert len(two) == len(one) > 8 and two == one  # same roles, batches, samples and teacher versions, in order
    assert len(json.loads(two[0])["samples"]) == 64  # each line is a whole global batch, gathered from both ranks


@pytest.mark.parametrize("method", ["spaced", "spaced-self"])
def test_parameters_are_identical_across_ranks(method, two_rank_runs):
    out, _ = two_rank_runs[method]
    result = summary(out / "run")
    assert result["ranks"] == 2
    for net, prints in result["rank_fingerprints"].items():
        assert len(prints) == 2 and prints[0] == prints[1], net
    assert set(result["rank_fingerprints"]) == ({"student"} if method == "spaced-self" else {"teacher", "student"})


def test_killed_distributed_run_resumes_to_the_same_weights(two_rank_runs, tmp_path):
    reference, _ = two_rank_runs["spaced"]
    run, trace = tmp_path / "run", tmp_path / "trace"
    args = ["--method", "spaced", *RUN, "--out", str(run), "--trace", str(trace)]
    killed = torchrun(args, kill_after=7)  # killed in the first replay; its checkpoint at step 6 survives
    assert killed.returncode != 0 and (run / "checkpoint.pt").is_file()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["done"] == 6  # the teacher's 6 steps, then replay
    resumed = torchrun(["--resume", str(run), "--trace", str(trace)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trace.read_text() == (reference / "trace").read_text()
    for name in ("teacher", "student"):
        mine = torch.load(run / f"{name}.pt", weights_only=True)
        theirs = torch.load(reference / "run" / f"{name}.pt", weights_only=True)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def test_sigterm_to_torchrun_saves_at_the_next_boundary_and_stops(tmp_path):
    run = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k != "FASTKD_TEST_KILL_AFTER_STEP"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fastkd.train", "--method", "spaced", *RUN, "--epochs", "200", "--out", str(run)],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert sum("fastkd.train: stopped by SIGTERM" in line for line in stderr.splitlines()) == 1, stderr[-3000:]
    done = torch.load(run / "checkpoint.pt", weights_only=True)["done"]
    plan = list(steps("spaced", 200, 4, 1.5))
    assert done < len(plan)  # stopped early, at a regular checkpoint (epoch end or replay boundary)
    assert _checkpoint_due(plan, done, 4, save_every=None, forced=False)


def test_compiled_steps_under_ddp(two_rank_runs, tmp_path):
    reference, _ = two_rank_runs["spaced"]
    proc = torchrun(["--method", "spaced", "--compile", *RUN, "--epochs", "1", "--out", str(tmp_path / "run"),
                     "--trace", str(tmp_path / "trace")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = summary(tmp_path / "run")
    for prints in result["rank_fingerprints"].values():
        assert prints[0] == prints[1]
    # The compiled run's global batches are the eager run's first epoch of steps.
    eager_first_epoch = [json.loads(line) for line in (reference / "trace").read_text().splitlines()]
    compiled = [json.loads(line) for line in (tmp_path / "trace").read_text().splitlines()]
    assert [r["samples"] for r in compiled if r["role"] == "teacher"] == \
        [r["samples"] for r in eager_first_epoch if r["role"] == "teacher" and r["epoch"] == 0]


def test_a_batch_that_does_not_split_across_ranks_is_one_error(tmp_path):
    proc = torchrun(["--method", "spaced", *RUN, "--batch-size", "63", "--out", str(tmp_path / "run")])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastkd.train: error:")]
    assert errors == ["fastkd.train: error: --batch-size 63 does not split evenly across 2 data-parallel ranks"]
