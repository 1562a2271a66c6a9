"""A run's data is never lost: a fresh run refuses a folder that holds a run (unless --overwrite), default run names
never collide, checkpoint saves never share a temporary or leave one behind, and a resumed --tensorboard holds
exactly the uninterrupted run's scalars."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd import api, checkpoint
from fastkd.train import main

QUICK = ["--method", "spaced", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--quiet"]
KILL_AFTER = str(Path(__file__).with_name("kill_after.py"))


def state_of(folder: Path) -> dict:
    """Every file's bytes and every entry's mtime, the folder's own included."""
    entries = {".": (None, folder.stat().st_mtime_ns)}
    for p in sorted(folder.rglob("*")):
        entries[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
    return entries


@pytest.fixture
def run_with_user_file(tmp_path):
    out = tmp_path / "run"
    assert main([*QUICK, "--out", str(out), "--tensorboard"]) == 0
    (out / "notes.txt").write_text("the user's own file\n")
    return out


def test_second_run_into_the_same_out_is_refused_and_leaves_it_untouched(run_with_user_file, capsys):
    out = run_with_user_file
    before = state_of(out)
    capsys.readouterr()
    assert main([*QUICK, "--seed", "1", "--out", str(out), "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastkd.train: error: --out"), err
    assert f"--resume {out}" in err[0] and "--overwrite" in err[0], err
    assert state_of(out) == before


def test_overwrite_starts_afresh_and_keeps_the_users_other_files(run_with_user_file):
    out = run_with_user_file
    stray = out / ".checkpoint.pt.k3j2x9.tmp"  # a temporary left by a save that was killed
    stray.write_bytes(b"half a checkpoint")
    old_records = (out / "metrics.jsonl").read_text().splitlines()
    assert main([*QUICK, "--epochs", "2", "--out", str(out), "--overwrite"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 + 1 != len(old_records)  # only the new run's: 2 epochs × 2 roles, the summary
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert (out / "notes.txt").read_text() == "the user's own file\n"
    assert not stray.exists() and not (out / "tensorboard").exists()  # this run writes no board: the old one went


def test_overwrite_with_resume_is_one_clear_error(run_with_user_file, capsys):
    before = state_of(run_with_user_file)
    capsys.readouterr()
    assert main(["--resume", str(run_with_user_file), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "--resume" in err[0], err
    assert state_of(run_with_user_file) == before


def test_a_folder_without_run_files_is_used(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("kept\n")
    assert main([*QUICK, "--out", str(out)]) == 0
    assert (out / "student.pt").is_file() and (out / "notes.txt").read_text() == "kept\n"


def test_fit_refuses_a_folder_holding_a_run_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    settings = dict(method="baseline", train_data="synthetic", epochs=1, batch_size=32, out=out, quiet=True)
    fastkd.fit(**settings)
    before = state_of(out)
    with pytest.raises(ValueError, match=r"already holds a run .*--resume .*--overwrite"):
        fastkd.fit(**{**settings, "seed": 1})
    assert state_of(out) == before
    with pytest.raises(ValueError, match=r"--overwrite .*--resume"):
        fastkd.fit(**settings, resume=True, overwrite=True)
    summary = fastkd.fit(**{**settings, "seed": 1}, overwrite=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["summary"] == summary


def test_two_default_names_made_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api.time, "strftime", lambda _format: "20260101-000000")  # the same second, every call
    first, second, third = (api.default_out("spaced") for _ in range(3))
    assert [str(p) for p in (first, second, third)] == ["runs/20260101-000000-spaced", "runs/20260101-000000-spaced-2",
                                                        "runs/20260101-000000-spaced-3"]
    assert all(p.is_dir() for p in (first, second, third))


def test_default_out_is_not_left_behind_by_a_run_that_never_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*QUICK, "--alpha", "2"]) == 2
    assert list((tmp_path / "runs").iterdir()) == []


# ---- checkpoint saves ----------------------------------------------------------------------------------------------

def test_two_saves_at_once_never_share_a_temporary(tmp_path, monkeypatch):
    """A save that starts while another one into the same file is writing: each keeps its own temporary, both
    finish, and the later rename wins."""
    path = tmp_path / "checkpoint.pt"
    real_save, renamed = torch.save, []
    real_replace = checkpoint.os.replace

    def save_and_interleave(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if obj == {"who": "outer"}:
            checkpoint.save_atomic({"who": "inner"}, path)  # starts and ends inside the outer save

    def recording_replace(src, dst):
        renamed.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.torch, "save", save_and_interleave)
    monkeypatch.setattr(checkpoint.os, "replace", recording_replace)
    checkpoint.save_atomic({"who": "outer"}, path)
    assert len(renamed) == 2 and renamed[0] != renamed[1]
    assert torch.load(path, weights_only=True) == {"who": "outer"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_save_that_fails_midway_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"step": 1}, path)
    previous = path.read_bytes()
    real_save = torch.save

    def half_written(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", half_written)
    with pytest.raises(ValueError if isinstance(failure, OSError) else KeyboardInterrupt) as e:
        checkpoint.save_atomic({"step": 2}, path)
    if isinstance(failure, OSError):
        assert str(path) in str(e.value) and "No space left" in str(e.value)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# ---- resuming with --tensorboard -----------------------------------------------------------------------------------

def board_scalars(folder: Path) -> dict:
    """tag → [(step, value)] as written, in order, every event kept (no purge of out-of-order steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), purge_orphaned_data=False)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if "images_per_s" not in tag and tag != "summary/wall_s"}  # wall-clock


def test_resumed_tensorboard_holds_the_uninterrupted_runs_scalars(tmp_path):
    # online, I = 8, one epoch: step 15 ends the teacher's epoch 0 (its record is written) but is followed by the
    # student's step on the same batch, so the checkpoint before the kill after step 16 is the one at step 14.
    args = ["--method", "online", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--quiet"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main([*args, "--out", str(full), "--tensorboard"]) == 0
    proc = subprocess.run([sys.executable, KILL_AFTER, "16", *args, "--out", str(killed), "--tensorboard", "--then",
                           "--resume", str(killed), "--tensorboard", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "killed; checkpoint done=14\n" in proc.stdout, proc.stdout
    expected, resumed = board_scalars(full / "tensorboard"), board_scalars(killed / "tensorboard")
    assert resumed.keys() == expected.keys() and "teacher/train_loss" in resumed
    for tag, events in resumed.items():
        steps = [step for step, _ in events]
        assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {steps}"
        assert events == expected[tag], tag


def test_every_torchrun_rank_refuses_a_folder_holding_a_run(run_with_user_file):
    """Each rank checks the shared folder before any collective: all of them stop (none waits on the others),
    rank 0 says it once, and the folder stays as it was."""
    import os

    before = state_of(run_with_user_file)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "fastkd.train", *QUICK, "--device", "cpu", "--out", str(run_with_user_file)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastkd.train: error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0] and "--overwrite" in errors[0], proc.stderr[-3000:]
    assert state_of(run_with_user_file) == before
