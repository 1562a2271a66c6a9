"""kd_loss at the physical floor: the bytes each path moves (counted in the Triton interpreter), no recompiles per
hyperparameter value, float32 per-row losses as accurate as torch's, and gradients stored rounded to nearest even."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from triton.runtime import interpreter

from fastkd.kernels import _kd_loss_triton as tk
from fastkd.kernels._kd_common import make_options
from fastkd.kernels._kd_launch import launch_kd_kernel
from fastkd.kernels.kd_loss import kd_loss

# The Triton cases run on CPU tensors, which only the interpreter takes (and only it can count bytes). Where this
# process compiles Triton for a GPU instead, they skip here and test_the_triton_cases_pass_in_the_interpreter runs
# this module again in a subprocess with TRITON_INTERPRET=1: they run on every machine, never skipped silently.
needs_interpreter = pytest.mark.skipif(not tk.INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1: "
                                       "test_the_triton_cases_pass_in_the_interpreter runs it in a subprocess")
BACKENDS = [pytest.param("triton", marks=needs_interpreter), "auto"]


def test_the_triton_cases_pass_in_the_interpreter():
    if tk.INTERPRETED:
        pytest.skip("this process runs in the interpreter already: the Triton cases ran here")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:randomly", "-p",
                           "no:cacheprovider", "-k", "not test_the_triton_cases_pass_in_the_interpreter"],
                          cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0 and "skipped" not in summary and "passed" in summary, proc.stdout[-4000:]


class MovedBytes:
    """Bytes every Triton load and store moves, counted lane by lane (masked-off lanes move nothing)."""

    def __init__(self, monkeypatch):
        self.loaded = self.stored = 0
        real_load = interpreter.InterpreterBuilder.create_masked_load
        real_store = interpreter.InterpreterBuilder.create_masked_store

        def load(builder, ptrs, mask, *args):
            self.loaded += int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
            return real_load(builder, ptrs, mask, *args)

        def store(builder, ptrs, value, mask, *args):
            self.stored += int(mask.data.sum()) * value.data.dtype.itemsize
            return real_store(builder, ptrs, value, mask, *args)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load)
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", store)

    def take(self) -> tuple[int, int]:
        moved, self.loaded, self.stored = (self.loaded, self.stored), 0, 0
        return moved


N, ELEM, TARGET, FLOAT = 6, 4, 8, 4  # rows; bytes of a float32 logit, an int64 target, a float32 loss or scale
# The float options each program reads from KDOptions.scalars (float64; forward KL, no cap): T at its start, T and
# α where the weights are needed, and T and α again for every block of a streamed gradient loop.
SCALARS, WEIGHTS = 24, 16


@needs_interpreter
@pytest.mark.parametrize("c", [300, 9000], ids=["one-block", "streamed"])
def test_bytes_each_path_moves_match_the_design(monkeypatch, c):
    """Per row: the logits (C elements each of s, t, ∂s) plus a few scalars: target, s[y], loss, statistics, scale,
    and the float options T and α (each launch's programs read them from the device: SCALARS bytes a row, and
    WEIGHTS more for every block of a streamed gradient).
    Generic autograd: forward reads s and t (2 units), backward reads them again and writes ∂s (3): 5 units at any
    C, nothing of size (N, C) saved. fused_backward: 3 units in one block, 5 when streamed (statistics pass, then
    the gradient pass). No gradient wanted: 2 units."""
    torch.manual_seed(c)
    s = torch.randn(N, c) * 3
    t = torch.randn(N, c) * 3
    y = torch.randint(0, c, (N,))
    count = MovedBytes(monkeypatch)
    logits = N * c * ELEM
    common_loads, common_stores = 2 * logits + N * (TARGET + ELEM + SCALARS), N * FLOAT  # s, t, y, s[y], T, α; loss

    s_in = s.clone().requires_grad_()
    loss = kd_loss(s_in, t, y, temperature=3.0, alpha=0.3, backend="triton")
    assert count.take() == (common_loads, common_stores + N * 3 * FLOAT)  # + the three log-sum-exps
    loss.backward()
    # s, t, y, the log-sum-exps, the incoming per-row gradient, T and α; ∂s
    blocks = 1 if c <= tk.MAX_SINGLE_BLOCK else -(-c // tk.STREAM_BLOCK)
    backward_scalars = SCALARS - WEIGHTS + WEIGHTS * blocks  # T, then T and α once or per block
    assert count.take() == (2 * logits + N * (TARGET + 3 * FLOAT + FLOAT + backward_scalars), logits)

    s_in = s.clone().requires_grad_()
    loss = kd_loss(s_in, t, y, temperature=3.0, alpha=0.3, backend="triton", fused_backward=True)
    second_pass = 2 * logits if c > tk.MAX_SINGLE_BLOCK else 0
    stream_weights = N * WEIGHTS * blocks if c > tk.MAX_SINGLE_BLOCK else 0
    assert count.take() == (common_loads + N * FLOAT + second_pass + stream_weights, common_stores + logits)  # + ∂s
    loss.backward()
    assert count.take() == (0, 0)  # the forward's gradient is handed to autograd as it is

    with torch.no_grad():
        kd_loss(s, t, y, temperature=3.0, alpha=0.3, backend="triton")
    assert count.take() == (common_loads, common_stores)


@needs_interpreter
def test_the_generic_path_keeps_no_logit_sized_buffer_between_forward_and_backward():
    s = (torch.randn(5, 300) * 3).requires_grad_()
    t = torch.randn(5, 300) * 3
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = kd_loss(s, t, torch.randint(0, 300, (5,)), backend="triton")
    big = [x for x in saved if x.numel() >= s.numel()]
    # Only the inputs themselves (no copy): s and t. Besides: 3 log-sum-exps and the target a row (the mean is
    # taken inside the op, whose backward recounts the kept rows from the target); and the four float options.
    assert {x.untyped_storage().data_ptr() for x in big} <= {s.untyped_storage().data_ptr(),
                                                              t.untyped_storage().data_ptr()}, [x.shape for x in big]
    assert sum(x.numel() for x in saved if x.numel() < s.numel()) == 5 * (3 + 1) + 4
    loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_retained_graph_gives_the_same_gradient_again_and_a_scaled_loss_a_scaled_one(backend, reduction):
    """The CPU backward hands its saved gradient to autograd as it is when the incoming gradient is 1: a second
    backward through the retained graph must still see it unchanged, and a weighted loss must scale it."""
    torch.manual_seed(5)
    s, t = (torch.randn(6, 301) * 3).requires_grad_(), torch.randn(6, 301) * 3
    y = torch.randint(0, 301, (6,))
    loss = kd_loss(s, t, y, temperature=2.0, alpha=0.4, reduction=reduction, backend=backend)
    loss.backward(retain_graph=True)
    once = s.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(s.grad, 2 * once, rtol=0, atol=0)  # x + x is exact
    s.grad = None
    (2.5 * loss).backward()
    torch.testing.assert_close(s.grad, 2.5 * once, rtol=2e-7, atol=0)  # one rounding of the product apart


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_backward_gives_the_generic_gradient(backend, reduction):
    torch.manual_seed(3)
    s, t = torch.randn(7, 513) * 4, torch.randn(7, 513) * 4
    y = torch.randint(0, 513, (7,))
    y[2] = -100  # an ignored row: not counted by the mean, zero gradient
    grads = []
    for fused in (False, True):
        s_in = s.clone().requires_grad_()
        kd_loss(s_in, t, y, temperature=2.0, alpha=0.6, reduction=reduction, backend=backend,
                fused_backward=fused).backward()
        grads.append(s_in.grad)
    # The same float32 arithmetic, the scale applied before instead of after the store: within a rounding or two.
    torch.testing.assert_close(grads[1], grads[0], rtol=4e-7, atol=1e-9)
    assert grads[1][2].abs().max() == 0


def test_fused_backward_needs_a_reduced_loss():
    s = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(ValueError, match="fused_backward"):
        kd_loss(s, torch.randn(2, 5), reduction="none", fused_backward=True)
    with pytest.raises(ValueError, match="fused_backward"):
        kd_loss(s, torch.randn(2, 5), fused_backward="yes")


def test_annealed_hyperparameters_class_counts_and_dtypes_never_compile_on_the_cpu():
    """Fifty temperatures, α values, ignore indices, reductions and batch sizes, over 15 class counts and every
    dtype: the native CPU kernel takes them all as arguments. No torch.compile graph is ever made (so no recompile,
    and no limit of 8 graphs to run into), and the kernel library is loaded once."""
    from torch._dynamo.utils import counters

    from fastkd.kernels import _kd_loss_cpu

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    kd_loss(torch.randn(2, 3), torch.randn(2, 3))  # the library is built or loaded here, at the latest
    loads = _kd_loss_cpu.kernel.cache_info().misses
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for i in range(50):
        n, c, dtype = (16, 24)[i % 2], 3 + 4 * (i % 15), dtypes[i % 4]
        s_i = torch.randn(n, c).to(dtype).requires_grad_()
        reduction = ("mean", "sum", "none")[i % 3]
        loss = kd_loss(s_i, torch.randn(n, c).to(dtype), torch.randint(0, c, (n,)), temperature=0.5 + 0.1 * i,
                       alpha=i / 49, ignore_index=-100 - i, reduction=reduction)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(s_i.grad.float()).all()
    assert counters["stats"]["unique_graphs"] == 0
    assert _kd_loss_cpu.kernel.cache_info().misses == loads


def float64_rows(s, t, y, temperature, alpha):
    s64, t64 = s.double(), t.double()
    log_p_s, log_p_t = F.log_softmax(s64 / temperature, 1), F.log_softmax(t64 / temperature, 1)
    rows = alpha * temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    return rows if y is None else rows + (1 - alpha) * F.cross_entropy(s64, y, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [1271, 32000, 128256])
def test_float32_rows_are_within_1e6_of_float64(backend, c):
    """Standard-normal logits, as in the peer comparison: the per-row loss within 1e-6 relative + 1e-8 absolute
    at every temperature, the KL alone (α = 1, no target: the cancellation-prone part) and with the cross-entropy
    (torch's own float32 kl_div is within about 9e-7 here)."""
    torch.manual_seed(c)
    n = 4 if backend == "triton" and c > 2000 else 16  # the interpreter is slow on wide rows
    s, t = torch.randn(n, c), torch.randn(n, c)
    y = torch.randint(0, c, (n,))
    for temperature in (0.5, 1.0, 3.0):
        for target, alpha in ((None, 1.0), (y, 0.5)):
            rows = kd_loss(s, t, target, temperature=temperature, alpha=alpha, reduction="none", backend=backend)
            exact = float64_rows(s, t, target, temperature, alpha)
            error = ((rows.double() - exact).abs() / (1e-6 * exact.abs() + 1e-8)).max().item()
            assert error <= 1.0, f"T={temperature}, alpha={alpha}: {error:.2f} times the allowed error"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_are_stored_rounded_to_nearest_even(dtype):
    """The kernel's float32 gradient, stored into a bf16/fp16 buffer, equals torch's round-to-nearest-even cast of
    the same float32 values, bit for bit (a truncating store would differ in about half the elements)."""
    torch.manual_seed(1)
    n, c = 8, 777
    s, t = (torch.randn(n, c) * 3).to(dtype), (torch.randn(n, c) * 3).to(dtype)
    y = torch.randint(0, c, (n,))
    rows = torch.empty(n)
    exact, stored = torch.full((n, c), math.nan), torch.full((n, c), math.nan, dtype=dtype)
    options = make_options(s.device, 3.0, 0.3, -100)
    launch_kd_kernel(s, t, y, options, rows, exact)
    launch_kd_kernel(s, t, y, options, rows, stored)
    assert torch.equal(stored.view(torch.int16), exact.to(dtype).view(torch.int16))
    assert (exact.to(dtype).float() != exact).float().mean() > 0.5  # the rounding really happens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_gradients_are_stored_rounded_to_nearest_even(dtype):
    """The CPU kernel computes in float32 from the (exactly) widened inputs, so its gradient for low-precision
    logits is its float32 gradient for the same values, stored with torch's round-to-nearest-even cast, bit for bit."""
    torch.manual_seed(2)
    n, c = 8, 777
    s, t = (torch.randn(n, c) * 3).to(dtype), (torch.randn(n, c) * 3).to(dtype)
    y = torch.randint(0, c, (n,))
    low, wide = s.clone().requires_grad_(), s.float().requires_grad_()
    kd_loss(low, t, y, temperature=3.0, alpha=0.3).backward()
    kd_loss(wide, t.float(), y, temperature=3.0, alpha=0.3).backward()
    assert torch.equal(low.grad.view(torch.int16), wide.grad.to(dtype).view(torch.int16))
    assert (wide.grad.to(dtype).float() != wide.grad).float().mean() > 0.5  # the rounding really happens
