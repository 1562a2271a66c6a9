"""--compile: every step kind compiles whole (fullgraph: a graph break would raise), computes what the eager step
computes, and compiles exactly once over a multi-epoch run with a per-step lr schedule: no recompiles, checked with
torch.compiler.set_stance("fail_on_recompile")."""
import copy
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd.config import Config
from fastkd.data.registry import load_synthetic
from fastkd.models import build_model
from fastkd.optim import init_momentum, make_sgd
from fastkd.step_functions import LossSettings, StepFunctions

# The engine runs of the two spaced methods cover four of the five kinds (online's distill_live compiles like
# distill; its one-step test is below), with teacher eval/train switches, evaluations and lr changes in between.
KINDS = {"spaced": ("ce", "replay"), "spaced-self": ("advance", "self_distill")}


def run(method: str, out: Path) -> None:
    cfg = Config(method=method, interval=0.5 if method != "online" else None, dataset="synthetic", epochs=2,
                 batch_size=32, teacher="tiny", student="tiny", lr=0.05, device="cpu", compile=True)
    fastkd.fit(**cfg.to_dict(), out=out, quiet=True)


@pytest.mark.parametrize("method", list(KINDS))
def test_each_step_kind_compiles_once_over_a_multi_epoch_run(tmp_path, method, monkeypatch):
    """8 batches per epoch, 2 epochs, evaluations in between, cosine lr changing every step: every call of a step
    kind after its first runs under the "fail_on_recompile" stance, so any recompile of a step graph is an error
    naming its guard. Batch 32 as in test_resume's compiled run,
    whose processes then find these graphs in the inductor cache."""
    torch._dynamo.reset()
    real_call, calls = StepFunctions.__call__, {}

    def strict_call(self, kind, *args, **kwargs):
        calls[kind] = calls.get(kind, 0) + 1
        if calls[kind] == 1:
            return real_call(self, kind, *args, **kwargs)
        with torch.compiler.set_stance("fail_on_recompile"):
            return real_call(self, kind, *args, **kwargs)

    monkeypatch.setattr(StepFunctions, "__call__", strict_call)
    run(method, tmp_path / "compiled")
    assert set(calls) == set(KINDS[method]) and min(calls.values()) > 8, calls


def _step_inputs(kind: str, seed: int):
    """float64 models, optimizers and a batch for one step of `kind`."""
    torch.manual_seed(seed)
    data = load_synthetic()
    multi_exit = kind in ("advance", "self_distill")
    model = build_model("tiny", data.info, multi_exit=multi_exit).double()
    optimizer = make_sgd(model, 0.05, 0.9, 5e-4)
    init_momentum(optimizer)
    x, y = data.train_x[:32].double(), data.train_y[:32]
    extra = ()
    if kind == "replay":
        extra = (build_model("tiny", data.info).double().eval(),)
    elif kind == "distill_live":
        extra = (torch.randn(32, data.info.num_classes, dtype=torch.float64) * 3, None)  # logits, no features
    return model, optimizer, x, y, extra


def _call(fns: StepFunctions, kind: str, model, optimizer, x, y, extra):
    if kind == "replay":  # (student, teacher, optimizer, x, y)
        return fns(kind, model, extra[0], optimizer, x, y)
    return fns(kind, model, optimizer, x, y, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ce", "distill_live", "replay", "advance", "self_distill"])
def test_compiled_step_computes_the_eager_step_in_float64(kind):
    """One whole step (forward, fused kd_loss, backward, SGD update) in float64: compiled and eager agree to float64
    rounding. After the first step each momentum buffer is the gradient plus weight decay, so this compares the
    loss, every gradient and every updated weight."""
    torch._dynamo.reset()
    settings = LossSettings(temperature=3.0, alpha=0.3, beta=0.03)
    compiled = _step_inputs(kind, seed=7)
    eager = (copy.deepcopy(compiled[0]), None, *compiled[2:])
    eager = (eager[0], make_sgd(eager[0], 0.05, 0.9, 5e-4), *eager[2:])
    init_momentum(eager[1])
    if kind == "replay":
        eager = (*eager[:4], (copy.deepcopy(compiled[4][0]),))
    loss_c = _call(StepFunctions(settings, True, torch.device("cpu")), kind, *compiled)[0]
    loss_e = _call(StepFunctions(settings, False, torch.device("cpu")), kind, *eager)[0]
    # float64 rounding (2^-53) grows with the reordered sums of a few thousand terms: 1e-10 of the scale is far
    # above it, and far below any real difference (a dropped or mis-scaled term changes these at 1e-3 and up).
    assert abs(float(loss_c) - float(loss_e)) <= 1e-10 * abs(float(loss_e)), (float(loss_c), float(loss_e))
    (model_c, opt_c), (model_e, opt_e) = compiled[:2], eager[:2]
    for (name, p_c), p_e in zip(model_c.named_parameters(), model_e.parameters()):
        buf_c, buf_e = opt_c.state[p_c]["momentum_buffer"], opt_e.state[p_e]["momentum_buffer"]
        scale = buf_e.abs().max().item() + 1e-30
        assert (buf_c - buf_e).abs().max().item() <= 1e-10 * scale, name
        assert (p_c - p_e).abs().max().item() <= 1e-12 * (p_e.abs().max().item() + 1e-30), name
    trained = [p for p in model_e.parameters() if opt_e.state[p]["momentum_buffer"].abs().max() > 0]
    assert trained, "the step trained nothing"


def test_compiled_step_does_not_recompile_when_the_lr_changes():
    torch._dynamo.reset()
    fns = StepFunctions(LossSettings(3.0, 0.3, 0.03), True, torch.device("cpu"))
    model, optimizer, x, y, extra = _step_inputs("replay", seed=3)
    _call(fns, "replay", model, optimizer, x, y, extra)  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in range(1, 6):
            set_lr(optimizer, 0.05 / (step + 1))
            _call(fns, "replay", model, optimizer, x, y, extra)


@pytest.mark.slow
def test_online_steps_with_the_feature_term_compile_whole_once_and_match_eager():
    """Online KD with the feature term: the teacher's CE step returns its pooled features (read by its tap inside
    the graph) and the student's step distils from them. fullgraph, no recompile over steps whose lr changes, and
    the values of the eager steps."""
    from fastkd.models.features import feature_taps

    torch._dynamo.reset()
    data = load_synthetic()
    settings = LossSettings(3.0, 0.3, 0.03, feature_loss="dist")
    results = []
    for compile in (True, False):
        torch.manual_seed(0)
        teacher, student = build_model("tiny", data.info), build_model("tiny", data.info)
        optimizers = [make_sgd(m, 0.05, 0.9, 5e-4) for m in (teacher, student)]
        for opt in optimizers:
            init_momentum(opt)
        fns, terms = StepFunctions(settings, compile, torch.device("cpu")), []
        with feature_taps({"teacher": teacher, "student": student}, on=True) as taps:
            for step in range(4):
                x, y = data.train_x[32 * step:32 * (step + 1)], data.train_y[32 * step:32 * (step + 1)]
                for opt in optimizers:
                    set_lr(opt, 0.05 / (step + 1))
                with torch.compiler.set_stance("fail_on_recompile" if compile and step else "default"):
                    _, _, logits, features = fns("ce", teacher, optimizers[0], x, y, tap=taps["teacher"])
                    terms.append(fns("distill_live", student, optimizers[1], x, y, logits.clone(), features.clone(),
                                     tap=taps["student"])[1])
        results.append((torch.stack(terms), [p.detach().clone() for p in student.parameters()]))
    (terms_c, weights_c), (terms_e, weights_e) = results
    assert (terms_e[:, 3] > 0).all()
    # float32, the compiled graph reorders sums (convolutions, the norm's 32×64 squares): relative error a few
    # eps32 per value (1e-6), grown over 4 steps of SGD; 1e-4 leaves room and still catches a missing or mis-scaled
    # term, which is O(0.1) to O(1) here, a large share of the loss.
    torch.testing.assert_close(terms_c, terms_e, rtol=1e-4, atol=1e-5)
    for w_c, w_e in zip(weights_c, weights_e):
        torch.testing.assert_close(w_c, w_e, rtol=1e-4, atol=1e-5)


def set_lr(optimizer, lr: float) -> None:
    """Write `lr` into the optimizer's device lr tensors, as the engine's LrSchedule does inside a step."""
    for group in optimizer.param_groups:
        group["lr"].fill_(lr)
