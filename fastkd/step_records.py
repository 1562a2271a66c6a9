"""What the engine records at every step, held on the device and updated inside the step's own graph.

A training step is then one graph (one CUDA-graph replay) and nothing else: the lr for the step is computed there
from the role's step counter, and the loss total, the first non-finite step and the first out-of-range label are
updated there. No small launches around it, no host sync; the engine reads these tensors once per epoch record or
checkpoint.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .distributed import DataParallelRanks
from .schedule import Step
from .step_terms import MAX_TERMS, TERM_NAMES


def _static(t: Tensor) -> Tensor:
    # Written in place by every step: CUDA graphs may then keep it at its address instead of copying it per replay.
    # Private API on purpose: torch has no public way to mark a tensor static (torch.compiler offers none).
    torch._dynamo.mark_static_address(t, guard=False)
    return t


class RunningMean:
    """A role's losses summed on the device (no host sync per step), read once per epoch record."""

    def __init__(self, device):
        self.total, self.count = _static(torch.zeros((), device=device)), 0

    def rank_mean_total(self, parallel: DataParallelRanks) -> float:
        return float(parallel.all_sum(self.total.clone())) / parallel.size

    def read_and_reset(self, parallel: DataParallelRanks) -> float:
        """The mean over this role's steps since the last read, and over the ranks."""
        mean = self.rank_mean_total(parallel) / max(1, self.count)
        self.total.zero_()
        self.count = 0
        return mean


class NonFiniteGuard:
    """Remembers on the device the first step (1-based, over the whole run) whose loss was not finite, and that
    step's term values: no host sync per step."""

    def __init__(self, device, steps_done: int = 0):
        self.done = _static(torch.full((), steps_done, dtype=torch.int64, device=device))
        self.first_bad = _static(torch.full((), -1, dtype=torch.int64, device=device))
        self.terms = _static(torch.zeros(MAX_TERMS, device=device))

    def watch(self, loss: Tensor, terms: Tensor) -> None:
        self.done.add_(1)
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad, self.done, self.first_bad))
        self.terms.copy_(torch.where(bad, terms, self.terms))

    def check(self, plan: list[Step], parallel: DataParallelRanks) -> None:
        """Raise, on every rank, if any rank saw a non-finite loss: naming the step, the term and the rank."""
        step = int(self.first_bad)  # one host read, at checkpoint time
        problem = None
        if step >= 0:
            s = plan[step - 1]
            finite = torch.isfinite(self.terms).tolist()
            culprit = next((name for name, ok in zip(TERM_NAMES[s.kind], finite) if not ok), "the total")
            problem = (f"non-finite training loss at step {step} ({s.role} {s.kind} step on batch {s.batch}): "
                       f"{culprit} went non-finite")
        problems = [(rank, p) for rank, p in enumerate(parallel.gather_objects(problem)) if p]
        if problems:
            rank, problem = problems[0]
            where = f" (rank {rank})" if parallel.launched else ""
            raise ValueError(f"{problem}{where}; stopped, the last good checkpoint is kept")


class LabelGuard:
    """Remembers on the device the first step (numbered as NonFiniteGuard's) whose batch held a label outside
    [0, classes), and that label; the step trains on a safe label in its place, so the loss neither raises nor
    trips a device-side assert, and the engine stops the run at its next check. No host sync per step."""

    def __init__(self, guard: NonFiniteGuard):
        self.done = guard.done  # steps finished; the step being taken is done + 1
        device = guard.done.device
        self.first_bad = _static(torch.full((), -1, dtype=torch.int64, device=device))
        self.label = _static(torch.zeros((), dtype=torch.int64, device=device))
        self.classes = _static(torch.zeros((), dtype=torch.int64, device=device))

    def watch(self, y: Tensor, classes: int) -> Tensor:
        """y with every label outside [0, classes) replaced by 0; the first such step and label recorded."""
        bad = (y < 0) | (y >= classes)
        first = bad.any() & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, self.done + 1, self.first_bad))
        value = y.gather(0, bad.int().argmax().reshape(1)).reshape(())  # argmax: the first bad one; no sync
        self.label.copy_(torch.where(first, value, self.label))
        self.classes.copy_(torch.where(first, classes, self.classes))
        return y.masked_fill(bad, 0)

    def check(self, plan: list[Step], per_epoch: int, parallel: DataParallelRanks) -> None:
        """Raise, on every rank, if any rank saw a label out of range: the earliest such step over the ranks."""
        step = int(self.first_bad)  # one host read, at checkpoint time
        problem = None
        if step >= 0:
            s = plan[step - 1]
            epoch, position = divmod(s.batch, per_epoch)
            problem = (step, f"label {int(self.label)} out of range [0, {int(self.classes)}) at step {step} "
                             f"({s.role} {s.kind} step on batch {s.batch}: epoch {epoch}, position {position})")
        problems = [(p[0], rank, p[1]) for rank, p in enumerate(parallel.gather_objects(problem)) if p]
        if problems:
            _, rank, problem = min(problems)
            where = f" (rank {rank})" if parallel.launched else ""
            raise ValueError(f"{problem}{where}; stopped, the last good checkpoint is kept")


class LrSchedule:
    """A role's lr schedule on the device: its optimizer's lr tensors, set before each step from its step count."""

    def __init__(self, optimizer: torch.optim.SGD, schedule: str, base_lr: float, total_steps: int, device):
        self.lrs = [_static(group["lr"]) for group in optimizer.param_groups]
        self.cosine = schedule == "cosine"
        # float64, so the lr tensor gets the float32 rounding of the exact schedule.
        self.base_lr = torch.tensor(base_lr, dtype=torch.float64, device=device)
        self.total_steps = torch.tensor(float(total_steps), dtype=torch.float64, device=device)
        self.steps = _static(torch.zeros((), dtype=torch.int64, device=device))  # optimizer steps done

    def set_lr(self) -> None:
        """The lr before this step: per-step cosine decay to 0 over the role's steps, or constant."""
        lr = self.base_lr
        if self.cosine:
            progress = torch.minimum(self.steps.double(), self.total_steps) / self.total_steps.clamp(min=1)
            lr = 0.5 * self.base_lr * (1.0 + torch.cos(math.pi * progress))
        for tensor in self.lrs:
            tensor.copy_(lr)


class StepRecorder:
    """What one kind of step records, passed into it: the lr schedule of the role that steps, the running loss of
    its schedule role, and the run's guards. `labels` checks the batch's labels before the loss, `before` runs
    ahead of the optimizer update, `record` after it."""

    def __init__(self, schedule: LrSchedule, losses: RunningMean, guard: NonFiniteGuard,
                 label_guard: Optional[LabelGuard] = None):
        self.schedule, self.losses, self.guard, self.label_guard = schedule, losses, guard, label_guard

    def labels(self, y: Tensor, classes: int) -> Tensor:
        """The labels the loss may take (out-of-range ones replaced and recorded), with a label guard; else y."""
        return self.label_guard.watch(y, classes) if self.label_guard is not None else y

    def before(self) -> None:
        self.schedule.set_lr()

    def record(self, loss: Tensor, terms: Tensor) -> None:
        self.schedule.steps.add_(1)
        self.losses.total.add_(loss.detach())
        self.guard.watch(loss.detach(), terms)
