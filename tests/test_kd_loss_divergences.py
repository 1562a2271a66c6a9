"""Reverse KL, JSD and soft-capping (issue #30) on every path: the Triton kernels (one block and streamed), the native
CPU kernel, the torch reference and the chunked kd_loss_linear, against a float64 textbook formula written here.

Tolerances (u = 2^-24, float32's unit roundoff):
* per-row loss, float32 and bfloat16 inputs (both computed in float32 from the exact inputs): 1e-6 relative, the
  issue's target, reached at standard-normal and ×4 logits with C up to 32000; for rows of one class (loss 0),
  the rounding of their O(max|x|/T) terms: 2u·α·T·(max|s| + max|t|) absolute.
* gradient, max error of a row over its largest entry: every path forms p = e^(x − lse) from a float32 log-sum-exp,
  whose rounding (u·|lse|) and that of the argument (u·(|x| + |lse|)) shift each probability, for the student and
  the teacher at T and the student at 1 (the cross-entropy), so the bound is
  1e-6 + 4u·((max|s| + max|t|)/T + max|s| + 2·log C): about 5e-6 at T = 3 over ×4 logits.
* bfloat16 gradient: the float32 gradient above, stored rounded to nearest (2^-8 relative, twice on the CPU path
  with a non-unit incoming gradient): Liger's bf16 rtol of 5e-2 is far above what is held here.
* ±1e4 logits: the division by T rounds each logit by u·|x|/T, which moves every probability by that relative amount
  (test_kd_loss.py's extreme-logit test derives the same bound).
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.kernels import _kd_launch, _kd_loss_cpu, _kd_ops
from fastkd.kernels import _kd_loss_triton as tk
from fastkd.kernels._kd_common import kd_loss_reference, make_options, stats_per_row
from fastkd.kernels._kd_launch import launch_kd_backward, launch_kd_kernel
from fastkd.kernels.kd_loss import KDLinearLoss, KDLoss, kd_loss, kd_loss_linear

U = 2.0**-24
IGNORE = -100
# (divergence, jsd_beta): every divergence, JSD inside (0, 1), off-centre, and at both ends.
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]
DIV_IDS = [f"{d}" if d != "jsd" else f"jsd{b}" for d, b in DIVERGENCES]


def textbook(s, t, y, divergence, beta, temperature, alpha, softcap=None):
    """Per-row α·T²·D + (1 − α)·CE in float64 from log-probabilities (0·log 0 = 0, also in the gradient)."""
    s, t = s.double(), t.detach().double()
    if softcap is not None:
        s, t = softcap * torch.tanh(s / softcap), softcap * torch.tanh(t / softcap)
    log_p, log_q = F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1)

    def kl(log_a, log_b):
        present = log_a.exp() != 0
        return torch.where(present, log_a.exp() * (torch.where(present, log_a, 0.0)
                                                   - torch.where(present, log_b, 0.0)), 0.0).sum(1)

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        d = kl(log_q, log_p)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        d = kl(log_p, log_q)
    else:
        both_zero = (log_p == -math.inf) & (log_q == -math.inf)  # no NaN through logaddexp(-inf, -inf)'s gradient
        log_m = torch.logaddexp(torch.where(both_zero, 0.0, log_q + math.log(beta)),
                                torch.where(both_zero, 0.0, log_p + math.log1p(-beta)))
        d = beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)
    rows = alpha * temperature**2 * d
    if y is not None:
        keep = y != IGNORE
        ce = -F.log_softmax(s, 1).gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1)
        rows = torch.where(keep, rows + (1 - alpha) * ce, 0.0)
    return rows


def logits(n, c, dtype=torch.float32, scale=4.0):
    return (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype)


def targets(n, c, ignored=1):
    y = torch.randint(0, c, (n,))
    y[torch.randperm(n)[: min(ignored, n - 1)]] = IGNORE
    return y


@pytest.fixture
def stream_path(monkeypatch):
    """Force the multi-block streaming path at small C, with several blocks per row."""
    monkeypatch.setattr(tk, "MAX_SINGLE_BLOCK", 64)
    monkeypatch.setattr(tk, "STREAM_BLOCK", 64)


def finite_max(x):
    x = x.detach().float()
    return x[x.isfinite()].abs().max().item() if x.isfinite().any() else 0.0


def grad_bound(s, t, temperature):
    return 1e-6 + 4 * U * ((finite_max(s) + finite_max(t)) / temperature + finite_max(s) + 2 * math.log(s.shape[1]))


def check(s, t, y, divergence, beta, backend, temperature=3.0, alpha=0.3, softcap=None, loss_rtol=1e-6,
          grad_tol=None):
    """kd_loss per row and its gradient (through a weighted sum, so every row's incoming gradient differs) against
    the textbook formula: the loss per row within loss_rtol, the gradient per row within grad_tol of its largest
    entry (bf16: plus the stores' rounding of each entry)."""
    s_in = s.clone().requires_grad_()
    rows = kd_loss(s_in, t, y, temperature=temperature, alpha=alpha, reduction="none", backend=backend,
                   divergence=divergence, jsd_beta=beta, softcap=softcap)
    s64 = s.double().requires_grad_()
    exact = textbook(s64, t, y, divergence, beta, temperature, alpha, softcap)
    weights = torch.rand(s.shape[0], dtype=torch.float64) + 0.5
    (exact * weights).sum().backward()
    (rows * weights.float()).sum().backward()
    assert rows.dtype == torch.float32 and s_in.grad.dtype == s.dtype
    # A row of one class has a loss of 0, and keeps the rounding of its O(max|x|/T) terms, times α·T².
    floor = 2 * U * alpha * temperature * (finite_max(s) + finite_max(t)) if s.shape[1] == 1 else 1e-300
    loss_error = ((rows.double() - exact).abs() / (loss_rtol * exact.abs() + floor)).max().item()
    assert loss_error <= 1.0, f"loss: {loss_error:.3g} times the allowed error"
    tol = grad_bound(s, t, temperature) if grad_tol is None else grad_tol
    scale = s64.grad.abs().max(1, keepdim=True).values + 1e-30
    # bf16: the store's rounding (unit roundoff 2^-8); the CPU path rounds twice here, its row gradient in the
    # forward and the product with the incoming gradient in the backward (the Triton one scales before its store).
    rounding = (2.0**-7 if backend == "auto" else 2.0**-8) if s.dtype == torch.bfloat16 else 0.0
    allowed = tol * scale + rounding * s64.grad.abs()
    excess = ((s_in.grad.double() - s64.grad).abs() / allowed).max().item()
    assert excess <= 1.0, f"gradient: {excess:.3g} times the allowed error (tol {tol:.3g})"
    return rows, s_in.grad


PATHS = ["triton", "stream", "cpu", "torch"]


def backend_of(request, path):
    if path == "stream":
        request.getfixturevalue("stream_path")
        return "triton"
    return {"cpu": "auto"}.get(path, path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
def test_every_divergence_on_every_path_matches_float64(request, divergence, beta, path, dtype):
    backend = backend_of(request, path)
    for n, c, with_target in ((1, 1, True), (1, 37, False), (5, 300, True)):  # C = 1, odd, several blocks
        y = targets(n, c) if with_target else None
        check(logits(n, c, dtype), logits(n, c, dtype), y, divergence, beta, backend)


@pytest.mark.parametrize("path", ["triton", "stream", "cpu"])
@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.1)],
                         ids=["reverse_kl", "jsd0.3", "jsd0.1"])
def test_divergence_alone_is_within_1e6_at_every_temperature(request, divergence, beta, path):
    """α = 1 without a target: the divergence alone, where cancellation would show (the cross-entropy is larger).
    JSD at a skewed β and T = 3 is the hardest: its terms are O(r²) from O(r) pieces, so a shift of every log-ratio
    by one rounding (of a normaliser) costs 2e-6 there."""
    backend = backend_of(request, path)
    n, c = (64, 1271) if path == "cpu" else (2, 300)  # many rows: each rounds its normalisers differently
    s, t = logits(n, c, scale=1.0), logits(n, c, scale=1.0)
    for temperature in (0.5, 1.0, 3.0):
        check(s, t, None, divergence, beta, backend, temperature=temperature, alpha=1.0)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_divergences_at_32000_classes_within_1e6(backend):
    """The issue's widest case: C = 32000 (streamed on Triton), standard-normal logits, the divergence alone."""
    n = 8 if backend == "auto" else 1  # the interpreter is slow on wide rows
    s, t = logits(n, 32000, scale=1.0), logits(n, 32000, scale=1.0)
    for divergence, beta in (("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9)):
        check(s, t, None, divergence, beta, backend, temperature=1.0, alpha=1.0)


@pytest.mark.parametrize("path", ["triton", "stream", "cpu"])
def test_jsd_at_its_ends_is_forward_and_reverse_kl_bit_for_bit(request, path):
    backend = backend_of(request, path)
    s, t, y = logits(4, 150), logits(4, 150), targets(4, 150)
    results = {}
    for key, (divergence, beta) in {"fwd": ("forward_kl", 0.5), "jsd0": ("jsd", 0.0), "rev": ("reverse_kl", 0.5),
                                    "jsd1": ("jsd", 1.0)}.items():
        s_in = s.clone().requires_grad_()
        rows = kd_loss(s_in, t, y, temperature=2.0, alpha=0.4, reduction="none", backend=backend,
                       divergence=divergence, jsd_beta=beta)
        rows.sum().backward()
        results[key] = rows.detach(), s_in.grad
    for end, kl in (("jsd0", "fwd"), ("jsd1", "rev")):
        assert torch.equal(results[end][0], results[kl][0]) and torch.equal(results[end][1], results[kl][1]), end
    assert not torch.equal(results["fwd"][0], results["rev"][0])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES[:4], ids=DIV_IDS[:4])
def test_extreme_logits_and_masked_classes(request, path, divergence, beta):
    backend = backend_of(request, path)
    n, c, temperature = 4, 200, 3.0
    s, t = logits(n, c, scale=1e4), logits(n, c, scale=1e4)
    masked = torch.zeros(c, dtype=torch.bool)
    masked[64:128] = True  # a whole streamed block
    masked[torch.randperm(c)[:20]] = True
    y = targets(n, c)
    masked[3] = False
    y[y != IGNORE] = 3
    s[:, masked], t[:, masked] = -math.inf, -math.inf
    largest = max(s[s.isfinite()].abs().max().item(), t[t.isfinite()].abs().max().item())
    # Each logit's division by T rounds by u·|x|/T: every probability moves by up to 2u·max|x|/T relative, for the
    # student and the teacher; the loss (a sum of such terms times O(max|x|/T) log-ratios) by the same relative.
    bound = 8 * U * largest / temperature
    rows, grad = check(s, t, y, divergence, beta, backend, temperature=temperature, loss_rtol=bound,
                       grad_tol=1e-6 + bound)
    assert torch.isfinite(rows).all() and torch.all(grad[:, masked] == 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES[:3], ids=DIV_IDS[:3])
def test_softcap_matches_the_capped_formula_and_its_chain_rule(request, path, divergence, beta):
    """Logits up to ±40 against a cap of 5 (deep in tanh's saturation, where its slope is ~1e-6), and small ones
    near 0 (the series' range): loss and gradient as the float64 formula on c·tanh(z/c)."""
    backend = backend_of(request, path)
    n, c = 5, 300
    s, t = logits(n, c, scale=10.0), logits(n, c, scale=10.0)
    s[0, :50] *= 1e-3
    y = targets(n, c)
    check(s, t, y, divergence, beta, backend, softcap=5.0)
    check(s.bfloat16(), t.bfloat16(), y, divergence, beta, backend, softcap=5.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES[1:4], ids=DIV_IDS[1:4])
def test_all_rows_ignored_give_zero_and_zero_gradient(request, path, divergence, beta):
    backend = backend_of(request, path)
    s = logits(3, 100).requires_grad_()
    y = torch.full((3,), IGNORE)
    for fused in ((False, True) if backend != "torch" else (False,)):
        s.grad = None
        loss = kd_loss(s, logits(3, 100), y, backend=backend, divergence=divergence, jsd_beta=beta, softcap=7.0,
                       fused_backward=fused)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(s.grad == 0)


@pytest.mark.parametrize("path", ["triton", "stream"])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES[1:4], ids=DIV_IDS[1:4])
def test_triton_writes_every_output_over_poisoned_buffers(request, path, divergence, beta):
    """Forward with the gradient (fused), and forward with statistics then the backward kernel: NaN-filled outputs
    all overwritten, and both gradients the reference's."""
    request.getfixturevalue("stream_path") if path == "stream" else None
    n, c, temperature, alpha = 5, 150, 3.0, 0.3
    s, t, y = logits(n, c, torch.bfloat16), logits(n, c, torch.bfloat16), targets(n, c)
    hyper = dict(divergence=divergence, jsd_beta=beta, softcap=9.0)
    rows = torch.full((n,), math.nan)
    grad = torch.full((n, c), math.nan, dtype=torch.bfloat16)
    stats = torch.full((n, stats_per_row(divergence)), math.nan)
    options = make_options(s.device, temperature, alpha, IGNORE, **hyper)
    launch_kd_kernel(s, t, y, options, rows, grad)
    rows_2 = torch.full((n,), math.nan)
    launch_kd_kernel(s, t, y, options, rows_2, stats=stats)
    grad_2 = torch.full((n, c), math.nan, dtype=torch.bfloat16)
    launch_kd_backward(s, t, y, stats, torch.ones(n), options, grad_2)
    s64 = s.double().requires_grad_()
    exact = textbook(s64, t, y, divergence, beta, temperature, alpha, softcap=9.0)
    exact.sum().backward()
    for r, g in ((rows, grad), (rows_2, grad_2)):
        assert torch.isfinite(r).all() and torch.isfinite(g.float()).all()
        torch.testing.assert_close(r.double(), exact, rtol=1e-6, atol=0)
        torch.testing.assert_close(g.double(), s64.grad, rtol=2.0**-8, atol=1e-6 * s64.grad.abs().max().item())


@pytest.mark.parametrize("divergence, beta", DIVERGENCES[1:4], ids=DIV_IDS[1:4])
def test_cpu_kernel_writes_every_output_into_a_poisoned_buffer(divergence, beta):
    n, c = 64, 1000  # on every thread
    s, t, y = logits(n, c), logits(n, c), targets(n, c)
    grad_out = torch.full((n, c), math.nan)
    options = make_options("cpu", 3.0, 0.3, IGNORE, divergence, beta, 6.0)
    rows, _, grad = _kd_ops._native_forward(s, t, y, options, "none", "grad", grad_out)
    assert grad.data_ptr() == grad_out.data_ptr() and torch.isfinite(grad).all() and torch.isfinite(rows).all()
    s64 = s.double().requires_grad_()
    exact = textbook(s64, t, y, divergence, beta, 3.0, 0.3, softcap=6.0)
    exact.sum().backward()
    torch.testing.assert_close(rows.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=0, atol=grad_bound(s, t, 3.0) * s64.grad.abs().max())


@pytest.mark.parametrize("divergence, beta, softcap", [("reverse_kl", 0.5, None), ("jsd", 0.3, None),
                                                       ("jsd", 0.7, 4.0), ("forward_kl", 0.5, 2.0)])
def test_cpu_path_passes_gradcheck_in_float64(divergence, beta, softcap):
    s, t = logits(3, 11, torch.float64).requires_grad_(), logits(3, 11, torch.float64)
    y = torch.tensor([2, IGNORE, 10])
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, t, y, temperature=2.0, alpha=0.4, reduction="none",
                                                      divergence=divergence, jsd_beta=beta, softcap=softcap), (s,))


def test_annealed_beta_softcap_and_temperature_never_compile_on_the_cpu():
    """Twenty values each of jsd_beta, softcap and temperature, every divergence: the CPU kernel takes them as
    arguments, so no torch.compile graph is made and the library is loaded once."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kd_loss(logits(2, 3), logits(2, 3), divergence="jsd")
    loads = _kd_loss_cpu.kernel.cache_info().misses
    for i in range(20):
        s = logits(8, 40).requires_grad_()
        loss = kd_loss(s, logits(8, 40), targets(8, 40), temperature=0.5 + 0.2 * i, jsd_beta=i / 19,
                       softcap=1.0 + i, divergence=("forward_kl", "reverse_kl", "jsd")[i % 3])
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert counters["stats"]["unique_graphs"] == 0
    assert _kd_loss_cpu.kernel.cache_info().misses == loads


def test_triton_launches_for_twenty_values_share_one_compiled_variant(monkeypatch):
    """Triton compiles once per argument types and constexprs: temperature, α, jsd_beta and softcap reach both
    kernels in one float64 device tensor (KDOptions.scalars) that they read at run time, so twenty values of each
    launch one variant each, with no float argument at all (a recorder stands in for the kernels)."""
    for kernel in (tk.kd_loss_fwd_kernel, tk.kd_loss_bwd_kernel):
        # The Python function under both the JIT and the interpreter: its annotations say what is a constexpr.
        params = inspect.signature(kernel.fn).parameters
        constexpr = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
        assert {"DIVERGENCE", "SOFTCAP"} <= constexpr and "scalars_ptr" in params
        assert not {"beta", "softcap", "inv_t", "temperature", "alpha"} & set(params)
    variants, values = set(), set()

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                assert not any(isinstance(v, float) for v in (*args, *meta.values()))
                variants.add(tuple(sorted(meta.items())))
                (scalars,) = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.float64]
                values.add(tuple(scalars.tolist()))
            return launch

    for name in ("kd_loss_fwd_kernel", "kd_loss_bwd_kernel"):
        monkeypatch.setattr(tk, name, Recorder())
    x = logits(2, 50)
    for i in range(20):
        options = make_options(x.device, 0.5 + 0.2 * i, 0.5, IGNORE, "jsd", i / 19, 1.0 + i)
        launch_kd_kernel(x, x, None, options, torch.empty(2), stats=torch.empty(2, 5))
        launch_kd_backward(x, x, None, torch.empty(2, 5), torch.ones(2), options, torch.empty(2, 50))
    assert len(variants) == 2  # the forward's and the backward's
    assert len(values) == 20  # the values did reach the launches, in the scalars tensor


def _bad_calls():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    h, w = torch.randn(4, 3), torch.randn(6, 3)
    calls = []
    for name, kwargs in (("divergence", dict(divergence="kl")), ("jsd_beta", dict(jsd_beta=1.5)),
                         ("jsd_beta", dict(jsd_beta=-0.1)), ("jsd_beta", dict(jsd_beta=True)),
                         ("softcap", dict(softcap=0)), ("softcap", dict(softcap=-1.0)),
                         ("softcap", dict(softcap=math.inf))):
        calls += [(name, lambda kw=kwargs: kd_loss(s, t, divergence=kw.get("divergence", "jsd"), **{
                      k: v for k, v in kw.items() if k != "divergence"})),
                  (name, lambda kw=kwargs: KDLoss(**kw)),
                  (name, lambda kw=kwargs: kd_loss_linear(h, w, teacher_logits=t, **kw)),
                  (name, lambda kw=kwargs: KDLinearLoss(**kw))]
    return calls


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_divergence_arguments_are_one_value_error_before_any_kernel(monkeypatch, case):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were checked")

    for name in ("_triton_forward", "_native_forward", "_torch_forward"):
        monkeypatch.setattr(_kd_ops, name, no_kernel)
    monkeypatch.setattr(_kd_loss_cpu, "run", no_kernel)
    monkeypatch.setattr(_kd_launch, "launch_kd_kernel", no_kernel)
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("teacher", ["logits", "hidden"])
@pytest.mark.parametrize("divergence, beta, softcap", [("reverse_kl", 0.5, None), ("jsd", 0.4, None),
                                                       ("jsd", 0.6, 8.0)])
def test_kd_loss_linear_every_divergence_matches_materialised_float64(backend, teacher, divergence, beta, softcap):
    """Chunked (chunk of 3 rows over 7), teacher as logits or hidden states + weight: loss and the gradients of
    hidden, weight and bias against the float64 formula on materialised logits. The logits are float32 matmuls
    (error ~ γ_H·|h|·|W|), well inside the 1e-5 relative held here."""
    n, hidden, vocabulary, temperature = 7, 16, 97, 2.0
    h, w, b = logits(n, hidden, scale=1.0), logits(vocabulary, hidden, scale=0.5), torch.randn(vocabulary)
    th, tw = logits(n, 12, scale=1.0), logits(vocabulary, 12, scale=0.5)
    y = targets(n, vocabulary, ignored=2)
    teacher_args = dict(teacher_logits=th @ tw.T) if teacher == "logits" else dict(teacher_hidden=th,
                                                                                   teacher_weight=tw)
    module = KDLinearLoss(temperature=temperature, alpha=0.6, chunk_size=3, backend=backend, divergence=divergence,
                          jsd_beta=beta, softcap=softcap)
    params = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = module(params[0], params[1], y, student_bias=params[2], **teacher_args)
    loss.backward()
    exact_params = [x.double().requires_grad_() for x in (h, w, b)]
    s64 = exact_params[0] @ exact_params[1].T + exact_params[2]
    t64 = th.double() @ tw.double().T
    rows = textbook(s64, t64, y, divergence, beta, temperature, 0.6, softcap)
    exact = rows.sum() / (y != IGNORE).sum()
    exact.backward()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0)
    for p, e in zip(params, exact_params):
        torch.testing.assert_close(p.grad.double(), e.grad, rtol=1e-4, atol=1e-5 * e.grad.abs().max().item())


@pytest.mark.parametrize("c", [300, 9000], ids=["one-block", "streamed"])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES[1:3] + DIVERGENCES[4:], ids=DIV_IDS[1:3] + DIV_IDS[4:])
def test_bytes_moved_per_divergence(monkeypatch, divergence, beta, c):
    """As test_kd_loss_floor's count for forward KL, per row: generic autograd reads s, t in the forward and s, t
    again in the backward, which writes ∂s (5 units); fused_backward 3 in one block, 5 streamed. The statistics a
    row grow by one float for reverse KL (E_p[(s − t)/T]) and two for JSD (that or KL(p‖m), and the gap). A streamed
    JSD row with 0 < β < 1 reads s and t once more in the forward (its terms need the normalisers): 7 units generic
    and fused, 4 with no gradient; at β = 0 and 1 it skips that pass. Each program also reads the float options
    (KDOptions.scalars, float64): T, then T and α (again every block of a streamed gradient), and β for JSD."""
    from test_kd_loss_floor import MovedBytes

    n, elem, target_bytes, flt = 6, 4, 8, 4
    s, t, y = torch.randn(n, c) * 3, torch.randn(n, c) * 3, torch.randint(0, c, (n,))
    count = MovedBytes(monkeypatch)
    logits_bytes = n * c * elem
    k = stats_per_row(divergence)
    assert k == {"reverse_kl": 4, "jsd": 5}[divergence]
    streamed = c > tk.MAX_SINGLE_BLOCK
    jsd_pass = 2 * logits_bytes if streamed and divergence == "jsd" and 0 < beta < 1 else 0
    beta_bytes = 8 if divergence == "jsd" else 0
    blocks = -(-c // tk.STREAM_BLOCK) if streamed else 1
    scalars = n * (24 + beta_bytes)  # a forward's: T; T and α; β
    backward_scalars = n * (8 + beta_bytes + 16 * blocks)  # T; β; T and α once or every block
    common_loads, common_stores = 2 * logits_bytes + n * (target_bytes + elem) + scalars, n * flt
    kw = dict(temperature=3.0, alpha=0.3, backend="triton", divergence=divergence, jsd_beta=beta)

    s_in = s.clone().requires_grad_()
    loss = kd_loss(s_in, t, y, **kw)
    assert count.take() == (common_loads + jsd_pass, common_stores + n * k * flt)
    loss.backward()
    assert count.take() == (2 * logits_bytes + n * (target_bytes + k * flt + flt) + backward_scalars, logits_bytes)

    s_in = s.clone().requires_grad_()
    loss = kd_loss(s_in, t, y, fused_backward=True, **kw)
    second_pass = 2 * logits_bytes if streamed else 0
    stream_weights = n * 16 * blocks if streamed else 0
    assert count.take() == (common_loads + n * flt + second_pass + jsd_pass + stream_weights,
                            common_stores + logits_bytes)
    loss.backward()
    assert count.take() == (0, 0)

    with torch.no_grad():
        kd_loss(s, t, y, **kw)
    assert count.take() == (common_loads + jsd_pass, common_stores)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("divergence, beta", DIVERGENCES[1:4], ids=DIV_IDS[1:4])
def test_a_nan_logit_reaches_the_loss_without_a_target(request, path, divergence, beta):
    """The 0·log 0 guards (p > 0) are false for NaN: a NaN must still reach the row's loss, not be skipped."""
    backend = backend_of(request, path)
    s, t = logits(3, 40), logits(3, 40)
    s[0, 5], t[1, 7] = math.nan, math.nan
    rows = kd_loss(s, t, temperature=2.0, reduction="none", backend=backend, divergence=divergence, jsd_beta=beta)
    assert torch.isnan(rows[:2]).all() and torch.isfinite(rows[2])


@pytest.mark.parametrize("fused", [False, True], ids=["generic", "fused_backward"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_every_divergence_compiles_fullgraph_and_matches_eager(backend, fused):
    """Through the op's named options (its fake makes JSD's five statistics a row on the generic Triton path)."""
    torch._dynamo.reset()
    s0, t, y = logits(8, 33), logits(8, 33), targets(8, 33)
    for divergence, beta, softcap in (("reverse_kl", 0.5, None), ("jsd", 0.3, 6.0)):
        def loss_of(s, divergence=divergence, beta=beta, softcap=softcap):
            return kd_loss(s, t, y, temperature=2.0, alpha=0.4, backend=backend, fused_backward=fused,
                           divergence=divergence, jsd_beta=beta, softcap=softcap)

        assert torch._dynamo.explain(loss_of)(s0.clone().requires_grad_()).graph_break_count == 0
        s_c, s_e = s0.clone().requires_grad_(), s0.clone().requires_grad_()
        torch.compile(loss_of, fullgraph=True)(s_c).backward()
        loss_of(s_e).backward()
        torch.testing.assert_close(s_c.grad, s_e.grad)


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["uncapped", "softcap"])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
def test_the_no_compiler_fallbacks_closed_form_gradient(divergence, beta, softcap):
    """Where no C++ compiler is found, backend="auto" on the CPU runs plain torch inside the op, where autograd
    cannot: its closed-form gradient (reference_grad) against autograd through the textbook formula, float64."""
    s, t, y = logits(6, 50, torch.float64), logits(6, 50, torch.float64), targets(6, 50)
    s[:, :5] = t[:, :5] = -math.inf  # masked classes: 0, not NaN
    y[y < 5] = 7
    options = make_options("cpu", 2.0, 0.4, IGNORE, divergence, beta, softcap)
    rows, _, grad = _kd_ops._torch_forward(s, t, y, options, "none", "grad")
    s64 = s.clone().requires_grad_()
    exact = textbook(s64, t, y, divergence, beta, 2.0, 0.4, softcap)
    exact.sum().backward()
    torch.testing.assert_close(rows, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, s64.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("empty", ["teacher", "student"])
@pytest.mark.parametrize("divergence, beta", DIVERGENCES, ids=DIV_IDS)
def test_the_reference_autograd_where_one_side_has_no_mass(empty, divergence, beta):
    """Classes where only one side has mass (a top-k teacher's logits are -inf outside its k classes; a student's
    masked vocabulary): autograd through the torch reference (backend="torch", also the unsharded loss the sharded
    tests compare with) gives the textbook's loss and, where that is finite, its gradient; and no NaN in the gradient
    wherever the textbook's has none (JSD's ends once took a NaN from a branch they did not select)."""
    s, t, y = logits(5, 40, torch.float64), logits(5, 40, torch.float64), targets(5, 40)
    (t if empty == "teacher" else s)[:, 6:30] = -math.inf
    y[(y >= 6) & (y < 30)] = 3  # the target keeps the student's mass: a finite cross-entropy
    options = dict(temperature=2.0, alpha=0.4, ignore_index=IGNORE, divergence=divergence, jsd_beta=beta)
    s_ref, s_text = s.clone().requires_grad_(), s.clone().requires_grad_()
    rows = kd_loss_reference(s_ref, t, y, reduction="none", **options)
    rows.sum().backward()
    exact = textbook(s_text, t, y, divergence, beta, 2.0, 0.4)
    exact.sum().backward()
    torch.testing.assert_close(rows, exact, rtol=1e-12, atol=1e-12)  # +inf rows included
    if torch.isfinite(exact).all():
        torch.testing.assert_close(s_ref.grad, s_text.grad, rtol=1e-10, atol=1e-12)
    if not s_text.grad.isnan().any():
        assert not s_ref.grad.isnan().any()


def test_a_compiled_loss_takes_a_new_temperature_and_beta_without_failing():
    """Dynamo makes a float that changed between calls symbolic; the option checks must take one (math.isfinite
    does not, and the second value failed). The ops take the values in a tensor, so no later value recompiles:
    counted in test_kd_loss_no_recompile.py."""
    s, t = torch.randn(4, 37, dtype=torch.float64), torch.randn(4, 37, dtype=torch.float64)
    y = torch.randint(0, 37, (4,))
    compiled = torch.compile(lambda s, T, b: kd_loss(s, t, y, temperature=T, alpha=0.3, divergence="jsd",
                                                    jsd_beta=b, backend="torch"), backend="eager", fullgraph=True)
    for temperature, beta in [(1.0, 0.2), (2.0, 0.4), (3.5, 0.7)]:
        expected = kd_loss(s, t, y, temperature=temperature, alpha=0.3, divergence="jsd", jsd_beta=beta,
                           backend="torch")
        torch.testing.assert_close(compiled(s, temperature, beta), expected, rtol=1e-12, atol=0)
