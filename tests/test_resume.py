"""Checkpoint and resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd import checkpoint
from fastkd.data.synth import write
from fastkd.train import main

# synthetic: 256 images, batch 32 → I = 8; s = 0.7 → K = 5. Steps 11-15 advance on batches 5-9, 16-20 replay
# them, 21 advances again; checkpoints fall at replay boundaries (10, 15, 20) and epoch ends.
RUN = ["--interval", "0.7", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--quiet"]
PLAIN = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--quiet"]  # methods without spacing
FOLDER = ["--interval", "0.7", "--dataset", "tiny-imagenet", "--epochs", "2", "--batch-size", "32",
          "--teacher", "tiny", "--student", "tiny", "--quiet"]
KILL_AFTER = str(Path(__file__).with_name("kill_after.py"))


def cli(*args, kill_after=None):
    program = [KILL_AFTER, str(kill_after)] if kill_after else ["-m", "fastkd.train"]
    return subprocess.run([sys.executable, *program, *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_imagenet_folder(tmp_path_factory):
    # 4 classes × 64 real JPEGs: I = 8 batches of 32 per epoch, as with the in-memory synthetic data.
    return write(tmp_path_factory.mktemp("data") / "tiny", "tiny-imagenet", num_classes=4, per_class=64,
                 val_per_class=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of a command line, run once per module (in this process) and shared by every kill
    point."""
    runs = {}

    def run(args):
        if tuple(args) not in runs:
            out = tmp_path_factory.mktemp("full") / "full"
            assert main([*args, "--out", str(out), "--trace", str(out) + ".trace"]) == 0
            runs[tuple(args)] = out
        return runs[tuple(args)]

    return run


# (method, command line, kill after step, the checkpoint it resumes from). Every method; spaced at several points
# around a replay; spaced-self inside one; compiled steps (one case: each compiled process takes ~30 s on 2 cores);
# both file loaders; --save-every between boundaries.
CASES = {
    "spaced-before-replay": ("spaced", RUN, 13, 10),
    "spaced-inside-replay": ("spaced", RUN, 18, 15),
    "spaced-right-after-replay": ("spaced", RUN, 21, 20),
    "spaced-self-inside-replay": ("spaced-self", RUN, 18, 15),
    "baseline": ("baseline", PLAIN, 11, 8),
    "online-between-teacher-and-student": ("online", PLAIN, 21, 20),
    "offline-student-phase": ("offline", PLAIN, 19, 16),
    "self": ("self", PLAIN, 11, 8),
    "spaced-save-every": ("spaced", [*RUN, "--save-every", "3"], 13, 12),
    "spaced-loader-torch": ("spaced", [*FOLDER, "--loader", "torch"], 18, 15),
    "spaced-loader-dali": ("spaced", [*FOLDER, "--loader", "dali"], 18, 15),
    "spaced-compiled": ("spaced", [*RUN, "--compile"], 18, 15),
}


SLOW = {"spaced-loader-torch", "spaced-loader-dali", "spaced-compiled"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_killed_and_resumed_run_is_bit_identical(case, uninterrupted, tiny_imagenet_folder, tmp_path):
    method, args, kill_after, resumes_from = CASES[case]
    if "tiny-imagenet" in args:
        args = [*args, "--data-dir", str(tiny_imagenet_folder)]
    args = ["--method", method, *args]
    full = uninterrupted(args)
    out = tmp_path / "killed"
    # SIGKILL after step `kill_after`, then --resume (one process: the kill happens in a forked child).
    proc = cli(*args, "--out", str(out), "--trace", str(out) + ".trace", "--then", "--resume", str(out), "--trace",
               str(out) + ".trace", "--quiet", kill_after=kill_after)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"killed; checkpoint done={resumes_from}\n" in proc.stdout, proc.stdout
    for name in ("student",) if method in ("self", "spaced-self", "baseline") else ("student", "teacher"):
        a = torch.load(full / f"{name}.pt", weights_only=True)
        b = torch.load(out / f"{name}.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (out.parent / "killed.trace").read_text() == (full.parent / "full.trace").read_text()

    def records(path):
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
                for line in path.read_text().splitlines() if "summary" not in line]

    assert records(out / "metrics.jsonl") == records(full / "metrics.jsonl")


def test_resume_refuses_other_settings_but_accepts_more_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--method", "spaced", *RUN, "--out", str(out)]) == 0
    capsys.readouterr()
    before = (out / checkpoint.CHECKPOINT).read_bytes()
    assert main(["--resume", str(out), "--alpha", "0.9", "--method", "online", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "alpha" in err and "method" in err and len(err.strip().splitlines()) == 1
    assert (out / checkpoint.CHECKPOINT).read_bytes() == before  # nothing already saved is lost
    assert main(["--resume", str(out), "--epochs", "3", "--quiet"]) == 0


def test_resume_from_missing_or_corrupt_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert main(["--resume", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / checkpoint.CHECKPOINT).write_bytes(b"not a checkpoint")
    assert main(["--resume", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a readable fastkd checkpoint" in err and len(err.strip().splitlines()) == 1


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.CHECKPOINT
    checkpoint.save_atomic({"step": torch.tensor(1)}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(ValueError, match="No space left on device"):
        checkpoint.save_atomic({"step": torch.tensor(2)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from fastkd.step_records import StepRecorder

    real_record = StepRecorder.record
    calls = []

    def poisoned(books, loss, terms):
        calls.append(loss)
        if len(calls) == 12:  # as if the cross-entropy of this teacher step had overflowed
            loss, terms = loss * float("inf"), terms * torch.tensor([1.0, float("inf"), 1.0, 1.0])
        return real_record(books, loss, terms)

    monkeypatch.setattr(StepRecorder, "record", poisoned)
    out = tmp_path / "run"
    assert main(["--method", "spaced", *RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite training loss at step 12" in err and "teacher" in err and "cross-entropy" in err, err
    saved = torch.load(out / checkpoint.CHECKPOINT, weights_only=True)
    assert saved["done"] == 10  # the replay boundary before the bad step; nothing later was saved


# Runs fastkd.train (argv[2:]) and sends this process SIGTERM right after its N-th optimizer step (argv[1]), as if
# the signal arrived during that step: a trigger fixed to a step, not to a wall-clock moment.
SIGTERM_AFTER = r"""
import os, signal, sys
from fastkd import engine
from fastkd.train import main
after, count, real_run_step = int(sys.argv[1]), 0, engine.run_step
def run_step(*args, **kwargs):
    global count
    result = real_run_step(*args, **kwargs)
    count += 1
    if count == after:
        os.kill(os.getpid(), signal.SIGTERM)
    return result
engine.run_step = run_step
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_saves_at_the_next_step_boundary_and_the_run_resumes(tmp_path):
    import signal

    out, trace = tmp_path / "run", tmp_path / "run.trace"
    # Step 12 advances the teacher on batch 6, inside a window (K = 5): no regular checkpoint falls there.
    proc = subprocess.run([sys.executable, "-c", SIGTERM_AFTER, "12", "--method", "spaced", *RUN, "--epochs", "20",
                           "--out", str(out), "--trace", str(trace)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"fastkd.train: stopped by SIGTERM after step 12; checkpoint saved, "
                                                f"continue with --resume {out}"], proc.stderr[-3000:]
    assert torch.load(out / checkpoint.CHECKPOINT, weights_only=True)["done"] == 12  # saved right after step 12
    assert len(trace.read_text().splitlines()) == 12
    assert main(["--resume", str(out), "--epochs", "2", "--quiet", "--trace", str(trace)]) == 0
    assert len(trace.read_text().splitlines()) == 2 * 8 * 2  # continued from 12 to the end of 2 epochs


def _fingerprint(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_bad_input_matrix_leaves_an_existing_run_untouched(tmp_path, capsys):
    """Every case: exit code 2, one line naming the problem, and the run directory byte for byte as it was."""
    run = tmp_path / "run"
    assert main(["--method", "spaced", *RUN, "--out", str(run)]) == 0
    before = _fingerprint(run)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        ["--method", "spaced", "--nonsense-flag"],
        ["--method", "online", "--interval", "1.0"],
        ["--method", "spaced", "--interval", "-0.5"],
        ["--temperature", "0"],
        ["--alpha", "-0.2"],
        ["--dataset", "synthetic", "--batch-size", "100000"],
        ["--dataset", "tiny-imagenet", "--data-dir", str(tmp_path / "missing")],
        ["--dataset", "cifar100", "--data-dir", str(tmp_path / "empty")],
        ["--out", str(blocker / "run")],
        ["--resume", str(tmp_path / "empty")],
        ["--resume", str(run), "--temperature", "5"],
        ["--resume", str(run), "--precision", "bf16"],
        ["--resume", str(run), "--feature-loss", "none"],
        ["--method", "spaced", "--teacher", "resnet18", "--student", "tiny"],  # feature widths 512 and 64
        ["--method", "self", "--feature-loss", "dist"],
        ["--precision", "fp16"],
        ["--teacher", "torchvision:no_such_net"],
        ["--method", "offline", "--teacher-weights", str(tmp_path / "missing.pt")],
        ["--config", str(blocker)],  # not JSON
        ["--config", str(tmp_path / "missing.json")],
    ]
    for args in cases:
        capsys.readouterr()
        try:
            code = main([*args, "--quiet"] + ([] if "--out" in args or "--resume" in args else ["--out", str(run)]))
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "error" in err[0], (args, err)
        assert _fingerprint(run) == before, args
