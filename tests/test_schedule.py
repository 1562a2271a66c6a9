"""The spacing schedule of every method, checked from the step log alone (as --trace writes it)."""
import pytest

from fastkd.schedule import METHODS, interval_batches, plan_steps


def expected_log(method, epochs, per_epoch, interval=None):
    """An independent statement of the schedule: (role, batch, teacher_version) triples."""
    total = epochs * per_epoch
    if method == "baseline":
        return [("student", g, None) for g in range(total)]
    if method == "online":
        return [x for g in range(total) for x in (("teacher", g, None), ("student", g, g))]
    if method == "offline":
        return [("teacher", g, None) for g in range(total)] + [("student", g, total) for g in range(total)]
    if method == "self":
        return [("self", g, g) for g in range(total)]
    # spaced / spaced-self: windows of K advances, each followed by its replay (the last window may be short).
    k = max(1, int(interval * per_epoch))
    log, advances = [], 0
    for start in range(0, total, k):
        window = range(start, min(start + k, total))
        log += [("teacher", g, None) for g in window]
        advances += len(window)
        for g in window:
            # spaced: the teacher's update count; spaced-self: every earlier step updated the one network.
            version = advances if method == "spaced" else len(log)
            log.append(("student" if method == "spaced" else "self", g, version))
    return log


ODD_SETTINGS = [  # (epochs, batches per epoch, s)
    (3, 7, 1.5),  # s·I = 10.5: not a multiple of 1/I
    (4, 5, 0.3),  # s < 1
    (2, 6, 5.0),  # s > epochs: everything is a leftover
    (5, 1, 1.0),  # I = 1
    (3, 4, 0.01),  # K clamps to 1
]


@pytest.mark.parametrize("epochs,per_epoch,interval", ODD_SETTINGS)
@pytest.mark.parametrize("method", METHODS)
def test_schedule_matches_its_definition(method, epochs, per_epoch, interval):
    s = interval if method in ("spaced", "spaced-self") else None
    got = [(x.role, x.batch, x.teacher_version) for x in plan_steps(method, epochs, per_epoch, s)]
    assert got == expected_log(method, epochs, per_epoch, s)


@pytest.mark.parametrize("epochs,per_epoch,interval", ODD_SETTINGS)
@pytest.mark.parametrize("method", ["spaced", "spaced-self"])
def test_each_teacher_batch_is_replayed_exactly_once_in_teacher_order(method, epochs, per_epoch, interval):
    log = list(plan_steps(method, epochs, per_epoch, interval))
    advanced = [x.batch for x in log if x.role == "teacher"]
    replayed = [x.batch for x in log if x.role != "teacher"]
    assert advanced == list(range(epochs * per_epoch))
    assert replayed == advanced
    # The student never sees a batch before the teacher has advanced on it.
    seen = set()
    for x in log:
        if x.role == "teacher":
            seen.add(x.batch)
        else:
            assert x.batch in seen


def test_spaced_teacher_version_is_teacher_steps_taken_before_the_replay():
    log = list(plan_steps("spaced", 3, 7, 1.5))
    for i, x in enumerate(log):
        if x.role == "student":
            assert x.teacher_version == sum(1 for y in log[:i] if y.role == "teacher")


def test_without_final_replay_the_last_partial_interval_is_dropped():
    log = list(plan_steps("spaced", 3, 7, 1.5, replay_leftover=False))  # K = 10, 21 batches: 1 left over
    replayed = [x.batch for x in log if x.role == "student"]
    assert replayed == list(range(20))


def test_interval_batches_floor_and_bad_values():
    assert interval_batches(1.5, 11) == 16
    assert interval_batches(0.01, 11) == 1
    with pytest.raises(ValueError, match="--interval"):
        interval_batches(0.0, 11)
