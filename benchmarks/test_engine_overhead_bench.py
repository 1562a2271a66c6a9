"""The engine's host overhead per step: `engine.train` on a trivial compiled model against a bare Python loop that
calls the same compiled step (with the same in-graph step records) on the same batches from the same batch source.

Both include the loader's hand-off; the engine adds what it does around a step (the schedule walk, counters, each
epoch's evaluation and checkpoint). Each loop runs 1 and 5 epochs of 200 steps: the difference of the two medians
is 800 steady-state steps, with the set-up (the steps' compile, from the inductor cache, ±0.2 s from run to run)
cancelled out (20 steps an epoch and one round with FASTKD_BENCH_REHEARSE=1, the GPU check's rehearsal). Goal:
the engine takes at most 10% more per step. `python benchmarks/report.py results.json`
prints the two per-step times.
"""
import dataclasses
import os

import pytest
import torch

from fastkd import engine
from fastkd.config import Config
from fastkd.data import TensorBatches
from fastkd.data.registry import load_synthetic
from fastkd.models import build_model
from fastkd.optim import init_momentum, make_sgd
from fastkd.step_functions import LossSettings, StepFunctions
from fastkd.step_records import LrSchedule, NonFiniteGuard, RunningMean, StepRecorder

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
REHEARSE = os.environ.get("FASTKD_BENCH_REHEARSE") == "1"
# 6400 training samples: 200 steps of 32 (640 in the rehearsal: 20 steps)
DATA = load_synthetic(train_per_class=160 if REHEARSE else 1600, test_per_class=4)
CFG = Config(method="baseline", dataset="synthetic", student="tiny", batch_size=32, device=DEVICE.type,
             compile=True).resolve_defaults()
STEPS = DATA.info.train_len // CFG.batch_size


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_model("tiny", DATA.info).to(DEVICE)


def _bare_loop(model, epochs):
    batches = TensorBatches(DATA, CFG.batch_size, CFG.seed, DEVICE)
    optimizer = make_sgd(model, CFG.lr, CFG.momentum, CFG.weight_decay)
    init_momentum(optimizer)
    schedule = LrSchedule(optimizer, CFG.lr_schedule, CFG.lr, epochs * STEPS, DEVICE)
    recorder = StepRecorder(schedule, RunningMean(DEVICE), NonFiniteGuard(DEVICE))
    steps = StepFunctions(LossSettings(CFG.temperature, CFG.alpha, CFG.beta), compile=True, device=DEVICE)
    for batch in batches.stream((e, p) for e in range(epochs) for p in range(STEPS)):
        steps("ce", model, optimizer, batch.x, batch.y, recorder=recorder)
    if CUDA:
        torch.cuda.synchronize()


def _engine_run(model, epochs, out):
    batches = TensorBatches(DATA, CFG.batch_size, CFG.seed, DEVICE)
    engine.train(dataclasses.replace(CFG, epochs=epochs), batches, {"student": model}, out, DEVICE, quiet=True)
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("epochs", [1, 5])
@pytest.mark.parametrize("loop", ["bare", "engine"])
def test_engine_host_overhead_per_step(benchmark, loop, epochs, student, tmp_path):
    runs = iter(range(1000))
    if loop == "bare":
        def run():
            _bare_loop(student, epochs)
    else:
        def run():
            _engine_run(student, epochs, tmp_path / str(next(runs)))
    run()  # compiles (the two loops share the step's graph)
    benchmark.extra_info.update(loop=loop, epochs=epochs, steps=epochs * STEPS,
                                device=torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)")
    benchmark.pedantic(run, rounds=1 if REHEARSE else 3, warmup_rounds=0)
