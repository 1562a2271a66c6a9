"""kd_loss_linear and kd_loss_sparse against a float64 reference on materialised logits, fresh random inputs.

Tolerances come from the arithmetic of the chunked path: the logits are a matmul in the input precision (error at
most γ_H·(|h|·|W|ᵀ + |b|) plus a rounding of the output), the kernel works in float32 (per-row loss within
KERNEL_RTOL), and each gradient is a matmul of ∂ℓ/∂logits (error γ_V or γ_N of the absolute product) whose inputs
carry the logits' error through the softmax (its Jacobian's rows sum to at most 1/(2T) in absolute value).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.kernels import _kd_chunked as chunked
from fastkd.kernels.kd_loss import KDLinearLoss, kd_loss, kd_loss_linear, kd_loss_sparse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel tests run on the GPU in gpu_check.sh
T, ALPHA, IGNORE = 3.0, 0.3, -100
U32 = 2.0**-24
UNIT = {torch.float32: U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
KERNEL_RTOL = 2e-6  # the kernel's float32 per-row loss (1e-6 relative is its target; twice that as the bound)
BACKENDS = ["auto", "triton"]  # the native CPU kernel, and the Triton kernel (interpreted on CPU)


def gamma(k: int, u: float = U32) -> float:
    return k * u / (1 - k * u)


def textbook_rows(s, t, y, temperature=T, alpha=ALPHA):
    """Per-row α·T²·KL(p_t ‖ p_s) + (1−α)·CE in float64; classes where t = -inf have p_t = 0."""
    log_p_s = F.log_softmax(s / temperature, 1)
    log_p_t = F.log_softmax(t / temperature, 1)
    p_t = log_p_t.exp()
    safe_log_p_t = torch.where(t == -math.inf, 0.0, log_p_t)  # keeps 0·log 0 out of the gradient too
    rows = alpha * temperature**2 * (p_t * (safe_log_p_t - log_p_s)).sum(1)
    if y is not None:
        keep = y != IGNORE
        ce = -F.log_softmax(s, 1).gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1)
        rows = torch.where(keep, rows + (1 - alpha) * ce, 0.0)
    return rows


def make_case(n, hidden, vocabulary, dtype, teacher, with_target, with_bias, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    case = dict(h=randn(n, hidden), w=randn(vocabulary, hidden, scale=hidden**-0.5 * 3),
                b=randn(vocabulary) if with_bias else None, y=None, teacher=teacher)
    if with_target:
        y = torch.randint(0, vocabulary, (n,), generator=g)
        y[torch.randperm(n, generator=g)[: min(3, n - 1)]] = IGNORE
        case["y"] = y
    th, tw = randn(n, 24), randn(vocabulary, 24, scale=24**-0.5 * 3)
    tb = randn(vocabulary)
    if teacher == "hidden":
        case.update(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
    elif teacher == "logits":
        case["teacher_logits"] = (th.double() @ tw.double().T).to(dtype)
    else:
        dense = (th.double() @ tw.double().T)
        values, indices = dense.topk(k, dim=1)
        order = torch.randperm(k, generator=g)  # any order of the k classes
        case["teacher_topk"] = (values[:, order].to(dtype), indices[:, order])
    return {key: (tuple(x.to(DEVICE) for x in value) if isinstance(value, tuple) else
                  value.to(DEVICE) if isinstance(value, torch.Tensor) else value) for key, value in case.items()}


def teacher_kwargs(case):
    return {key: case[key] for key in ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits",
                                       "teacher_topk") if key in case}


def reference(case, reduction, row_weights):
    """Float64: the objective Σ wᵢ·ℓᵢ (w from the reduction and the incoming gradient), its gradients, and the
    per-row absolute error bounds of the chunked computation in the case's dtype."""
    dtype = case["h"].dtype
    u = UNIT[dtype]
    h, w = (case[key].double().requires_grad_() for key in ("h", "w"))
    b = case["b"].double().requires_grad_() if case["b"] is not None else None
    s = h @ w.T + (b if b is not None else 0)
    s_bound = (h.abs() @ w.abs().T + (b.abs() if b is not None else 0)).detach()
    ds = gamma(h.shape[1]) * s_bound + u * s.detach().abs()  # the logits' matmul, then their rounding
    if case["teacher"] == "hidden":
        th, tw, tb = (case[key].double() for key in ("teacher_hidden", "teacher_weight", "teacher_bias"))
        teacher_in = t = (th @ tw.T + tb).requires_grad_()
        dt = gamma(th.shape[1]) * (th.abs() @ tw.abs().T + tb.abs()) + u * t.detach().abs()
    elif case["teacher"] == "logits":
        teacher_in = t = case["teacher_logits"].double().requires_grad_()
        dt = torch.zeros_like(t)
    else:
        values, indices = case["teacher_topk"]
        teacher_in = values.double().requires_grad_()
        t = torch.full(s.shape, -math.inf, dtype=torch.float64, device=s.device).scatter(1, indices, teacher_in)
        dt = torch.zeros_like(values, dtype=torch.float64)  # the values reach the kernel as they are
    rows = textbook_rows(s, t, case["y"])
    objective = (rows * row_weights).sum()
    grads = torch.autograd.grad(objective, [x for x in (h, w, b, s, teacher_in) if x is not None])
    d_h, d_w, *rest = grads
    d_b = rest.pop(0) if b is not None else None
    d_s, d_t = rest
    # Per row: the loss error, first order in the inputs' errors, plus the kernel's own rounding.
    row_err = ((d_s.abs() * ds.max(1, keepdim=True).values).sum(1) + (d_t.abs() * dt).sum(1)
               + KERNEL_RTOL * (rows.abs() * row_weights.abs()) + 1e-8)
    # ∂ℓ/∂logits per element j: through the softmaxes, a logit error δ moves p_j by at most 2·p_j·max|δ|/T (at
    # temperature T), so the gradient α·T·(p_s − p_t) + (1−α)·(p_1 − onehot) moves by at most
    # 2·max|δs|·(α·p_s + (1−α)·p_1) + 2·α·p_t·max|δt|; plus the kernel's float32 and the stored rounding.
    p_s, p_t = F.softmax(s.detach() / T, 1), F.softmax(t.detach() / T, 1)
    p_1 = F.softmax(s.detach(), 1)
    ds_max, dt_max = ds.max(1, keepdim=True).values, dt.max(1, keepdim=True).values
    through_softmax = 2 * ds_max * (ALPHA * p_s + (1 - ALPHA) * p_1) + 2 * ALPHA * p_t * dt_max
    onehot = torch.zeros_like(p_1)
    if case["y"] is not None:
        keep = case["y"] != IGNORE
        onehot[keep.nonzero()[:, 0], case["y"][keep]] = 1.0
    kernel = 8 * U32 * (ALPHA * T * (p_s + p_t) + (1 - ALPHA) * (p_1 + onehot))
    g_err = row_weights.abs()[:, None] * (through_softmax + kernel) + u * d_s.abs()
    return dict(rows=rows.detach(), objective=objective.detach(), d_h=d_h, d_w=d_w, d_b=d_b, d_s=d_s.detach(),
                row_err=row_err.detach(), g_err=g_err.detach(), h=h.detach(), w=w.detach())


def gradient_bounds(ref, chunks: int, u: float):
    """Elementwise error bounds of ∂hidden = g·W, ∂weight = Σ_chunks gᵀ·h and ∂bias = Σ g."""
    g, g_err, h, w = ref["d_s"].abs(), ref["g_err"], ref["h"].abs(), ref["w"].abs()
    n, vocabulary = g.shape
    d_h = gamma(vocabulary) * (g @ w) + g_err @ w + u * ref["d_h"].abs()
    d_w = (gamma(n) + chunks * u) * (g.T @ h) + g_err.T @ h + u * ref["d_w"].abs()
    d_b = (gamma(n) + chunks * u) * g.sum(0) + g_err.sum(0)
    return d_h, d_w, d_b


def check_linear(case, reduction="mean", chunk_size=7, backend="auto", seed=1):
    n = case["h"].shape[0]
    dtype = case["h"].dtype
    h, w = case["h"].clone().requires_grad_(), case["w"].clone().requires_grad_()
    b = case["b"].clone().requires_grad_() if case["b"] is not None else None
    loss = kd_loss_linear(h, w, case["y"], student_bias=b, **teacher_kwargs(case), temperature=T, alpha=ALPHA,
                          ignore_index=IGNORE, reduction=reduction, chunk_size=chunk_size, backend=backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    counted = n if case["y"] is None else max(int((case["y"] != IGNORE).sum()), 1)
    if reduction == "none":
        grad_out = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
        row_weights = grad_out
    else:
        grad_out = torch.tensor(1.7, dtype=torch.float64, device=DEVICE)
        row_weights = torch.full((n,), 1.7 / (counted if reduction == "mean" else 1), dtype=torch.float64,
                                 device=DEVICE)
    ref = reference(case, reduction, row_weights)
    if reduction == "none":
        assert torch.all((loss.double() - ref["rows"]).abs() <= ref["row_err"]), "loss rows"
    else:  # the reference objective carries the incoming gradient 1.7
        bound = ref["row_err"].sum() / 1.7
        assert abs(loss.double() - ref["objective"] / 1.7) <= bound, (loss.item(), ref["objective"].item() / 1.7)
    loss.backward(grad_out.to(loss.dtype))
    chunks = math.ceil(n / chunk_size)
    bound_h, bound_w, bound_b = gradient_bounds(ref, chunks, UNIT[dtype])
    for name, got, want, bound in (("∂hidden", h.grad, ref["d_h"], bound_h), ("∂weight", w.grad, ref["d_w"], bound_w),
                                   ("∂bias", b.grad if b is not None else None, ref["d_b"], bound_b)):
        if want is None:
            continue
        assert got.dtype == dtype
        excess = ((got.double() - want).abs() - bound).max().item()
        assert excess <= 0, f"{name}: error exceeds its bound by {excess:.3g} (scale {want.abs().max().item():.3g})"
    return loss, h.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("with_target,with_bias", [(True, True), (False, False)])
def test_every_teacher_form_matches_the_float64_reference(backend, teacher, with_target, with_bias):
    # V above one block (8192) and not a power of two; N not a multiple of the chunk.
    n = 9 if backend == "triton" else 23
    case = make_case(n, 16, 9001, torch.float32, teacher, with_target, with_bias, k=5)
    check_linear(case, chunk_size=4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_reduction_with_an_incoming_gradient_not_one(backend, reduction):
    case = make_case(13, 8, 301, torch.float32, "hidden", True, True)
    check_linear(case, reduction, chunk_size=5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bfloat16_inputs(backend, reduction):
    case = make_case(11, 32, 1271, torch.bfloat16, "hidden", True, True)
    check_linear(case, reduction, chunk_size=4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_inputs(backend):
    case = make_case(11, 32, 1271, torch.float16, "logits", True, True)
    check_linear(case, "mean", chunk_size=4, backend=backend)


def test_float16_weight_gradient_of_many_rows_does_not_overflow():
    # Large activations on one hidden unit: the weight gradient's sum over 1,000 rows passes float16's 65504 unless
    # each chunk is scaled by the mean's 1/N before it is added.
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1000, 8, generator=g)
    h[:, 0] = 100
    h = h.half().requires_grad_()
    w = (torch.randn(50, 8, generator=g) * 0.1).half().requires_grad_()
    t = torch.randn(1000, 50, generator=g).half()
    y = torch.zeros(1000, dtype=torch.long)
    kd_loss_linear(h, w, y, teacher_logits=t, alpha=0.0, chunk_size=256).backward()
    h64, w64 = h.detach().double(), w.detach().double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, y).backward()
    assert torch.isfinite(w.grad).all()
    # float16 logits (relative error 2⁻¹¹ of |s| ≤ 100·Σ|w|) move each softmax by at most twice that; the sum's
    # one rounding per chunk adds 4 of 2⁻¹¹ relative.
    ds = 2.0**-11 * (h64.abs() @ w64.detach().abs().T).max()
    bound = 2 * ds * (h64.abs().sum(0) / 1000).max() + 8 * 2.0**-11 * w64.grad.abs()
    assert ((w.grad.double() - w64.grad).abs() <= bound).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_target_is_read_as_its_values(backend):
    case = make_case(7, 8, 40, torch.float32, "logits", True, False)
    strided = torch.stack([case["y"], torch.zeros_like(case["y"])], 1)[:, 0]  # a column: stride 2
    assert not strided.is_contiguous()
    kwargs = dict(teacher_logits=case["teacher_logits"], reduction="none", chunk_size=3, backend=backend)
    torch.testing.assert_close(kd_loss_linear(case["h"], case["w"], strided, **kwargs),
                               kd_loss_linear(case["h"], case["w"], case["y"].clone(), **kwargs), rtol=0, atol=0)


def test_no_gradient_reaches_given_teacher_logits_or_topk_values():
    case = make_case(6, 8, 40, torch.float32, "logits", True, False)
    t = case["teacher_logits"].requires_grad_()
    values, indices = t.detach().topk(3, dim=1)
    values.requires_grad_()
    h = case["h"].requires_grad_()
    (kd_loss_linear(h, case["w"], case["y"], teacher_logits=t)
     + kd_loss_linear(h, case["w"], case["y"], teacher_topk=(values, indices))).backward()
    assert t.grad is None and values.grad is None and h.grad is not None


def test_double_backward_is_an_error_not_a_silent_zero():
    case = make_case(5, 3, 7, torch.float64, "hidden", True, True)
    h = case["h"].requires_grad_()
    loss = kd_loss_linear(h, case["w"], case["y"], **teacher_kwargs(case))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("k", [1, 37])
def test_topk_teachers_at_k_1_and_k_v(k):
    case = make_case(10, 8, 37, torch.float32, "topk", True, False, k=k)
    check_linear(case, chunk_size=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_with_every_class_equals_the_dense_loss(backend):
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(6, 301, generator=g) * 4).to(DEVICE).requires_grad_()
    t = (torch.randn(6, 301, generator=g) * 4).to(DEVICE)
    y = torch.tensor([3, IGNORE, 0, 300, 7, 8], device=DEVICE)
    values, indices = t.topk(301, dim=1)
    sparse = kd_loss_sparse(s, values, indices, y, temperature=T, alpha=ALPHA, chunk_size=4, backend=backend)
    (grad_sparse,) = torch.autograd.grad(sparse, s)
    dense = kd_loss(s, t, y, temperature=T, alpha=ALPHA, backend=backend)
    (grad_dense,) = torch.autograd.grad(dense, s)
    # The same kernel on the same dense teacher; only the mean's summation order differs.
    torch.testing.assert_close(sparse, dense, rtol=4 * 6 * U32, atol=0)
    torch.testing.assert_close(grad_sparse, grad_dense, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sparse_matches_the_float64_reference(backend, reduction):
    g = torch.Generator().manual_seed(3)
    n, vocabulary, k = 9, 9001, 6
    s = (torch.randn(n, vocabulary, generator=g) * 3).to(DEVICE).requires_grad_()
    values = (torch.randn(n, k, generator=g) * 3).to(DEVICE)
    indices = torch.stack([torch.randperm(vocabulary, generator=g)[:k] for _ in range(n)]).to(DEVICE)
    y = torch.randint(0, vocabulary, (n,), generator=g)
    y[4] = IGNORE
    y = y.to(DEVICE)
    weights = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)
    loss = kd_loss_sparse(s, values, indices, y, temperature=T, alpha=ALPHA, reduction=reduction, chunk_size=4,
                          backend=backend)
    counted = n - 1
    s64 = s.detach().double().requires_grad_()
    dense = torch.full((n, vocabulary), -math.inf, dtype=torch.float64, device=DEVICE).scatter(1, indices,
                                                                                              values.double())
    rows = textbook_rows(s64, dense, y)
    ref = rows if reduction == "none" else rows.sum() / (counted if reduction == "mean" else 1)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=KERNEL_RTOL, atol=1e-8)
    grad_out = weights if reduction == "none" else torch.tensor(1.7, dtype=torch.float64, device=DEVICE)
    loss.backward(grad_out.float())
    ref.backward(grad_out)
    # The gradient's elements are float32 sums of a few terms of size up to α·T + 1.
    assert (s.grad.double() - s64.grad).abs().max() <= 8 * U32 * (ALPHA * T + 1) * grad_out.abs().max()


def test_ignored_rows_cost_nothing_and_are_not_counted():
    case = make_case(12, 8, 50, torch.float32, "hidden", True, True)
    h = case["h"].clone().requires_grad_()
    loss = kd_loss_linear(h, case["w"], case["y"], student_bias=case["b"], **teacher_kwargs(case), chunk_size=5)
    loss.backward()
    ignored = case["y"] == IGNORE
    assert ignored.sum() == 3 and torch.all(h.grad[ignored] == 0) and torch.all(h.grad[~ignored] != 0)
    kept = kd_loss_linear(case["h"][~ignored], case["w"], case["y"][~ignored], student_bias=case["b"],
                          teacher_hidden=case["teacher_hidden"][~ignored], teacher_weight=case["teacher_weight"],
                          teacher_bias=case["teacher_bias"], chunk_size=5)
    torch.testing.assert_close(loss, kept, rtol=4 * 12 * U32, atol=0)


def test_the_teacher_gets_no_gradient_and_a_no_grad_call_makes_none():
    case = make_case(6, 8, 40, torch.float32, "hidden", True, True)
    h, w = case["h"].requires_grad_(), case["w"].requires_grad_()
    th, tw = case["teacher_hidden"].requires_grad_(), case["teacher_weight"].requires_grad_()
    kd_loss_linear(h, w, case["y"], teacher_hidden=th, teacher_weight=tw, chunk_size=4).backward()
    assert th.grad is None and tw.grad is None and h.grad is not None and w.grad is not None
    with torch.no_grad():
        assert not kd_loss_linear(h, w, case["y"], teacher_hidden=th, teacher_weight=tw).requires_grad


def test_gradcheck_in_float64_every_reduction():
    case = make_case(5, 3, 7, torch.float64, "hidden", True, True)
    h, w, b = (case[key].requires_grad_() for key in ("h", "w", "b"))
    for reduction in ["mean", "sum", "none"]:
        assert torch.autograd.gradcheck(
            lambda h, w, b, r=reduction: kd_loss_linear(h, w, case["y"], student_bias=b, **teacher_kwargs(case),
                                                        temperature=2.0, alpha=0.4, reduction=r, chunk_size=2),
            (h, w, b))


def test_compiles_fullgraph_forward_and_backward_and_matches_eager():
    case = make_case(10, 8, 301, torch.float32, "topk", True, True, k=4)

    def step(h, w, b, y, values, indices):
        loss = kd_loss_linear(h, w, y, student_bias=b, teacher_topk=(values, indices), temperature=T, alpha=ALPHA,
                              chunk_size=4)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        params = [case[key].clone().requires_grad_() for key in ("h", "w", "b")]
        with torch._dynamo.config.patch(trace_autograd_ops=True):  # backward() in the graph, as the engine does
            loss = fn(*params, case["y"], *case["teacher_topk"])
        results.append((loss, *(p.grad for p in params)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)  # the same kernels on the same chunks


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_topk_indices_poison_the_loss_under_compile(backend):
    s = torch.randn(3, 10)
    values = torch.randn(3, 2)
    for bad in (torch.tensor([[1, 2], [4, 4], [0, 9]]), torch.tensor([[1, 2], [4, 10], [0, 9]])):
        rows = torch.compile(lambda s, v, i: kd_loss_sparse(s, v, i, reduction="none", backend=backend),
                             fullgraph=True)(s, values, bad)
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_chunk_size_is_automatic_and_bounded():
    assert chunked.auto_chunk_size(100, 32000, torch.float32, torch.device("cpu")) == 100  # one chunk: materialised
    rows = chunked.auto_chunk_size(8192, 32000, torch.float32, torch.device("cpu"))
    assert 128 <= rows < 8192 and rows * 32000 * 4 <= max(chunked._CHUNK_BYTES["cpu"], 128 * 32000 * 4)
    cuda_rows = chunked.auto_chunk_size(8192, 128256, torch.bfloat16, torch.device("cuda"))
    assert 1024 <= cuda_rows < 8192


def test_module_matches_function():
    case = make_case(6, 8, 40, torch.float32, "logits", True, True)
    module = KDLinearLoss(temperature=2.0, alpha=0.4, chunk_size=4)
    got = module(case["h"], case["w"], case["y"], student_bias=case["b"], teacher_logits=case["teacher_logits"])
    want = kd_loss_linear(case["h"], case["w"], case["y"], student_bias=case["b"],
                          teacher_logits=case["teacher_logits"], temperature=2.0, alpha=0.4, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _bad_calls():
    h, w, y = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 5])
    t = torch.randn(4, 6)
    v, i = torch.randn(4, 2), torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5]])
    return [
        ("exactly one teacher.*none", lambda: kd_loss_linear(h, w, y)),
        ("teacher_logits and teacher_topk", lambda: kd_loss_linear(h, w, y, teacher_logits=t, teacher_topk=(v, i))),
        ("teacher_logits and teacher_hidden", lambda: kd_loss_linear(h, w, teacher_logits=t, teacher_hidden=h,
                                                                     teacher_weight=w)),
        ("teacher_hidden needs teacher_weight", lambda: kd_loss_linear(h, w, teacher_hidden=h)),
        ("teacher_weight", lambda: kd_loss_linear(h, w, teacher_logits=t, teacher_weight=w)),
        ("teacher_weight", lambda: kd_loss_linear(h, w, teacher_hidden=h, teacher_weight=torch.randn(5, 3))),
        ("teacher_bias", lambda: kd_loss_linear(h, w, teacher_hidden=h, teacher_weight=w,
                                                teacher_bias=torch.randn(5))),
        ("student_hidden", lambda: kd_loss_linear(torch.randn(4), w, teacher_logits=t)),
        ("student_hidden must be float", lambda: kd_loss_linear(h.long(), w.long(), teacher_logits=t.long())),
        ("student_weight", lambda: kd_loss_linear(h, torch.randn(6, 4), teacher_logits=t)),
        ("student_weight dtype", lambda: kd_loss_linear(h, w.double(), teacher_logits=t)),
        ("student_bias", lambda: kd_loss_linear(h, w, student_bias=torch.randn(5), teacher_logits=t)),
        ("teacher_logits", lambda: kd_loss_linear(h, w, teacher_logits=torch.randn(4, 7))),
        ("teacher_logits dtype", lambda: kd_loss_linear(h, w, teacher_logits=t.double())),
        ("teacher_topk must be a pair", lambda: kd_loss_linear(h, w, teacher_topk=v)),
        ("teacher_topk indices must be an int64", lambda: kd_loss_linear(h, w, teacher_topk=(v, i.int()))),
        ("teacher_topk values", lambda: kd_loss_linear(h, w, teacher_topk=(v[:3], i[:3]))),
        ("k <= V", lambda: kd_loss_linear(h, w, teacher_topk=(torch.randn(4, 7), torch.zeros(4, 7).long()))),
        ("row 1 hold class 2 twice", lambda: kd_loss_linear(h, w, teacher_topk=(v, torch.tensor(
            [[0, 1], [2, 2], [4, 5], [0, 5]])))),
        ("row 3 hold class 6 outside", lambda: kd_loss_linear(h, w, teacher_topk=(v, torch.tensor(
            [[0, 1], [2, 3], [4, 5], [0, 6]])))),
        ("target", lambda: kd_loss_linear(h, w, torch.tensor([0, 1, 2, 6]), teacher_logits=t)),
        ("target", lambda: kd_loss_linear(h, w, y[:3], teacher_logits=t)),
        ("temperature", lambda: kd_loss_linear(h, w, teacher_logits=t, temperature=0.0)),
        ("alpha", lambda: kd_loss_linear(h, w, teacher_logits=t, alpha=2.0)),
        ("reduction", lambda: kd_loss_linear(h, w, teacher_logits=t, reduction="avg")),
        ("chunk_size", lambda: kd_loss_linear(h, w, teacher_logits=t, chunk_size=0)),
        ("backend", lambda: kd_loss_linear(h, w, teacher_logits=t, backend="cuda")),
        ("student_logits", lambda: kd_loss_sparse(torch.randn(4), v, i)),
        ("teacher_indices", lambda: kd_loss_sparse(t, v, i.float())),
        ("teacher_values", lambda: kd_loss_sparse(t, v[:3], i[:3])),
        ("row 1 hold class 3 twice", lambda: kd_loss_sparse(t, v, torch.tensor([[0, 1], [3, 3], [4, 5], [0, 5]]))),
        ("row 0 hold class -1 outside", lambda: kd_loss_sparse(t, v, torch.tensor([[-1, 1], [2, 3], [4, 5], [0, 5]]))),
        ("temperature", lambda: KDLinearLoss(temperature=-1.0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error_naming_the_argument(case):
    pattern, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_bad_indices_in_an_ignored_row_are_not_an_error():
    t = torch.randn(2, 6)
    values, indices = torch.randn(2, 2), torch.tensor([[0, 1], [0, 0]])  # row 1: padding with zeros
    loss = kd_loss_sparse(t, values, indices, torch.tensor([2, IGNORE]))
    assert torch.isfinite(loss)
