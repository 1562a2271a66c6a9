"""The engine's host overhead per step: `engine.train` on a trivial compiled model against a bare Python loop that
calls the same compiled step (with the same in-graph books) on the same batches from the same batch source.

Both include the loader's hand-off; the engine adds what it does around a step (the schedule walk, counters, the
epoch's evaluation and checkpoint, amortised over the epoch's 200 steps). Goal: at most 10% more time per step.
`python benchmarks/report.py results.json` prints the ratio of the two medians.
"""
import os

import pytest
import torch

from fastkd import engine
from fastkd.books import LrSchedule, NonFiniteGuard, RunningMean, StepBooks
from fastkd.config import Config
from fastkd.data import TensorBatches
from fastkd.data.registry import load_synthetic
from fastkd.models import build_model
from fastkd.optim import init_momentum, make_sgd
from fastkd.updates import LossSettings, Updates

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DATA = load_synthetic(train_per_class=1600, test_per_class=4)  # 6400 training samples: 200 steps of 32
CFG = Config(method="baseline", dataset="synthetic", student="tiny", epochs=1, batch_size=32, device=DEVICE.type,
             compile=True).resolve_defaults()
STEPS = DATA.info.train_len // CFG.batch_size


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_model("tiny", DATA.info).to(DEVICE)


def _bare_loop(model):
    batches = TensorBatches(DATA, CFG.batch_size, CFG.seed, DEVICE)
    optimizer = make_sgd(model, CFG.lr, CFG.momentum, CFG.weight_decay)
    init_momentum(optimizer)
    books = StepBooks(LrSchedule(optimizer, CFG.lr_schedule, CFG.lr, STEPS, DEVICE), RunningMean(DEVICE),
                      NonFiniteGuard(DEVICE))
    updates = Updates(LossSettings(CFG.temperature, CFG.alpha, CFG.beta), compile=True, device=DEVICE)
    for batch in batches.stream((0, p) for p in range(STEPS)):
        updates("ce", model, optimizer, batch.x, batch.y, books=books)
    if CUDA:
        torch.cuda.synchronize()


def _engine_run(model, out):
    batches = TensorBatches(DATA, CFG.batch_size, CFG.seed, DEVICE)
    engine.train(CFG, batches, {"student": model}, out, DEVICE, quiet=True)
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("loop", ["bare", "engine"])
def test_engine_host_overhead_per_step(benchmark, loop, student, tmp_path):
    runs = iter(range(1000))
    run = (lambda: _bare_loop(student)) if loop == "bare" else (lambda: _engine_run(student, tmp_path / str(next(runs))))
    run()  # compiles (the two loops share the step's graph)
    benchmark.extra_info.update(loop=loop, steps=STEPS,
                                device=torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)")
    benchmark.pedantic(run, rounds=5, warmup_rounds=0)
