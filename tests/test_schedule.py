"""The spacing schedule of every method, checked from the step log alone (as --trace writes it).

The expected logs are step tables written out by hand, not computed: I = 4 batches per epoch, 2 epochs (global
batches 0..7). A token is role letter + batch [+ "@" teacher_version]: T = teacher (spaced-self: the advance step,
deepest-head CE), S = student, X = the one network's self-distillation step (self, spaced-self replay).

The official code (SunGL001/Spaced-KD, online_KD/train_space.py) trains the teacher on batches and, after every
K = ⌊s·I⌋ teacher steps, has the student replay those K batches; a last partial interval is never replayed. That is
fastkd's `no_final_replay=True`. fastkd's default replays the leftover batches at the end.
"""
import pytest

from fastkd.schedule import METHODS, interval_batches, plan_steps


def parse(tokens):
    """"S3@4" -> ("student", 3, 4); "T5" -> ("teacher", 5, None)."""
    roles = {"T": "teacher", "S": "student", "X": "self"}
    log = []
    for token in tokens.split():
        batch, _, version = token[1:].partition("@")
        log.append((roles[token[0]], int(batch), int(version) if version else None))
    return log


def logged(method, epochs, per_epoch, interval=None, replay_leftover=True):
    return [(x.role, x.batch, x.teacher_version)
            for x in plan_steps(method, epochs, per_epoch, interval, replay_leftover=replay_leftover)]


# (method, s, replay_leftover) -> the log, written by hand. Spaced: K = ⌊s·4⌋ = 2, 4, 6; the student's version is
# the number of teacher steps taken so far. Spaced-self: every step (advance or replay) updates the one network, so
# a replay step's version counts every step before it.
HAND_TABLES = {
    # K = 2: four windows of two; nothing left over, so the official and fastkd's default agree.
    ("spaced", 0.5, True): "T0 T1 S0@2 S1@2 T2 T3 S2@4 S3@4 T4 T5 S4@6 S5@6 T6 T7 S6@8 S7@8",
    ("spaced", 0.5, False): "T0 T1 S0@2 S1@2 T2 T3 S2@4 S3@4 T4 T5 S4@6 S5@6 T6 T7 S6@8 S7@8",
    # K = 4: one window per epoch.
    ("spaced", 1.0, True): "T0 T1 T2 T3 S0@4 S1@4 S2@4 S3@4 T4 T5 T6 T7 S4@8 S5@8 S6@8 S7@8",
    ("spaced", 1.0, False): "T0 T1 T2 T3 S0@4 S1@4 S2@4 S3@4 T4 T5 T6 T7 S4@8 S5@8 S6@8 S7@8",
    # K = 6: one full window, then 6 and 7 are left over.
    ("spaced", 1.5, True): "T0 T1 T2 T3 T4 T5 S0@6 S1@6 S2@6 S3@6 S4@6 S5@6 T6 T7 S6@8 S7@8",
    ("spaced", 1.5, False): "T0 T1 T2 T3 T4 T5 S0@6 S1@6 S2@6 S3@6 S4@6 S5@6 T6 T7",  # the official quirk
    ("spaced-self", 0.5, True): "T0 T1 X0@2 X1@3 T2 T3 X2@6 X3@7 T4 T5 X4@10 X5@11 T6 T7 X6@14 X7@15",
    ("spaced-self", 0.5, False): "T0 T1 X0@2 X1@3 T2 T3 X2@6 X3@7 T4 T5 X4@10 X5@11 T6 T7 X6@14 X7@15",
    ("spaced-self", 1.0, True): "T0 T1 T2 T3 X0@4 X1@5 X2@6 X3@7 T4 T5 T6 T7 X4@12 X5@13 X6@14 X7@15",
    ("spaced-self", 1.0, False): "T0 T1 T2 T3 X0@4 X1@5 X2@6 X3@7 T4 T5 T6 T7 X4@12 X5@13 X6@14 X7@15",
    ("spaced-self", 1.5, True): "T0 T1 T2 T3 T4 T5 X0@6 X1@7 X2@8 X3@9 X4@10 X5@11 T6 T7 X6@14 X7@15",
    ("spaced-self", 1.5, False): "T0 T1 T2 T3 T4 T5 X0@6 X1@7 X2@8 X3@9 X4@10 X5@11 T6 T7",
}


@pytest.mark.parametrize("method,interval,replay_leftover", list(HAND_TABLES),
                         ids=[f"{m}-s{s}-{'leftover' if r else 'official'}" for m, s, r in HAND_TABLES])
def test_spaced_schedules_match_the_hand_written_tables(method, interval, replay_leftover):
    got = logged(method, 2, 4, interval, replay_leftover)
    assert got == parse(HAND_TABLES[(method, interval, replay_leftover)])


UNSPACED_TABLES = {  # the same 2 epochs of 4 batches
    "baseline": "S0 S1 S2 S3 S4 S5 S6 S7",
    # The student distils from the logits of the teacher step on the same batch, before that step's update.
    "online": "T0 S0@0 T1 S1@1 T2 S2@2 T3 S3@3 T4 S4@4 T5 S5@5 T6 S6@6 T7 S7@7",
    "offline": "T0 T1 T2 T3 T4 T5 T6 T7 S0@8 S1@8 S2@8 S3@8 S4@8 S5@8 S6@8 S7@8",
    "self": "X0@0 X1@1 X2@2 X3@3 X4@4 X5@5 X6@6 X7@7",
}


@pytest.mark.parametrize("method", list(UNSPACED_TABLES))
def test_unspaced_schedules_match_the_hand_written_tables(method):
    assert logged(method, 2, 4) == parse(UNSPACED_TABLES[method])


def test_every_method_has_a_hand_written_table():
    assert set(UNSPACED_TABLES) | {m for m, _, _ in HAND_TABLES} == set(METHODS)


EDGE_TABLES = {  # (method, epochs, I, s) -> the log
    ("spaced", 2, 3, 0.01): "T0 S0@1 T1 S1@2 T2 S2@3 T3 S3@4 T4 S4@5 T5 S5@6",  # K = ⌊0.03⌋ clamps to 1
    ("spaced", 2, 3, 5.0): "T0 T1 T2 T3 T4 T5 S0@6 S1@6 S2@6 S3@6 S4@6 S5@6",  # K = 15 > 6: all left over
    ("spaced", 3, 1, 1.0): "T0 S0@1 T1 S1@2 T2 S2@3",  # I = 1
    ("spaced", 2, 7, 1.5): ("T0 T1 T2 T3 T4 T5 T6 T7 T8 T9 S0@10 S1@10 S2@10 S3@10 S4@10 S5@10 S6@10 S7@10 S8@10 "
                            "S9@10 T10 T11 T12 T13 S10@14 S11@14 S12@14 S13@14"),  # s·I = 10.5
    ("spaced-self", 2, 3, 0.01): "T0 X0@1 T1 X1@3 T2 X2@5 T3 X3@7 T4 X4@9 T5 X5@11",
}


@pytest.mark.parametrize("method,epochs,per_epoch,interval", list(EDGE_TABLES))
def test_edge_settings_match_the_hand_written_tables(method, epochs, per_epoch, interval):
    assert logged(method, epochs, per_epoch, interval) == parse(EDGE_TABLES[(method, epochs, per_epoch, interval)])


ODD_SETTINGS = [  # (epochs, batches per epoch, s)
    (3, 7, 1.5),  # s·I = 10.5: not a multiple of 1/I
    (4, 5, 0.3),  # s < 1
    (2, 6, 5.0),  # s > epochs: everything is a leftover
    (5, 1, 1.0),  # I = 1
    (3, 4, 0.01),  # K clamps to 1
]


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
