"""The fused KD loss against an independent float64 reference, on random inputs drawn afresh for each test (seeded
from the test's id by conftest.py, so every run draws the same ones)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.kernels import _kd_common
from fastkd.kernels import _kd_loss_triton as tk
from fastkd.kernels._kd_common import make_options
from fastkd.kernels._kd_launch import launch_kd_kernel
from fastkd.kernels.kd_loss import KDLoss, kd_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T, ALPHA, IGNORE = 3.0, 0.3, -100
# (loss rtol, gradient tolerance as a fraction of the largest reference gradient) per input dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-2), torch.float16: (1e-4, 2e-3),
       torch.float64: (1e-5, 1e-5)}


def reference(s, t, y, temperature=T, alpha=ALPHA, ignore_index=IGNORE):
    """Per-row loss and ∂(Σ rows·w)/∂s in float64, by autograd through the textbook formula."""
    s64 = s.detach().double().requires_grad_()
    log_p_s = F.log_softmax(s64 / temperature, 1)
    log_p_t = F.log_softmax(t.detach().double() / temperature, 1)
    p_t = log_p_t.exp()
    rows = alpha * temperature**2 * torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(1)
    if y is not None:
        keep = y != ignore_index
        log_p = F.log_softmax(s64, 1)
        ce = -log_p.gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1)
        rows = torch.where(keep, rows + (1 - alpha) * ce, 0.0)
    return rows, s64


def logits(n, c, dtype, scale=4.0, device=DEVICE):
    return (torch.randn(n, c, dtype=torch.float64, device=device) * scale).to(dtype)


def targets(n, c, ignored=2, device=DEVICE):
    y = torch.randint(0, c, (n,), device=device)
    y[torch.randperm(n, device=device)[: min(ignored, n - 1)]] = IGNORE
    return y


@pytest.fixture
def stream_path(monkeypatch):
    """Force the multi-block streaming path at small C, with several blocks per row."""
    monkeypatch.setattr(tk, "MAX_SINGLE_BLOCK", 64)
    monkeypatch.setattr(tk, "STREAM_BLOCK", 64)


def check(s, t, y, reduction="sum", backend="triton", grad_weights=None, grad_tol=None, **kw):
    """Run kd_loss with backward and compare loss and gradient with the float64 reference."""
    loss_rtol, dtype_grad_tol = TOL[s.dtype]
    grad_tol = dtype_grad_tol if grad_tol is None else grad_tol
    s_in = s.clone().requires_grad_()
    out = kd_loss(s_in, t, y, temperature=kw.get("temperature", T), alpha=kw.get("alpha", ALPHA),
                  ignore_index=IGNORE, reduction=reduction, backend=backend)
    assert out.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    ref_rows, s64 = reference(s, t, y, kw.get("temperature", T), kw.get("alpha", ALPHA))
    if reduction == "none":
        w = grad_weights if grad_weights is not None else torch.ones_like(ref_rows)
        ref, ref_obj, obj = ref_rows, (ref_rows * w.double()).sum(), (out * w).sum()
    elif reduction == "sum":
        ref = ref_obj = ref_rows.sum()
        obj = out
    else:
        counted = len(ref_rows) if y is None else int((y != IGNORE).sum())
        ref = ref_obj = ref_rows.sum() / max(counted, 1)
        obj = out
    torch.testing.assert_close(out.double(), ref, rtol=loss_rtol, atol=loss_rtol * (1 + ref.abs().max().item()))
    ref_obj.backward()
    obj.backward()
    assert s_in.grad.dtype == s.dtype
    scale = s64.grad.abs().max().item() + 1e-30
    err = (s_in.grad.double() - s64.grad).abs().max().item()
    assert err <= grad_tol * scale + 1e-7, f"gradient error {err:.3g} vs scale {scale:.3g}"
    return out, s_in.grad


SHAPES = [(1, 1), (1, 37), (5, 300), (3, 1000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("with_target", [False, True], ids=["kl_only", "kl_ce"])
def test_triton_kernel_matches_float64_reference(shape, dtype, with_target):
    n, c = shape
    y = targets(n, c) if with_target else None
    check(logits(n, c, dtype), logits(n, c, dtype), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_target", [False, True], ids=["kl_only", "kl_ce"])
def test_streaming_multi_block_path_matches_reference(stream_path, dtype, with_target):
    n, c = 4, 300  # 5 blocks of 64, the last one partial
    check(logits(n, c, dtype), logits(n, c, dtype), targets(n, c) if with_target else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (6, 37), (64, 1000), (3, 9001)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cpu_implementation_matches_float64_reference(shape, dtype):
    n, c = shape
    check(logits(n, c, dtype, device="cpu"), logits(n, c, dtype, device="cpu"), targets(n, c, device="cpu"),
          backend="auto")


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_reduction_with_grad_output_not_one(backend, reduction):
    n, c = 7, 50
    y = targets(n, c, ignored=3)
    w = torch.rand(n, device=DEVICE) * 3 + 0.5
    out, _ = check(logits(n, c, torch.float32), logits(n, c, torch.float32), y, reduction=reduction,
                   backend=backend, grad_weights=w)
    if reduction == "none":
        assert out.shape == (n,)
        assert torch.all(out[y == IGNORE] == 0)
    # A scalar grad_output != 1 as well: the gradient is linear in it.
    s = logits(n, c, torch.float32).requires_grad_()
    t = logits(n, c, torch.float32)
    kd_loss(s, t, y, temperature=T, alpha=ALPHA, reduction="sum", backend=backend).backward(torch.tensor(2.5))
    s_ref = s.detach().clone().requires_grad_()
    kd_loss(s_ref, t, y, temperature=T, alpha=ALPHA, reduction="sum", backend=backend).backward()
    torch.testing.assert_close(s.grad, 2.5 * s_ref.grad)


@pytest.mark.parametrize("path", ["single", "stream"])
def test_extreme_logits_and_masked_classes(request, path):
    if path == "stream":
        request.getfixturevalue("stream_path")
    n, c = 4, 200
    s = logits(n, c, torch.float32, scale=1e4)
    t = logits(n, c, torch.float32, scale=1e4)
    # Mask a whole 64-column block and some scattered classes, in both tensors.
    masked = torch.zeros(c, dtype=torch.bool, device=DEVICE)
    masked[64:128] = True
    masked[torch.randperm(c, device=DEVICE)[:20]] = True
    y = targets(n, c)
    y[(y != IGNORE) & masked[y.clamp(min=0)]] = 3
    masked[3] = False
    s[:, masked] = -math.inf
    t[:, masked] = -math.inf
    # The kernel divides by T in float32: each quotient is off by up to 2^-24 of |x|/T, so each probability (and its
    # normaliser) by a relative 2·2^-24·max|x|/T, for the student and the teacher: at |x| ~ 4e4 that is ~1e-3 of the
    # largest gradient entry, far above the 1e-5 that holds at ordinary scales.
    largest = max(s[s.isfinite()].abs().max().item(), t[t.isfinite()].abs().max().item())
    out, grad = check(s, t, y, grad_tol=TOL[torch.float32][1] + 4 * 2**-24 * largest / T)
    assert torch.isfinite(out)
    assert torch.all(grad[:, masked] == 0)


def test_all_rows_ignored_gives_zero_mean_and_zero_gradient():
    n, c = 3, 17
    s = logits(n, c, torch.float32).requires_grad_()
    y = torch.full((n,), IGNORE, device=DEVICE)
    for backend in ["triton", "auto", "torch"]:
        s.grad = None
        loss = kd_loss(s, logits(n, c, torch.float32), y, reduction="mean", backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(s.grad == 0)


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
def test_nan_in_a_counted_row_gives_nan_loss_but_not_in_an_ignored_row(backend):
    n, c = 4, 20
    s, t = logits(n, c, torch.float32), logits(n, c, torch.float32)
    y = torch.tensor([1, 2, IGNORE, 4], device=DEVICE)
    s_nan = s.clone()
    s_nan[0, 5] = math.nan
    assert torch.isnan(kd_loss(s_nan, t, y, backend=backend))
    t_nan = t.clone()
    t_nan[1, 7] = math.nan
    assert torch.isnan(kd_loss(s, t_nan, y, backend=backend))
    s_ignored_nan = s.clone()
    s_ignored_nan[2, 3] = math.nan
    assert torch.isfinite(kd_loss(s_ignored_nan, t, y, backend=backend))


@pytest.mark.parametrize("layout", ["strided_columns", "transposed", "row_slice"])
def test_non_contiguous_inputs(layout):
    n, c = 6, 90
    if layout == "strided_columns":
        s, t = logits(n, 2 * c, torch.float32)[:, ::2], logits(n, 2 * c, torch.float32)[:, 1::2]
    elif layout == "transposed":
        s, t = logits(c, n, torch.float32).t(), logits(c, n, torch.float32).t()
    else:
        s, t = logits(2 * n, c + 5, torch.float32)[::2, 3:-2], logits(2 * n, c + 5, torch.float32)[1::2, 2:-3]
    assert not s.is_contiguous()
    check(s, t, targets(n, c), reduction="mean")
    check(s, t, targets(n, c), reduction="mean", backend="auto")


@pytest.mark.parametrize("path", ["single", "stream"])
@pytest.mark.parametrize("with_target", [False, True], ids=["kl_only", "kl_ce"])
def test_kernel_writes_every_output_element_over_poisoned_buffers(request, path, with_target):
    if path == "stream":
        request.getfixturevalue("stream_path")
    n, c = 5, 150
    s, t = logits(n, c, torch.bfloat16), logits(n, c, torch.bfloat16)
    y = targets(n, c) if with_target else None
    rows = torch.full((n,), math.nan, device=DEVICE)
    grad = torch.full((n, c), math.nan, dtype=torch.bfloat16, device=DEVICE)
    launch_kd_kernel(s, t, y, make_options(s.device, T, ALPHA, IGNORE), rows, grad)
    ref_rows, s64 = reference(s, t, y)
    ref_rows.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=2e-2, atol=2e-2 * s64.grad.abs().max().item())


def test_teacher_never_gets_a_gradient_and_no_grad_call_writes_none():
    s, t = logits(4, 30, torch.float32).requires_grad_(), logits(4, 30, torch.float32).requires_grad_()
    for backend in ["triton", "auto", "torch"]:
        kd_loss(s, t, targets(4, 30), backend=backend).backward()
        assert t.grad is None
    with torch.no_grad():
        assert torch.isfinite(kd_loss(s, t, targets(4, 30), backend="triton"))


def test_module_matches_function():
    s, t, y = logits(5, 40, torch.float32), logits(5, 40, torch.float32), targets(5, 40)
    module = KDLoss(temperature=2.0, alpha=0.7, reduction="sum", backend="triton")
    assert module(s, t, y).item() == kd_loss(s, t, y, temperature=2.0, alpha=0.7, reduction="sum",
                                             backend="triton").item()
    check(s, t, y, backend="triton", temperature=2.0, alpha=0.7)


@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused_backward"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compiles_fullgraph_forward_and_backward(backend, fused):
    torch._dynamo.reset()
    n, c = 8, 33
    s0, t, y = logits(n, c, torch.float32), logits(n, c, torch.float32), targets(n, c)

    def loss_of(s):
        return kd_loss(s, t, y, temperature=T, alpha=ALPHA, backend=backend, fused_backward=fused)

    def step(s, t, y):
        loss = loss_of(s)
        loss.backward()
        return loss

    explanation = torch._dynamo.explain(loss_of)(s0.clone().requires_grad_())
    assert explanation.graph_break_count == 0
    compiled = torch.compile(loss_of, fullgraph=True)
    s_c = s0.clone().requires_grad_()
    compiled(s_c).backward()
    s_e = s0.clone().requires_grad_()
    step(s_e, t, y)
    torch.testing.assert_close(s_c.grad, s_e.grad)


def test_cpu_path_passes_gradcheck_in_float64():
    s = logits(3, 11, torch.float64, device="cpu").requires_grad_()
    t = logits(3, 11, torch.float64, device="cpu")
    y = torch.tensor([2, IGNORE, 10])
    for reduction in ["mean", "none"]:
        assert torch.autograd.gradcheck(
            lambda s, r=reduction: kd_loss(s, t, y, temperature=2.0, alpha=0.4, reduction=r, backend="auto"), (s,))


def _bad_calls():
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    return [
        ("teacher_logits", lambda: kd_loss(s, torch.randn(4, 7))),
        ("student_logits", lambda: kd_loss(torch.randn(4), torch.randn(4))),
        ("student_logits", lambda: kd_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4))),
        ("temperature", lambda: kd_loss(s, t, temperature=0.0)),
        ("temperature", lambda: kd_loss(s, t, temperature=-1.0)),
        ("temperature", lambda: kd_loss(s, t, temperature=math.inf)),
        ("temperature", lambda: kd_loss(s, t, temperature=math.nan)),
        ("alpha", lambda: kd_loss(s, t, alpha=1.5)),
        ("alpha", lambda: kd_loss(s, t, alpha=-0.1)),
        ("target", lambda: kd_loss(s, t, torch.tensor([0, 1, 2, 6]))),
        ("target", lambda: kd_loss(s, t, torch.tensor([0, -1, 2, 3]))),
        ("target", lambda: kd_loss(s, t, torch.tensor([0, 1, 2]))),
        ("target", lambda: kd_loss(s, t, y.float())),
        ("reduction", lambda: kd_loss(s, t, y, reduction="avg")),
        ("teacher_logits dtype", lambda: kd_loss(s, t.double())),
        ("student_logits must be float32", lambda: kd_loss(s.long(), t.long())),
        ("backend", lambda: kd_loss(s, t, backend="cuda")),
        ("takes CUDA or CPU tensors, got meta", lambda: kd_loss(s.to("meta"), t.to("meta"))),
        ("temperature", lambda: KDLoss(temperature=0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error_naming_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_kd_common, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="triton")


def test_unchecked_out_of_range_target_poisons_the_loss(monkeypatch):
    s, t = logits(3, 5, torch.float32), logits(3, 5, torch.float32)
    y = torch.tensor([0, 9, 1], device=DEVICE)
    for backend in ["triton", "auto"]:
        assert torch.isnan(kd_loss(s, t, y, backend=backend, check_target=False))


def test_out_of_range_target_poisons_the_loss_when_validation_is_skipped(monkeypatch):
    # Under torch.compile / CUDA-graph capture the host-side check is skipped; the loss must not hide it.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    s, t = logits(3, 5, torch.float32), logits(3, 5, torch.float32)
    for backend in ["triton", "auto"]:
        assert torch.isnan(kd_loss(s, t, torch.tensor([0, 9, 1], device=DEVICE), backend=backend))


# Double backward (create_graph=True, e.g. a gradient penalty): the kernels' gradient is a constant to autograd, so
# every kernel path refuses it with one clear error; backend="torch" is plain autograd and supports it.
DOUBLE_BACKWARD = r"^kd_loss: double backward \(create_graph=True\) is not supported"


@pytest.mark.parametrize("fused, reduction", [(False, "mean"), (False, "none"), (True, "mean")],
                         ids=["generic-mean", "generic-none", "fused_backward"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_double_backward_is_refused_on_every_kernel_path(backend, fused, reduction):
    torch.manual_seed(0)
    s, t, y = logits(5, 7, torch.float32).requires_grad_(), logits(5, 7, torch.float32), targets(5, 7)
    loss = kd_loss(s, t, y, temperature=T, alpha=ALPHA, reduction=reduction, backend=backend, fused_backward=fused)
    for weight in (torch.ones_like(loss), torch.full_like(loss, 0.5)):  # the CPU path's shortcut at 1, and not
        if fused and weight.max() != 1:
            continue  # fused_backward's contract: an incoming gradient of 1
        with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
            torch.autograd.grad(loss, s, weight, create_graph=True, retain_graph=True)
    torch.autograd.grad(loss, s, torch.ones_like(loss))  # a plain backward of the same call still works


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_double_backward_is_refused_through_the_compiled_graphs_op(backend):
    """torch.compile runs the fastkd::kd_loss_forward op and its registered backward, not the eager Function."""
    from fastkd.kernels._kd_ops import kd_loss_forward

    torch.manual_seed(0)
    s, t, y = logits(5, 7, torch.float32).requires_grad_(), logits(5, 7, torch.float32), targets(5, 7)
    gradient = "stats" if backend == "triton" else "grad"
    loss = kd_loss_forward(s, t, y, make_options(s.device, T, ALPHA).scalars, ignore_index=IGNORE, reduction="mean",
                           gradient=gradient, backend=backend)[0]
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_kd_loss_sparse_refuses_double_backward(backend):
    from fastkd.kernels.kd_loss import kd_loss_sparse

    torch.manual_seed(0)
    s, y = logits(5, 7, torch.float32).requires_grad_(), targets(5, 7)
    values, indices = logits(5, 7, torch.float32).topk(3, dim=1)
    loss = kd_loss_sparse(s, values, indices, y, temperature=T, alpha=ALPHA, backend=backend)
    with pytest.raises(RuntimeError, match=r"^kd_loss_sparse: double backward \(create_graph=True\)"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_the_torch_backend_takes_a_gradient_penalty_as_the_reference_does():
    torch.manual_seed(0)
    s, t, y = logits(5, 7, torch.float64).requires_grad_(), logits(5, 7, torch.float64), targets(5, 7)
    (grad,) = torch.autograd.grad(kd_loss(s, t, y, temperature=T, alpha=ALPHA, backend="torch"), s, create_graph=True)
    (penalty,) = torch.autograd.grad(grad.square().sum(), s)
    rows, s64 = reference(s, t, y)
    (ref_grad,) = torch.autograd.grad(rows.sum() / (y != IGNORE).sum(), s64, create_graph=True)
    (ref_penalty,) = torch.autograd.grad(ref_grad.square().sum(), s64)
    torch.testing.assert_close(penalty, ref_penalty)
