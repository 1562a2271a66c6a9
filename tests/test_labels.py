"""Every batch's labels are range-checked inside the step (fastkd.step_records.LabelGuard), not only the first
batch's: a bad label in a later batch stops the run at the next check with one line naming the step, the batch and the
label, and the checkpoint left is the last one before that step."""
import dataclasses

import pytest
import torch
from torch import nn

import fastkd
from fastkd import checkpoint, engine
from fastkd.data.base import BatchIdentities
from fastkd.schedule import plan_steps
from fastkd.train import main

# synthetic: 256 images of 4 classes, batch 32 → I = 8 batches per epoch.
PER_EPOCH = 8
RUN = dict(train_data="synthetic", epochs=2, batch_size=32, teacher="tiny", student="tiny", device="cpu")


def poison_batch(monkeypatch, epoch: int, position: int, label: int, place: int = 3) -> None:
    """Every step on batch (epoch, position) sees `label` at `place` of the batch, as if the dataset held it."""
    real = engine.batches_along

    def poisoned(*args, **kwargs):
        for step, batch in real(*args, **kwargs):
            if (batch.epoch, batch.position) == (epoch, position):
                y = batch.y.clone()
                y[place] = label
                batch = dataclasses.replace(batch, y=y)
            yield step, batch

    monkeypatch.setattr(engine, "batches_along", poisoned)


def first_step_on(method: str, interval, batch: int) -> int:
    """The 1-based number of the plan's first step on global batch `batch`."""
    plan = plan_steps(method, RUN["epochs"], PER_EPOCH, interval)
    return next(n for n, step in enumerate(plan, 1) if step.batch == batch)


INTERVALS = {"baseline": None, "online": None, "spaced": 0.7, "offline": None, "self": None, "spaced-self": 0.7}


@pytest.mark.parametrize("method", list(INTERVALS))
@pytest.mark.parametrize("label", [-3, 4])  # below the range, and = classes
def test_a_bad_label_in_a_later_batch_stops_every_method_before_its_step_is_checkpointed(
        tmp_path, monkeypatch, method, label):
    poison_batch(monkeypatch, epoch=1, position=2, label=label)
    bad_step = first_step_on(method, INTERVALS[method], PER_EPOCH + 2)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as failure:
        fastkd.fit(method, **RUN, interval=INTERVALS[method], out=out, quiet=True, save_every=3)
    message = str(failure.value)
    assert "\n" not in message
    assert f"label {label} out of range [0, 4) at step {bad_step} " in message, message
    assert "epoch 1, position 2" in message and "last good checkpoint is kept" in message, message
    saved = checkpoint.load_checkpoint(out)
    # Checked at every checkpoint point (here at least every 3 steps): the last save is just before the bad step.
    assert bad_step - 3 <= saved["done"] < bad_step


def test_the_cli_stops_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    poison_batch(monkeypatch, epoch=0, position=6, label=-3)
    out = tmp_path / "run"
    code = main(["--method", "spaced", "--interval", "0.7", "--dataset", "synthetic", "--epochs", "2",
                 "--batch-size", "32", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    # K = 5: steps 1-5 advance the teacher on batches 0-4, 6-10 replay them (a checkpoint at 10), 12 advances on 6.
    bad_step = first_step_on("spaced", 0.7, 6)
    assert bad_step == 12
    assert err[0] == ("fastkd.train: error: label -3 out of range [0, 4) at step 12 (teacher ce step on batch 6: "
                      "epoch 0, position 6); stopped, the last good checkpoint is kept"), err
    assert checkpoint.load_checkpoint(out)["done"] == 10


class Squares(torch.utils.data.Dataset):
    """64 seeded 1×8×8 images with labels i % 4, except sample `bad` whose label is `label`."""

    def __init__(self, bad=None, label=None):
        self.x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        self.bad, self.label = bad, label

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return self.x[i], self.label if i == self.bad else i % 4


def test_a_user_dataset_with_a_bad_label_past_the_first_batch_stops_naming_it(tmp_path):
    # The sample at place 5 of batch (epoch 0, position 2): the first-batch check in fit cannot see it.
    bad = int(BatchIdentities(64, 16, 0, "Squares").indices(0, 2)[5])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^label 4 out of range \[0, 4\) at step 3 \(student ce step on batch 2: "
                                         r"epoch 0, position 2\); stopped, the last good checkpoint is kept$"):
        fastkd.fit("baseline", student=model, train_data=Squares(bad, 4), test_data=Squares(), epochs=2,
                   batch_size=16, seed=0, device="cpu", out=out, quiet=True, save_every=1, num_workers=0)
    assert checkpoint.load_checkpoint(out)["done"] == 2


@pytest.mark.slow
def test_the_guarded_steps_compile_whole_once_and_stop_on_a_bad_label(tmp_path, monkeypatch):
    """fullgraph: a graph break in the label check would raise; after each kind's first call the run goes on under
    "fail_on_recompile", so a recompile per batch (e.g. on the bad batch) would raise too."""
    torch._dynamo.reset()
    real_call, calls = engine.StepFunctions.__call__, {}

    def strict_call(self, kind, *args, **kwargs):
        calls[kind] = calls.get(kind, 0) + 1
        if calls[kind] == 1:
            return real_call(self, kind, *args, **kwargs)
        with torch.compiler.set_stance("fail_on_recompile"):
            return real_call(self, kind, *args, **kwargs)

    monkeypatch.setattr(engine.StepFunctions, "__call__", strict_call)
    poison_batch(monkeypatch, epoch=1, position=2, label=4)
    bad_step = first_step_on("spaced", 0.7, PER_EPOCH + 2)
    with pytest.raises(ValueError, match=rf"^label 4 out of range \[0, 4\) at step {bad_step} "):
        fastkd.fit("spaced", **RUN, interval=0.7, compile=True, out=tmp_path / "run", quiet=True)
    assert set(calls) == {"ce", "replay"} and min(calls.values()) > 8, calls


RANK_SCRIPT = """
import os, sys
import torch
import fastkd
from fastkd import engine
from fastkd.data.base import Batch

real = engine.batches_along
rank = int(os.environ["RANK"])


def poisoned(*args, **kwargs):  # rank 1's share of batch (0, 2) holds label -3; rank 0's labels are all fine
    for step, batch in real(*args, **kwargs):
        if rank == 1 and (batch.epoch, batch.position) == (0, 2):
            y = batch.y.clone()
            y[3] = -3
            batch = Batch(batch.x, y, batch.indices, batch.epoch, batch.position)
        yield step, batch


engine.batches_along = poisoned
try:
    fastkd.fit("baseline", student="tiny", train_data="synthetic", epochs=1, batch_size=64, device="cpu",
               out=sys.argv[1], quiet=True, save_every=1)
except ValueError as e:
    # One write of the whole line: the ranks share stderr's pipe, and print's two writes (the text, then the newline)
    # of two ranks can interleave into one line.
    os.write(2, f"rank {rank}: {e}\\n".encode())
    sys.exit(2)
"""


@pytest.mark.slow
def test_every_data_parallel_rank_stops_with_the_rank_that_saw_the_bad_label(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "poisoned_rank.py"
    script.write_text(RANK_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "run")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("rank "))
    expected = ("label -3 out of range [0, 4) at step 3 (student ce step on batch 2: epoch 0, position 2) (rank 1); "
                "stopped, the last good checkpoint is kept")
    assert errors == [f"rank 0: {expected}", f"rank 1: {expected}"], proc.stderr[-3000:]
    assert checkpoint.load_checkpoint(tmp_path / "run")["done"] == 2
