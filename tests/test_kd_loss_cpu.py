"""The native CPU kernel (kernels/kd_loss_cpu.cpp): every output written, the same bits on any thread count, the
caller's gradient buffer, and its build: once per machine into the cache, with one clear error when it cannot."""
import functools
import math

import pytest
import torch

from fastkd.kernels import _kd_loss_cpu, _kd_ops
from fastkd.kernels._kd_common import make_options
from fastkd.kernels.kd_loss import kd_loss, kd_loss_linear, kd_loss_reference, kd_loss_sparse

T, ALPHA, IGNORE = 3.0, 0.3, -100


def _inputs(n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = (torch.randn(n, c, generator=g, dtype=torch.float64) * 4).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[1] = IGNORE
    return s, t, y


def _gradient_bound(s, t, u=2.0**-24):
    """Float32 error bound per gradient element: each softmax term p = e^(x − m) ≤ 1 carries the rounding of its
    argument (≤ u·(|x| + |m|) ≤ 2u·max|x|) plus about 3u from exp, the normaliser and the product; the KL terms are
    weighted α·T (arguments at 1/T), the cross-entropy term 1 − α (arguments at 1); 2u more for the final sums."""
    a_s, a_t = s.abs().max().item(), t.abs().max().item()
    return u * (ALPHA * T * (2 * a_s / T + 2 * a_t / T + 8) + (1 - ALPHA) * (2 * a_s + 6))


@pytest.mark.parametrize("with_target", [False, True], ids=["kl_only", "kl_ce"])
@pytest.mark.parametrize("shape", [(5, 150), (64, 1000), (3, 9001)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_output_element_is_written_into_the_callers_poisoned_buffer(shape, with_target):
    n, c = shape  # 64 × 1000 runs on every thread, the others on one
    s, t, y = _inputs(n, c, torch.float32, seed=c)
    y = y if with_target else None
    grad_out = torch.full((n, c), math.nan)
    rows, _, grad = _kd_ops._native_forward(s, t, y, make_options("cpu", T, ALPHA, IGNORE), "none", "grad", grad_out)
    assert grad.data_ptr() == grad_out.data_ptr()
    s64 = s.double().requires_grad_()
    exact = kd_loss_reference(s64, t.double(), y, temperature=T, alpha=ALPHA, reduction="none")
    exact.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows.double(), exact, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=0, atol=_gradient_bound(s, t))
    if with_target:
        assert torch.all(grad[1] == 0) and rows[1] == 0  # the ignored row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_bits_on_one_thread_and_on_two(dtype):
    s, t, y = _inputs(96, 1500, dtype, seed=7)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            student = s.clone().requires_grad_()
            loss = kd_loss(student, t, y, temperature=T, alpha=ALPHA)
            loss.backward()
            results.append((loss.detach(), student.grad))
    finally:
        torch.set_num_threads(threads)
    (loss_1, grad_1), (loss_2, grad_2) = results
    assert torch.equal(loss_1, loss_2) and torch.equal(grad_1, grad_2)


def test_the_kernel_is_built_once_into_the_cache_and_loaded_from_it(fresh_kernel, monkeypatch):
    _kd_loss_cpu.kernel()
    (library,) = fresh_kernel.glob("kd_loss_cpu-*.so")
    built = library.stat().st_mtime_ns
    _kd_loss_cpu.kernel.cache_clear()

    def no_build(*args):
        raise AssertionError("built again although the cache holds the library")

    monkeypatch.setattr(_kd_loss_cpu, "_build", no_build)
    _kd_loss_cpu.kernel()
    assert library.stat().st_mtime_ns == built
    assert sorted(fresh_kernel.iterdir()) == [library, _kd_loss_cpu._digest_path(library)]


@pytest.fixture
def no_compiler(fresh_kernel, monkeypatch, tmp_path):
    """No C++ compiler on PATH, an empty kernel cache, and the fallback's once-per-process warning not yet given."""
    # Inductor reads $CXX once, when its config is first imported (a custom op's call may do that): imported here
    # first, so that later torch.compile calls in this process do not keep the missing compiler.
    import torch._inductor.config  # noqa: F401

    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    _kd_ops._warn_no_compiler.cache_clear()
    yield
    _kd_ops._warn_no_compiler.cache_clear()


@pytest.mark.parametrize("entry", ["kd_loss", "kd_loss_linear", "kd_loss_sparse"])
def test_asking_for_the_native_kernel_without_a_compiler_is_one_clear_error(no_compiler, entry):
    s, t, y = _inputs(4, 9, torch.float32, seed=1)
    calls = {"kd_loss": lambda: kd_loss(s, t, y, backend="native"),
             "kd_loss_linear": lambda: kd_loss_linear(s, torch.eye(9), y, teacher_logits=t, backend="native"),
             "kd_loss_sparse": lambda: kd_loss_sparse(s, *t.topk(3, dim=1), y, backend="native")}
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler: neither 'no-such-compiler' nor 'c\\+\\+'"):
        calls[entry]()


def test_without_a_compiler_auto_computes_the_loss_in_plain_torch_with_one_warning(no_compiler):
    """backend="auto" on the CPU: the same loss and gradient as the float64 reference, for every entry point and
    reduction, and a single warning saying what is slower and how to get the native kernel."""
    s, t, y = _inputs(6, 11, torch.float32, seed=2)
    weight = torch.randn(11, 11, dtype=torch.float64)
    values, indices = t.topk(4, dim=1)
    dense_topk = torch.full_like(t, -math.inf).scatter_(1, indices, values)
    with pytest.warns(RuntimeWarning) as caught:
        for reduction in ("mean", "sum", "none"):
            options = dict(temperature=T, alpha=ALPHA, reduction=reduction)
            cases = [(functools.partial(kd_loss, teacher_logits=t, target=y, **options), s, t),
                     (functools.partial(kd_loss_sparse, teacher_values=values, teacher_indices=indices, target=y,
                                        chunk_size=4, **options), s, dense_topk),
                     (functools.partial(kd_loss_linear, student_weight=weight.float(), target=y, teacher_logits=t,
                                        chunk_size=4, **options), s @ weight.float().inverse().T, t)]
            for loss_of, x, teacher in cases:
                x = x.detach().requires_grad_()
                loss = loss_of(x)
                (grad,) = torch.autograd.grad(loss.sum(), x)
                x64 = x.detach().double().requires_grad_()
                logits64 = x64 @ weight.T if loss_of is cases[2][0] else x64
                exact = kd_loss_reference(logits64, teacher.double(), y, temperature=T, alpha=ALPHA,
                                          reduction=reduction)
                (exact_grad,) = torch.autograd.grad(exact.sum(), x64)
                torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-5)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "plain torch" in message and "slower" in message and "install a C++ compiler" in message
    assert "'no-such-compiler'" in message


def test_a_failed_build_names_the_command_and_shows_the_compiler_output(fresh_kernel, monkeypatch, tmp_path):
    broken = tmp_path / "kd_loss_cpu.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(_kd_loss_cpu, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="building the CPU kd_loss kernel failed") as error:
        _kd_loss_cpu.kernel()
    assert str(broken) in str(error.value) and "error" in str(error.value)
    assert not list(fresh_kernel.iterdir())  # nothing half-built is left to load
