"""Checkpoint and resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastkd import checkpoint
from fastkd.train import main

# synthetic: 256 images, batch 32 → I = 8; s = 0.7 → K = 5. Steps 11-15 advance on batches 5-9, 16-20 replay
# them, 21 advances again; checkpoints fall at replay boundaries (10, 15, 20) and epoch ends.
RUN = ["--interval", "0.7", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--quiet"]


def cli(*args, kill_after=None):
    env = {**os.environ, "FASTKD_TEST_KILL_AFTER_STEP": str(kill_after or 0)}
    return subprocess.run([sys.executable, "-m", "fastkd.train", *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module", params=["spaced", "spaced-self"])
def uninterrupted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "full"
    proc = cli("--method", request.param, *RUN, "--out", str(out), "--trace", str(out) + ".trace")
    assert proc.returncode == 0, proc.stderr
    return request.param, out


@pytest.mark.parametrize("kill_after", [13, 18, 21], ids=["before-replay", "inside-replay", "right-after-replay"])
def test_killed_and_resumed_run_is_bit_identical(uninterrupted, tmp_path, kill_after):
    method, full = uninterrupted
    out = tmp_path / "killed"
    killed = cli("--method", method, *RUN, "--out", str(out), "--trace", str(out) + ".trace", kill_after=kill_after)
    assert killed.returncode == -9  # SIGKILL
    resumed = cli("--resume", str(out), "--trace", str(out) + ".trace", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("student", "teacher") if method == "spaced" else ("student",):
        a = torch.load(full / f"{name}.pt", weights_only=True)
        b = torch.load(out / f"{name}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
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
    from fastkd import engine

    real_run_step = engine._run_step
    calls = []

    def poisoned(step, *args):
        loss, terms, logits = real_run_step(step, *args)
        calls.append(step)
        if len(calls) == 12:  # as if the cross-entropy of this teacher step had overflowed
            loss, terms = loss * float("inf"), terms * torch.tensor([1.0, float("inf"), 1.0, 1.0])
        return loss, terms, logits

    monkeypatch.setattr(engine, "_run_step", poisoned)
    out = tmp_path / "run"
    assert main(["--method", "spaced", *RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite training loss at step 12" in err and "teacher" in err and "cross-entropy" in err, err
    saved = torch.load(out / checkpoint.CHECKPOINT, weights_only=True)
    assert saved["done"] == 10  # the replay boundary before the bad step; nothing later was saved


def test_sigterm_saves_at_the_next_step_boundary_and_the_run_resumes(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastkd.train", "--method", "spaced", *RUN, "--epochs", "20",
                             "--out", str(out), "--trace", str(out) + ".trace"], stderr=subprocess.PIPE, text=True)
    trace = tmp_path / "run.trace"
    deadline = time.time() + 120
    while (not trace.exists() or len(trace.read_text().splitlines()) < 12) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    done = torch.load(out / checkpoint.CHECKPOINT, weights_only=True)["done"]
    assert done >= 12 and len(trace.read_text().splitlines()) == done
    resumed = cli("--resume", str(out), "--epochs", "2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr


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
