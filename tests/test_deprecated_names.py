"""Names renamed by issue #29 keep working for one release, each with a DeprecationWarning naming its successor."""
import importlib
import sys

import pytest
import torch
from torch import nn

from fastkd import distributed, step_functions, step_records
from fastkd.optim import make_sgd


@pytest.mark.parametrize("old, new, names", [
    ("fastkd.books", step_records, {"StepBooks": "StepRecorder", "LrSchedule": "LrSchedule"}),
    ("fastkd.updates", step_functions, {"Updates": "StepFunctions", "UPDATES": "STEP_FUNCTIONS",
                                        "replay_step": "replay_step"}),
])
def test_old_module_warns_and_gives_the_new_objects(old, new, names):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.__name__):
        module = importlib.import_module(old)
    for old_name, new_name in names.items():
        assert getattr(module, old_name) is getattr(new, new_name)


def test_data_parallel_is_data_parallel_ranks_with_a_warning():
    with pytest.warns(DeprecationWarning, match="DataParallelRanks"):
        assert distributed.DataParallel is distributed.DataParallelRanks


def test_old_replay_kind_and_books_keyword_still_step_with_a_warning():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fns = step_functions.StepFunctions(step_functions.LossSettings(3.0, 0.3, 0.03), False, torch.device("cpu"))
    losses = []
    for kind, keyword in (("distill", "books"), ("replay", "recorder")):
        model = nn.Linear(4, 3)
        model.load_state_dict(student.state_dict())
        optimizer = make_sgd(model, 0.1, 0.9, 0.0)
        if kind == "distill":
            with pytest.warns(DeprecationWarning) as caught:
                losses.append(fns(kind, model, teacher, optimizer, x, y, **{keyword: None})[0])
            assert {"'replay'" in str(w.message) or "recorder=" in str(w.message) for w in caught} == {True}
            assert len(caught) == 2
        else:
            losses.append(fns(kind, model, teacher, optimizer, x, y, **{keyword: None})[0])
    assert torch.equal(losses[0], losses[1])
