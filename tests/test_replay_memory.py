"""Replay regenerates batches instead of buffering them: the memory held in tensors and arrays does not grow with
s, counted exactly (the bytes of every live tensor and numpy array, at the moment before each replay) for the
in-memory source and for both file loaders in a real run."""
import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastkd
from fastkd import engine
from fastkd.config import Config
from fastkd.data.synth import write


def live_tensor_bytes() -> int:
    """Bytes of every tensor and numpy array alive in Python, each memory block counted once (views and
    torch.from_numpy share theirs): a buffer of batches shows, whatever shape, dtype or container it keeps them in."""
    blocks = {}
    for o in gc.get_objects():
        kind = type(o)
        if issubclass(kind, torch.Tensor) and o.layout == torch.strided and o.device.type != "meta":
            storage = o.untyped_storage()
            try:
                key, size = (o.device.type, storage.data_ptr()), storage.nbytes()
            except RuntimeError:  # a fake tensor left over from a compile earlier in the process: no memory
                continue
        elif issubclass(kind, np.ndarray) and o.base is None:
            key, size = ("cpu", o.__array_interface__["data"][0]), o.nbytes
        else:
            continue
        blocks[key] = max(size, blocks.get(key, 0))
    return sum(blocks.values())


def peak_tensor_bytes(tmp_path, interval, monkeypatch):
    peak, last_role = 0, None
    real_run_step = engine.run_step

    def measuring_run_step(step, role, roles, fns, batch, *rest):
        # A buffer would be fullest just before a replay starts (the teacher has run K steps ahead): measure there.
        nonlocal peak, last_role
        if last_role == "teacher" and step.role == "student":
            peak = max(peak, live_tensor_bytes())
        last_role = step.role
        return real_run_step(step, role, roles, fns, batch, *rest)

    monkeypatch.setattr(engine, "run_step", measuring_run_step)
    gc.collect()
    already_live = live_tensor_bytes()  # left over by earlier tests in this process
    cfg = Config(method="spaced", interval=interval, dataset="synthetic", epochs=5, batch_size=64, teacher="tiny",
                 student="tiny", device="cpu")
    summary = fastkd.fit(**cfg.to_dict(), out=tmp_path / f"s{interval}", quiet=True)
    assert summary["steps"] == 2 * 5 * 4
    return peak - already_live


def test_peak_tensor_memory_is_flat_from_s_half_to_s_four(tmp_path, monkeypatch):
    short = peak_tensor_bytes(tmp_path, 0.5, monkeypatch)  # K = 2 batches pending before each replay
    long = peak_tensor_bytes(tmp_path, 4.0, monkeypatch)  # K = 16
    print(f"peak tensor bytes: s=0.5 {short}, s=4 {long}")
    assert short == long, (short, long)


# ---------------------------------------------------------------------------------------------------------------
# The file loaders: the same count in a real CLI run in its own process (DataLoader workers, DALI pipelines).
# ---------------------------------------------------------------------------------------------------------------

MEASURE = r"""
import sys
from fastkd import engine
from fastkd.train import main
from test_replay_memory import live_tensor_bytes
peak, last_role, kept = 0, None, []
real_run_step = engine.run_step
def measured_run_step(step, role, roles, fns, batch, *rest):
    global peak, last_role
    if sys.argv[1] == "hoard":  # a control: keep every batch the loader yields, as a replay buffer would
        kept.append(batch.x.clone())
    if last_role == "teacher" and step.role == "student":  # a buffer is fullest just before a replay
        peak = max(peak, live_tensor_bytes())
    last_role = step.role
    return real_run_step(step, role, roles, fns, batch, *rest)
engine.run_step = measured_run_step
assert main(sys.argv[2:]) == 0
print("peak_bytes", peak)
"""
BATCH = 32
ONE_BATCH = BATCH * 3 * 64 * 64 * 4  # float32 64×64 RGB: 1.5 MiB


@pytest.fixture(scope="module")
def tiny_imagenet_folder(tmp_path_factory):
    # 2 classes × 128 JPEGs: I = 8 batches of 32; s = 4 keeps 32 batches (48 MiB of images) pending before a replay,
    # 8 times the torch loader's 4 batches in flight (formerly 256 JPEGs a class and 64 batches: twice the steps).
    return write(tmp_path_factory.mktemp("data") / "tiny", "tiny-imagenet", num_classes=2, per_class=128,
                 val_per_class=2)


def peak_bytes(folder, loader, interval, tmp_path, hoard=False) -> int:
    args = ["--method", "spaced", "--dataset", "tiny-imagenet", "--data-dir", str(folder), "--loader", loader,
            "--interval", str(interval), "--epochs", "5", "--batch-size", str(BATCH), "--teacher", "tiny",
            "--student", "tiny", "--device", "cpu", "--quiet", "--out", str(tmp_path / f"{loader}-{interval}-{hoard}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                              os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", MEASURE, "hoard" if hoard else "plain", *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split("peak_bytes")[-1])


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_peak_tensor_memory_of_a_file_loader_run_does_not_grow_from_s_0_3_to_s_4(tiny_imagenet_folder, loader,
                                                                                  tmp_path):
    short = peak_bytes(tiny_imagenet_folder, loader, 0.3, tmp_path)  # K = 2 batches pending
    long = peak_bytes(tiny_imagenet_folder, loader, 4.0, tmp_path)  # K = 32 batches pending
    print(f"peak tensor bytes, --loader {loader}: s=0.3 {short}, s=4 {long}, "
          f"difference {(long - short) / ONE_BATCH:+.2f} batches")
    # Counted, not sampled: what may differ is only the batches the loader has fetched ahead. The torch loader's
    # DataLoader has at most num_workers × prefetch_factor = 2 × 2 batches in flight, and those that arrived early
    # wait in this process as tensors; DALI's outputs are copied into the batch and dropped. A buffer of the pending
    # batches would add 30.
    in_flight = 4 if loader == "torch" else 0
    assert abs(long - short) <= in_flight * ONE_BATCH, (loader, short, long)
    if loader == "torch":  # the count sees a buffer: holding every batch the run trains on shows up
        hoarded = peak_bytes(tiny_imagenet_folder, loader, 4.0, tmp_path, hoard=True)
        assert hoarded - long >= 32 * ONE_BATCH, (long, hoarded)
