"""The two-network feature term of the official online/spaced KD code: β·feature(f_student, f_teacher detached)
between the pooled penultimate features. Its value against torch.dist and the nn.*Loss modules computed apart from
fastkd, its gradient, its precision under bf16, the taps that read the features, and the settings around it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd import api
from fastkd.config import Config
from fastkd.data.registry import load_synthetic
from fastkd.distributed import SINGLE_PROCESS
from fastkd.models import build_model
from fastkd.models.features import FeatureTap, feature_taps
from fastkd.optim import init_momentum, make_sgd
from fastkd.schedule import Step
from fastkd.step_functions import LossSettings, StepFunctions, soft_loss
from fastkd.step_records import LrSchedule, NonFiniteGuard, RunningMean, StepRecorder
from fastkd.step_terms import TERM_NAMES
from fastkd.train import main

BETA = 0.03
DATA = load_synthetic()
X, Y = DATA.train_x[:32], DATA.train_y[:32]


def pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A zoo net's pooled penultimate feature, by its own stages: not through fastkd's tap."""
    for stage in model.stages:
        x = stage(x)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def networks(seed=0):
    torch.manual_seed(seed)
    student, teacher = build_model("tiny", DATA.info), build_model("tiny", DATA.info).eval()
    optimizer = make_sgd(student, 0.05, 0.9, 5e-4)
    init_momentum(optimizer)
    return student, teacher, optimizer


def replay(name: str, student, teacher, optimizer, amp=None):
    updates = StepFunctions(LossSettings(3.0, 0.3, BETA, feature_loss=name), False, torch.device("cpu"),
                      precision="bf16" if amp else "fp32")
    with feature_taps({"student": student, "teacher": teacher}, on=True) as taps:
        return updates("replay", student, teacher, optimizer, X, Y, tap=taps["student"], teacher_tap=taps["teacher"])


def test_dist_is_torch_dist_of_the_pooled_features_and_the_step_loss_adds_it():
    student, teacher, optimizer = networks()
    before = copy.deepcopy(student)  # BatchNorm in train mode: the copy's forward is the step's, weights and batch
    with torch.no_grad():
        f_s, f_t = pooled(copy.deepcopy(before), X), pooled(teacher, X)
        soft = soft_loss(copy.deepcopy(before)(X), teacher(X), Y, LossSettings(3.0, 0.3, BETA))
    loss, terms = replay("dist", student, teacher, optimizer)
    expected = BETA * torch.dist(f_s, f_t.detach())
    # Eager float32 and the same operations in the same order: equal to the last bit.
    assert terms[3] == expected and terms[2] == soft and loss == soft + expected
    # torch.dist over the whole (batch × width) difference, not a per-sample mean (√32 ≈ 5.7 times a mean row norm
    # for rows of similar norm): the term a batch-mean reading would give is far off.
    row_mean = BETA * (f_s - f_t).norm(dim=1).mean()
    assert terms[3] > 3 * row_mean, (terms[3], row_mean)


@pytest.mark.parametrize("name,official", [("l2", nn.MSELoss()), ("l1", nn.L1Loss()),
                                           ("smoothl1", nn.SmoothL1Loss())])
def test_the_mean_losses_are_the_official_nn_losses(name, official):
    student, teacher, optimizer = networks()
    with torch.no_grad():
        f_s, f_t = pooled(copy.deepcopy(student), X), pooled(teacher, X)
    _, terms = replay(name, student, teacher, optimizer)
    assert terms[3] == BETA * official(f_s, f_t)
    assert terms[3] > 0


def _reference_gradients(student, teacher, beta: float) -> list[torch.Tensor]:
    """By hand with autograd, on a copy: the soft loss on the logits plus β·torch.dist on the pooled features of
    the same forward."""
    reference = copy.deepcopy(student)
    f_r = pooled(reference, X)
    with torch.no_grad():
        f_t, t_logits = pooled(teacher, X), teacher(X)
    loss = soft_loss(reference.fc(f_r), t_logits, Y, LossSettings(3.0, 0.3, beta)) + beta * torch.dist(f_r, f_t)
    loss.backward()
    return [p.grad + 5e-4 * p.detach() for p in reference.parameters()]  # plus weight decay, as SGD's buffer


def test_the_student_follows_the_feature_terms_gradient_and_the_teacher_gets_none():
    student, teacher, optimizer = networks()
    expected, without = _reference_gradients(student, teacher, BETA), _reference_gradients(student, teacher, 0.0)
    teacher_before = copy.deepcopy(teacher.state_dict())
    replay("dist", student, teacher, optimizer)
    gap = 0.0
    for (name, p), e, w in zip(student.named_parameters(), expected, without):
        # After the first step a momentum buffer is the gradient plus weight decay: the same float32 arithmetic up
        # to the order of a few sums, a few ulps of entries below 1 → 1e-6 bounds it.
        buffer = optimizer.state[p]["momentum_buffer"]
        torch.testing.assert_close(buffer, e, rtol=1e-5, atol=1e-6, msg=name)
        gap = max(gap, float((e - w).abs().max()))
    assert gap > 1e-3  # the feature term moves the update by far more than the tolerance
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_under_bf16_autocast_the_term_is_float32_of_the_bf16_features():
    student, teacher, optimizer = networks()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        f_s, f_t = pooled(copy.deepcopy(student), X), pooled(teacher, X)
    assert f_s.dtype == torch.bfloat16
    _, terms = replay("dist", student, teacher, optimizer, amp=True)
    assert terms[3] == BETA * torch.dist(f_s.float(), f_t.float())  # not a bf16 norm of bf16 differences
    assert terms[3] != BETA * torch.dist(f_s, f_t).float()


def test_online_students_distil_from_the_features_of_the_teachers_own_step():
    student, teacher, s_opt = networks()
    teacher.train()
    t_opt = make_sgd(teacher, 0.05, 0.9, 5e-4)
    init_momentum(t_opt)
    with torch.no_grad():
        f_t = pooled(copy.deepcopy(teacher), X)  # the teacher before its step, in train mode: its step's forward
        f_s = pooled(copy.deepcopy(student), X)
    updates = StepFunctions(LossSettings(3.0, 0.3, BETA, feature_loss="dist"), False, torch.device("cpu"))
    with feature_taps({"student": student, "teacher": teacher}, on=True) as taps:
        _, _, logits, features = updates("ce", teacher, t_opt, X, Y, tap=taps["teacher"])
        assert torch.equal(features, f_t)
        _, terms = updates("distill_live", student, s_opt, X, Y, logits, features, tap=taps["student"])
    assert terms[3] == BETA * torch.dist(f_s, f_t)


def test_a_non_finite_feature_term_is_named_by_the_guard():
    student, teacher, optimizer = networks()
    guard = NonFiniteGuard("cpu")
    books = StepRecorder(LrSchedule(optimizer, "constant", 0.05, 10, "cpu"), RunningMean("cpu"), guard)
    updates = StepFunctions(LossSettings(3.0, 0.3, BETA, feature_loss="dist"), False, torch.device("cpu"))
    logits = teacher(X).detach()
    features = torch.full((32, 64), float("inf"))
    with feature_taps({"student": student}, on=True) as taps:
        updates("distill_live", student, optimizer, X, Y, logits, features, recorder=books, tap=taps["student"])
    with pytest.raises(ValueError, match=r"feature loss \(β·feature\) went non-finite"):
        guard.check([Step("student", 0, "distill_live", 0)], SINGLE_PROCESS)
    assert TERM_NAMES["replay"][3] == TERM_NAMES["distill_live"][3] == "feature loss (β·feature)"


def test_the_tap_leaves_the_plain_forward_and_the_state_dict_alone_and_is_removed():
    student, _, _ = networks()
    student.eval()
    plain, keys = student(X), list(student.state_dict())
    with feature_taps({"student": student}, on=True) as taps:
        tap = taps["student"]
        assert torch.equal(student(X), plain) and tap._feature is None  # unarmed: records nothing
        logits, features = tap(student, X)
        assert torch.equal(logits, plain) and torch.equal(features, pooled(student, X)) and tap._feature is None
    assert list(student.state_dict()) == keys
    assert not student.fc._forward_pre_hooks  # removed: a user's module leaves fit as it came


@pytest.mark.parametrize("name,feature", [
    ("torchvision:resnet18", lambda m, x: torch.flatten(m.avgpool(nn.Sequential(*list(m.children())[:-2])(x)), 1)),
    ("torchvision:mobilenet_v3_small", lambda m, x: m.classifier[:-1](torch.flatten(m.avgpool(m.features(x)), 1))),
    ("mobilenetv2", lambda m, x: torch.flatten(F.adaptive_avg_pool2d(m.features(x), 1), 1)),
])
def test_library_models_expose_the_input_of_their_classifier(name, feature):
    torch.manual_seed(0)
    model = build_model(name, DATA.info).eval()
    x = DATA.train_x[:4]
    tap = FeatureTap(model, "teacher")
    logits, features = tap(model, x)
    tap.remove()
    assert torch.equal(logits, model(x)) and torch.allclose(features, feature(model, x), rtol=0, atol=1e-6)


def test_an_explicit_term_with_a_model_whose_last_linear_is_not_its_classifier_is_one_error(tmp_path):
    class Odd(nn.Module):  # an extra head registered after the classifier and never run
        def __init__(self):
            super().__init__()
            self.body, self.fc, self.unused = nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Linear(16, 10), \
                nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(self.body(x))

    class Digits(torch.utils.data.Dataset):
        classes = list(range(10))

        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.full((1, 8, 8), float(i)), i % 10

    data = Digits()
    with pytest.raises(ValueError, match="last nn.Linear did not run"):
        fastkd.fit("spaced", teacher=Odd(), student=Odd(), train_data=data, test_data=data, epochs=1, batch_size=32,
                   feature_loss="dist", out=tmp_path / "run", quiet=True, num_workers=0)
    assert not (tmp_path / "run").exists()


def test_explicit_dist_with_a_width_mismatch_is_one_line_naming_both_widths_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--method", "spaced", "--dataset", "synthetic", "--teacher", "resnet18", "--student", "resnet20",
                 "--feature-loss", "dist", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "resnet18 has width 512" in err and "resnet20 width 64" in err and "--feature-loss none" in err, err
    assert not out.exists()


def test_defaults_preset_and_methods_without_a_teacher():
    from fastkd.api import config_from_settings

    for method in ("online", "spaced", "offline"):
        assert config_from_settings({"method": method}).feature_loss == "auto"  # dist (the paper's) at equal widths
        official = config_from_settings({"method": method, "preset": "official", "beta": 0.1})
        assert (official.feature_loss, official.beta) == ("dist", 0.1)  # an explicit flag wins over the preset
    for method in ("baseline", "self", "spaced-self"):
        assert config_from_settings({"method": method}).feature_loss == "none"
        assert config_from_settings({"method": method, "preset": "official"}).feature_loss == "none"
        with pytest.raises(ValueError, match=f"--feature-loss l2 needs a method with a teacher.*--method {method}"):
            fastkd.config.validate(config_from_settings({"method": method, "feature_loss": "l2"}))
    assert config_from_settings({"method": "spaced", "preset": "official"}).beta == 0.03


def test_runs_saved_before_the_feature_term_resume_as_runs_without_it():
    saved = {k: v for k, v in Config(feature_loss="none").resolve_defaults().to_dict().items() if k != "feature_loss"}
    api._check_resumable(Config(feature_loss="none").resolve_defaults(), saved)
    with pytest.raises(ValueError, match="differ from the saved run: feature_loss"):
        api._check_resumable(Config(feature_loss="dist").resolve_defaults(), saved)
    with pytest.raises(ValueError, match="differ from the saved run: feature_loss"):  # auto at equal widths: dist
        api._check_resumed_feature_term(Config().resolve_defaults(), saved, "dist")
