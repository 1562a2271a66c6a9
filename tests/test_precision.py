"""--precision bf16 and --channels-last on CPU: every method trains under bf16 autocast with float32 weights and the
same schedule, kd_loss receives bf16 logits, compiled bf16 steps and the compiled evaluation compile once, a
channels-last step computes the NCHW step, and a resume in another precision is refused."""
import json

import pytest
import torch

import fastkd
from fastkd import engine
from fastkd import step_functions as updates
from fastkd.data import TensorBatches
from fastkd.data.registry import load_synthetic
from fastkd.models import build_model
from fastkd.optim import init_momentum, make_sgd
from fastkd.schedule import METHODS, TEACHER_METHODS
from fastkd.step_functions import LossSettings, StepFunctions

SMALL = dict(dataset="synthetic", epochs=2, batch_size=32, train_subset=96, teacher="tiny", student="tiny",
             device="cpu", quiet=True)


def _run(tmp_path, name, method, **settings):
    out, trace = tmp_path / name, tmp_path / f"{name}.trace"
    interval = {"interval": 0.5} if method in ("spaced", "spaced-self") else {}
    fastkd.fit(method, **{**SMALL, **interval, **settings}, out=out, trace=str(trace))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, trace.read_text(), records


@pytest.mark.parametrize("method", METHODS)
def test_bf16_training_keeps_the_schedule_and_float32_weights(tmp_path, method, monkeypatch):
    seen = []
    real_kd_loss = updates.kd_loss

    def spy(student_logits, teacher_logits, *args, **kwargs):
        seen.append((student_logits.dtype, teacher_logits.dtype))
        return real_kd_loss(student_logits, teacher_logits, *args, **kwargs)

    monkeypatch.setattr(updates, "kd_loss", spy)
    out, bf16_trace, records = _run(tmp_path, "bf16", method, precision="bf16")
    bf16_dtypes = set(seen)
    _, fp32_trace, _ = _run(tmp_path, "fp32", method, precision="fp32")

    assert bf16_trace == fp32_trace  # the same steps on the same batches, in the same order
    losses = [v for r in records for k, v in r.items() if k.endswith("loss") and isinstance(v, float)]
    assert losses and all(torch.isfinite(torch.tensor(losses))), records
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    # The networks each method saves (self methods: their one network as student.pt), all of them float32.
    saved = {"student.pt", "teacher.pt"} if method in TEACHER_METHODS else {"student.pt"}
    assert {p.name for p in out.glob("*.pt")} - {"checkpoint.pt"} == saved
    for name in saved:
        weights = torch.load(out / name, weights_only=True)
        assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}, name
    # Every soft-target loss got the autocast dtype, as kd_loss's contract allows; baseline has none at all.
    expected = set() if method == "baseline" else {(torch.bfloat16, torch.bfloat16)}
    assert bf16_dtypes == expected, bf16_dtypes


@pytest.mark.slow
def test_compiled_bf16_steps_and_evaluation_compile_once(tmp_path, monkeypatch):
    """Every step kind and every (model, test batch shape) of the evaluation compiles on its first call only: later
    calls run under "fail_on_recompile", over two epochs of a spaced run with evaluations in between."""
    torch._dynamo.reset()
    calls = {}

    def strictly(key, fn):
        calls[key] = calls.get(key, 0) + 1
        if calls[key] == 1:
            return fn()
        with torch.compiler.set_stance("fail_on_recompile"):
            return fn()

    real_step, real_test = StepFunctions.__call__, engine.TestForward.__call__
    monkeypatch.setattr(StepFunctions, "__call__",
                        lambda self, kind, *a, **k: strictly(kind, lambda: real_step(self, kind, *a, **k)))
    monkeypatch.setattr(engine.TestForward, "__call__",
                        lambda self, model, x: strictly((id(model), x.shape), lambda: real_test(self, model, x)))
    _run(tmp_path, "compiled", "spaced", precision="bf16", compile=True, train_subset=None, eval_batch_size=48)
    steps = {k: v for k, v in calls.items() if isinstance(k, str)}
    tests = {k: v for k, v in calls.items() if not isinstance(k, str)}
    assert set(steps) == {"ce", "replay"} and min(steps.values()) > 8, steps
    assert len(tests) == 4 and min(tests.values()) >= 2, tests  # 2 models × (48, the tail of 16) each epoch


def test_a_channels_last_step_computes_the_nchw_step():
    data = load_synthetic()
    x, y = data.train_x[:32], data.train_y[:32]
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = build_model("tiny", data.info).to(memory_format=memory_format)
        optimizer = make_sgd(model, 0.05, 0.9, 5e-4)
        init_momentum(optimizer)
        step = StepFunctions(LossSettings(3.0, 0.3, 0.03), compile=False, device=torch.device("cpu"))
        loss, _, logits, _ = step("ce", model, optimizer, x.contiguous(memory_format=memory_format), y)
        results.append((loss, logits, [p.detach().clone() for p in model.parameters()]))
    (loss0, logits0, weights0), (loss1, logits1, weights1) = results
    # The same float32 arithmetic with convolution sums in another order: a few roundings of each value apart
    # (relative ~1e-6); 2e-5 leaves a wide margin and still catches a wrong layout, which changes values at O(1).
    torch.testing.assert_close(loss1, loss0, rtol=2e-5, atol=0)
    torch.testing.assert_close(logits1, logits0, rtol=2e-5, atol=2e-5)
    for w1, w0 in zip(weights1, weights0):
        torch.testing.assert_close(w1, w0, rtol=2e-5, atol=2e-6)


def test_channels_last_batches_come_in_that_layout():
    data = load_synthetic()
    batches = TensorBatches(data, 32, 0, torch.device("cpu"))
    batches.memory_format = torch.channels_last
    x = batches.batch(0, 0).x
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x_test, _ = next(batches.test_batches(16))
    assert x_test.is_contiguous(memory_format=torch.channels_last)


def test_resume_in_another_precision_is_refused(tmp_path):
    out, _, _ = _run(tmp_path, "run", "spaced", precision="fp32", epochs=1)
    with pytest.raises(ValueError, match="precision"):
        fastkd.fit("spaced", **{**SMALL, "interval": 0.5, "epochs": 2}, precision="bf16", out=out, resume=True)
