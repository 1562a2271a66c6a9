"""What a step records inside its graph (lr from the step count, loss total, non-finite guard), and compiled
steps that survive many runs in one process."""
import math

import pytest
import torch

from fastkd.data.registry import load_synthetic
from fastkd.models import build_model
from fastkd.optim import init_momentum, make_sgd
from fastkd.step_functions import LossSettings, StepFunctions
from fastkd.step_records import LabelGuard, LrSchedule, NonFiniteGuard, RunningMean, StepRecorder


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_device_lr_is_the_float64_closed_form_to_the_last_bit(schedule):
    model = torch.nn.Linear(3, 2)
    optimizer = make_sgd(model, 0.05, 0.9, 5e-4)
    lrs = LrSchedule(optimizer, schedule, 0.05, 37, torch.device("cpu"))
    for step in range(40):  # past the end too: the cosine stays at 0 there
        lrs.set_lr()
        host = 0.05 if schedule == "constant" else 0.5 * 0.05 * (1.0 + math.cos(math.pi * min(step, 37) / 37))
        expected = torch.tensor(host, dtype=torch.float32)
        assert torch.equal(optimizer.param_groups[0]["lr"], expected), step
        lrs.steps.add_(1)


def test_recorder_records_the_loss_and_the_first_non_finite_step():
    model = torch.nn.Linear(3, 2)
    losses, guard = RunningMean("cpu"), NonFiniteGuard("cpu", steps_done=5)
    books = StepRecorder(LrSchedule(make_sgd(model, 0.1, 0.9, 0.0), "constant", 0.1, 10, "cpu"), losses, guard)
    for loss in (1.5, 2.0, float("nan"), float("inf")):
        books.before()
        books.record(torch.tensor(loss), torch.tensor([loss, 1.0, 2.0, 3.0]))
    assert books.schedule.steps.item() == 4 and guard.done.item() == 9
    assert guard.first_bad.item() == 8  # the run's 8th step: the first NaN, not the later inf
    assert torch.isnan(guard.terms[0]) and torch.isnan(losses.total)


def test_the_label_guard_records_the_first_bad_step_and_label_and_passes_safe_labels():
    model = torch.nn.Linear(3, 2)
    guard = NonFiniteGuard("cpu", steps_done=5)
    books = StepRecorder(LrSchedule(make_sgd(model, 0.1, 0.9, 0.0), "constant", 0.1, 10, "cpu"), RunningMean("cpu"),
                      guard, LabelGuard(guard))
    seen = []
    for y in ([0, 3, 1], [2, 4, -1, 5], [-7, 0, 0]):  # 4 classes: the run's 7th step holds 4 first, then -1 and 5
        seen.append(books.labels(torch.tensor(y), classes=4).tolist())
        books.record(torch.tensor(1.0), torch.zeros(4))
    assert seen == [[0, 3, 1], [2, 0, 0, 0], [0, 0, 0]]  # every out-of-range label replaced, the others kept
    labels = books.label_guard
    assert (labels.first_bad.item(), labels.label.item(), labels.classes.item()) == (7, 4, 4)


@pytest.mark.slow
def test_compiled_steps_survive_more_runs_in_one_process_than_a_compile_cache_holds():
    """Each run brings a new optimizer, which the step's guards see: the runs must not share one compile cache,
    whose limit of 8 would end the ninth with a hard error under fullgraph. One run past the limit proves it (each
    run compiles: formerly 12 runs, 3 more compiles that proved nothing more)."""
    data = load_synthetic()
    x, y = data.train_x[:32], data.train_y[:32]
    for run in range(torch._dynamo.config.recompile_limit + 1):
        model = build_model("tiny", data.info)
        optimizer = make_sgd(model, 0.05, 0.9, 5e-4)
        init_momentum(optimizer)
        loss, *_ = StepFunctions(LossSettings(3.0, 0.3, 0.03), compile=True, device=torch.device("cpu"))(
            "ce", model, optimizer, x, y)
        assert torch.isfinite(loss), run
