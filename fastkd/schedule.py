"""Which role steps on which batch, and when: the spacing logic of every method, in pure Python.

Batches are named by their global index g = epoch·I + position (I batches per epoch). A schedule is a sequence of
`Step`s; the engine executes them in order and the trainer's --trace is their log.

    baseline     student: CE on g, for every g
    online       teacher: CE on g, then student distils on g from the logits of that teacher step (s = 0)
    spaced       teacher: CE on g; after every K = max(1, ⌊s·I⌋) teacher steps the student replays those K batches,
                 in order, distilling from the teacher as it is now; leftovers (< K) are replayed at the end
    offline      teacher: CE on every g; then the student distils on every g from the finished teacher
    self         one multi-exit net: self-distillation on every g
    spaced-self  one multi-exit net: deepest-head CE ("the teacher advances") on g; after every K advance steps it
                 replays those K batches with the full self-distillation loss; leftovers replayed at the end

teacher_version is the number of optimizer updates applied to the weights that produce the soft targets (the
teacher's, or the network's own for self methods); None for steps without soft targets.
"""
from dataclasses import dataclass
from typing import Iterator, Optional

from .step_terms import ADVANCE, CE, DISTILL_LIVE, REPLAY, SELF_DISTILL

METHODS = ("baseline", "online", "spaced", "offline", "self", "spaced-self")
SELF_METHODS = ("self", "spaced-self")
TEACHER_METHODS = ("online", "spaced", "offline")  # two networks: a teacher and a student
DEFAULT_INTERVAL = {"spaced": 1.5, "spaced-self": 4.0}


@dataclass(frozen=True)
class Step:
    role: str  # "teacher" | "student" | "self"
    batch: int  # global batch index g
    kind: str  # one of fastkd.step_terms.STEP_KINDS: "ce" | "distill_live" | "replay" | "advance" | "self_distill"
    teacher_version: Optional[int]


def interval_batches(interval: float, batches_per_epoch: int) -> int:
    """K = max(1, ⌊s·I⌋): how many teacher steps the teacher runs ahead before the student replays them."""
    if not interval > 0:
        raise ValueError(f"--interval must be > 0, got {interval}")
    return max(1, int(interval * batches_per_epoch))


def plan_steps(method: str, epochs: int, batches_per_epoch: int, interval: Optional[float] = None,
               replay_leftover: bool = True, train_teacher: bool = True) -> Iterator[Step]:
    """The steps of `method`; train_teacher=False (offline KD from given teacher weights): the student's alone."""
    total = epochs * batches_per_epoch
    if method == "baseline":
        yield from (Step("student", g, CE, None) for g in range(total))
    elif method == "online":
        for g in range(total):
            yield Step("teacher", g, CE, None)
            yield Step("student", g, DISTILL_LIVE, g)  # logits from the teacher's forward, before its update
    elif method == "offline":
        teacher_steps = total if train_teacher else 0
        yield from (Step("teacher", g, CE, None) for g in range(teacher_steps))
        yield from (Step("student", g, REPLAY, teacher_steps) for g in range(total))
    elif method == "self":
        yield from (Step("self", g, SELF_DISTILL, g) for g in range(total))
    elif method == "spaced":
        yield from _spaced(total, interval_batches(interval, batches_per_epoch), replay_leftover,
                           advance=lambda g: Step("teacher", g, CE, None),
                           replay=lambda g, updates: Step("student", g, REPLAY, updates), replay_updates=False)
    elif method == "spaced-self":
        yield from _spaced(total, interval_batches(interval, batches_per_epoch), replay_leftover,
                           advance=lambda g: Step("teacher", g, ADVANCE, None),
                           replay=lambda g, updates: Step("self", g, SELF_DISTILL, updates), replay_updates=True)
    else:
        raise ValueError(f"--method {method!r} is unknown; choose from {', '.join(METHODS)}")


def _spaced(total, k, replay_leftover, advance, replay, replay_updates):
    """Advance on every batch; after each k advances replay them in order. `replay_updates`: the replay steps
    update the soft-target weights too (one network in spaced-self), so they count as versions."""
    updates = 0  # optimizer updates applied so far to the weights that produce soft targets
    pending_start = 0  # first batch not yet replayed: the replay window is [pending_start, g]
    for g in range(total):
        yield advance(g)
        updates += 1
        if g + 1 - pending_start == k:
            for r in range(pending_start, g + 1):
                yield replay(r, updates)
                updates += replay_updates
            pending_start = g + 1
    if replay_leftover:
        for r in range(pending_start, total):
            yield replay(r, updates)
            updates += replay_updates
