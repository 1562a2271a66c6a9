"""fastkd.fit on a user's own models and Dataset: the README example as written, its schedule, exact replay of a
Dataset that augments from the global generators (in workers, across shards, after a kill), and bad input."""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from readme_example import example_code
from torch import nn

import fastkd
from fastkd.data.base import DatasetInfo
from fastkd.data.user import DatasetBatches

EXAMPLE = str(Path(__file__).with_name("readme_example.py"))
# The README example: 1,497 training digits in batches of 64 → I = 23; s = 1.5 → K = 34; 8 epochs.
PER_EPOCH, K, EPOCHS = 23, 34, 8


def example(mode: str, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, EXAMPLE, mode], cwd=folder, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    proc = example("full", folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "runs", proc


def test_readme_example_runs_as_written(readme_run):
    runs, proc = readme_run
    assert proc.stdout.splitlines()[-1].startswith("teacher ") and "student " in proc.stdout
    summary = json.loads((runs / "digits-spaced" / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["steps"] == 2 * EPOCHS * PER_EPOCH
    config = json.loads((runs / "digits-spaced" / "config.json").read_text())
    assert (config["dataset"], config["teacher"], config["student"]) == ("python:DigitsCrops", "python:Sequential",
                                                                          "python:Sequential")
    assert config["dataset_info"]["num_classes"] == 10 and config["dataset_info"]["train_len"] == 1497
    for name in ("teacher", "student"):  # the saved state dicts load into the user's model
        torch.load(runs / "digits-spaced" / f"{name}.pt", weights_only=True)


def test_readme_example_trace_advances_k_batches_then_replays_the_same_samples(readme_run):
    runs, _ = readme_run
    trace = [json.loads(line) for line in (runs / "digits-spaced.trace").read_text().splitlines()]
    total = EPOCHS * PER_EPOCH
    expected_roles = []
    for start in range(0, total, K):  # K advances, then their K replays (the last window is the leftover)
        window = min(K, total - start)
        expected_roles += ["teacher"] * window + ["student"] * window
    assert [r["role"] for r in trace] == expected_roles
    teacher = {(r["epoch"], r["position"]): r for r in trace if r["role"] == "teacher"}
    student = [r for r in trace if r["role"] == "student"]
    assert [(r["epoch"], r["position"]) for r in student] == list(teacher)  # every batch, in the teacher's order
    for r in student:
        advanced = teacher[(r["epoch"], r["position"])]
        assert r["samples"] == advanced["samples"] and len(r["samples"]) == 64
    done = 0  # each replay distils from the teacher as it is after its window's advances
    for i, r in enumerate(trace):
        done += r["role"] == "teacher"
        if r["role"] == "student":
            assert r["teacher_version"] == done, i


def test_readme_example_killed_in_a_replay_and_resumed_is_bit_identical(readme_run, tmp_path):
    runs, _ = readme_run
    # Steps 69–102 advance, 103–136 replay them: killed inside that replay, resumed from the boundary at 102.
    resumed = example("kill:120", tmp_path)  # killed in a forked child, then resumed
    assert resumed.returncode == 0 and "killed\n" in resumed.stdout, resumed.stderr[-3000:]
    mine, full = tmp_path / "runs", runs
    assert (mine / "digits-spaced.trace").read_text() == (full / "digits-spaced.trace").read_text()
    for name in ("teacher", "student"):
        a = torch.load(mine / "digits-spaced" / f"{name}.pt", weights_only=True)
        b = torch.load(full / "digits-spaced" / f"{name}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in b), name

    def records(folder):
        lines = [json.loads(line) for line in (folder / "digits-spaced" / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.get("summary", r).items() if k not in ("images_per_s", "wall_s")} for r in lines]

    assert records(mine) == records(full)


# ---- exact replay of a user Dataset -------------------------------------------------------------------------------

def readme_namespace() -> dict:
    """The README example's definitions (its classes and functions), without running its fit call."""
    code = example_code()
    namespace = {"__name__": "readme_definitions"}
    exec(compile(code[:code.index("torch.manual_seed(0)")], "README.md", "exec"), namespace)
    return namespace


class EveryGenerator(torch.utils.data.Dataset):
    """Draws from torch, random and numpy in every sample: all three must be reproducible by identity."""

    def __init__(self, n: int = 96):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        noise = torch.rand(1, 4, 4) + random.random() + float(np.random.rand())
        return noise + i, i % 3


def batches(dataset, shard_id=0, num_shards=1, num_workers=0, batch_size=32):
    info = DatasetInfo("EveryGenerator", 3, 1, 4, len(dataset), 0, 0, False)
    return DatasetBatches(dataset, dataset, info, batch_size, seed=5, device=torch.device("cpu"),
                          shard_id=shard_id, num_shards=num_shards, num_workers=num_workers)


def test_a_replayed_user_batch_equals_the_first_fetch_pixel_for_pixel_in_workers_or_not():
    identities = [(0, 0), (0, 1), (1, 2), (0, 0), (0, 1)]
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    in_process = list(batches(EveryGenerator()).stream(identities))
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()  # the caller's generators are put back
    in_workers = list(batches(EveryGenerator(), num_workers=2).stream(identities))
    for a, b in zip(in_process, in_workers):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert torch.equal(in_process[0].x, in_process[3].x) and torch.equal(in_process[1].x, in_process[4].x)
    assert not torch.equal(in_process[0].x - in_process[0].x.floor(), in_process[1].x - in_process[1].x.floor())
    fresh = in_process[0].x[0] - in_process[0].x[0].floor()
    assert len(torch.unique(fresh)) > 8  # the noise is really drawn per sample


def test_two_shards_of_a_user_batch_are_the_one_process_batch_pixel_for_pixel():
    dataset = EveryGenerator()
    whole = list(batches(dataset).stream([(2, 1)]))[0]
    shards = [list(batches(dataset, shard_id=r, num_shards=2).stream([(2, 1)]))[0] for r in (0, 1)]
    assert torch.equal(torch.cat([s.x for s in shards]), whole.x)
    assert torch.equal(torch.cat([s.indices for s in shards]), whole.indices)


class Stateful(torch.utils.data.Dataset):
    """Breaks the contract: its 'augmentation' follows a counter carried between calls."""

    def __init__(self, n=128):
        self.n, self.calls = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls += 1
        return torch.full((1, 8, 8), float(self.calls % 7)), i % 10


def test_check_replay_passes_a_good_dataset_and_names_one_that_breaks_the_contract(tmp_path):
    ns = readme_namespace()
    ok = fastkd.fit(method="spaced", teacher=ns["small_cnn"](8), student=ns["small_cnn"](8),
                    train_data=ns["DigitsCrops"](train=True), test_data=ns["DigitsCrops"](train=False), epochs=1,
                    interval=0.2, batch_size=128, out=tmp_path / "good", quiet=True, check_replay=True,
                    num_workers=0)
    assert ok["steps"] == 2 * 11
    with pytest.raises(ValueError, match=r"check_replay: .*Stateful breaks the replay contract"):
        fastkd.fit(method="spaced", teacher=ns["small_cnn"](8), student=ns["small_cnn"](8), train_data=Stateful(),
                   test_data=Stateful(), epochs=1, interval=0.5, batch_size=32, out=tmp_path / "bad", quiet=True,
                   check_replay=True, num_workers=0)


class MultiExit(nn.Module):
    """A user's two-exit network: (logits of both heads, features mapped to the deepest width)."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
        self.head1, self.head2, self.adapt = nn.Linear(8, 10), nn.Linear(16, 10), nn.Linear(8, 16)

    def forward(self, x):
        h1 = self.block1(x)
        h2 = self.block2(h1)
        f1, f2 = h1.mean((2, 3)), h2.mean((2, 3))
        return [self.head1(f1), self.head2(f2)], [self.adapt(f1), f2]


def test_spaced_self_trains_a_user_multi_exit_network(tmp_path):
    ns = readme_namespace()
    summary = fastkd.fit(method="spaced-self", student=MultiExit(), train_data=ns["DigitsCrops"](train=True),
                         test_data=ns["DigitsCrops"](train=False), epochs=2, batch_size=128, out=tmp_path / "run",
                         quiet=True, num_workers=0)
    assert summary["steps"] == 2 * 2 * 11 and len(summary["heads_top1"]) == 2


# ---- bad input: one ValueError each, before any training step, nothing written -------------------------------------

class Returns(torch.utils.data.Dataset):
    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return self.item


IMAGE = torch.ones(1, 8, 8)
BAD_INPUTS = {
    "dataset-returns-a-dict": (dict(train_data=Returns({"image": IMAGE, "label": 1})), r"Returns\[0\] returned dict"),
    "dataset-returns-numpy": (dict(train_data=Returns((np.ones((1, 8, 8)), 1))), r"an image of type ndarray"),
    "dataset-returns-float-label": (dict(train_data=Returns((IMAGE, 0.5))), r"a label of type float"),
    "model-width-below-labels": (dict(student=nn.Sequential(nn.Flatten(), nn.Linear(64, 5)),
                                      teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 5))),
                                 r"output 5 classes but the first training batch holds label"),
    "models-disagree": (dict(teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 12))),
                        r"teacher and student disagree on the class count: 12 vs 10"),
    "model-fails": (dict(student=nn.Linear(3, 10)), r"student Linear failed on a batch of shape \(32, 1, 8, 8\)"),
    "self-with-single-exit": (dict(method="self", teacher=None), r"self / spaced-self: forward returns"),
    "unknown-setting": (dict(epoch=3), r"unknown setting epoch"),
    "bad-type": (dict(epochs="3"), r"epochs must be int, got '3'"),
    "bad-value": (dict(alpha=1.5), r"--alpha must be in \[0, 1\]"),
    "no-test-data": (dict(test_data=None), r"test_data= is required"),
    "teacher-for-baseline": (dict(method="baseline"), r"trains no separate teacher"),
}


class Labelled(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.full((1, 8, 8), float(i)), i % 10


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_value_error_before_anything_is_written(tmp_path, case):
    overrides, message = BAD_INPUTS[case]
    args = dict(method="spaced", teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                student=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), train_data=Labelled(), test_data=Labelled(),
                epochs=1, batch_size=32, out=tmp_path / "run", quiet=True, num_workers=0)
    args.update(overrides)
    with pytest.raises(ValueError, match=message):
        fastkd.fit(**args)
    assert not (tmp_path / "run").exists()
