"""vocab_size: a teacher (or student) whose vocabulary is padded to another width is read over its first V classes,
as a strided view of the caller's storage, in every entry point; against float64 references on the sliced tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.kernels import _kd_launch, _kd_loss_cpu
from fastkd.kernels.kd_loss import KDLinearLoss, KDLoss, kd_loss, kd_loss_linear, kd_loss_sparse

T, ALPHA, IGNORE = 2.0, 0.4, -100


def reference_rows(s, t, y, temperature=T, alpha=ALPHA):
    """α·T²·KL(p_t ‖ p_s) + (1−α)·CE per row in float64; p_t = 0 where t = -inf."""
    s, t = s.double(), t.double()
    log_p = F.log_softmax(s / temperature, 1)
    log_q = F.log_softmax(t / temperature, 1)
    q = log_q.exp()
    rows = alpha * temperature**2 * torch.where(q > 0, q * (log_q - log_p), 0.0).sum(1)
    if y is not None:
        keep = y != IGNORE
        ce = -F.log_softmax(s, 1).gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1)
        rows = torch.where(keep, rows + (1 - alpha) * ce, 0.0)
    return rows


def reference_loss_and_grad(s, t, y):
    """The mean loss over counted rows and its gradient w.r.t. s, both float64, by autograd."""
    s64 = s.detach().double().requires_grad_()
    rows = reference_rows(s64, t, y)
    counted = (y != IGNORE).sum().clamp(min=1) if y is not None else s.shape[0]
    loss = rows.sum() / counted
    loss.backward()
    return loss.detach(), s64.grad


class Spy:
    """Records the logits each kernel launch receives (storage pointer and row stride), then runs it."""

    def __init__(self, monkeypatch):
        self.seen = []
        for module, name in ((_kd_loss_cpu, "run"), (_kd_launch, "launch_kd_kernel")):
            original = getattr(module, name)

            def wrapped(s, t, *args, _original=original, **kwargs):
                self.seen.append((s.data_ptr(), s.stride(0), t.data_ptr(), t.stride(0), tuple(s.shape)))
                return _original(s, t, *args, **kwargs)

            monkeypatch.setattr(module, name, wrapped)


def padded_case(n, v, student_width, teacher_width, dtype, masked=False):
    s = torch.randn(n, student_width, dtype=torch.float64) * 3
    t = torch.randn(n, teacher_width, dtype=torch.float64) * 3
    s[:, v:], t[:, v:] = 50.0, 80.0  # padding columns that would dominate the softmax if read
    if masked:
        t[0, : v // 2] = -math.inf  # classes the teacher rules out
    y = torch.randint(0, v, (n,))
    if n > 1:
        y[1] = IGNORE
    return s.to(dtype), t.to(dtype), y


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("n, v, student_width, teacher_width, dtype, masked", [
    (5, 37, 37, 48, torch.float32, False),  # teacher padded to a multiple of 16
    (1, 37, 40, 64, torch.float32, True),  # both padded, one row, masked teacher classes
    (6, 101, 128, 112, torch.bfloat16, False),  # the student the wider one
])
def test_kd_loss_reads_the_first_v_columns_in_place(monkeypatch, backend, n, v, student_width, teacher_width,
                                                     dtype, masked):
    s, t, y = padded_case(n, v, student_width, teacher_width, dtype, masked)
    s.requires_grad_()
    spy = Spy(monkeypatch)
    loss = kd_loss(s, t, y, temperature=T, alpha=ALPHA, backend=backend, vocab_size=v)
    loss.backward()
    want, want_grad = reference_loss_and_grad(s[:, :v], t[:, :v], y)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert s.grad.shape == (n, student_width)
    assert torch.all(s.grad[:, v:] == 0)
    tol = 1e-6 if dtype == torch.float32 else 2.0**-8
    torch.testing.assert_close(s.grad[:, :v].double(), want_grad, rtol=tol * 4, atol=tol)
    if backend != "torch":
        assert spy.seen, "no kernel ran"
        for s_ptr, s_stride, t_ptr, t_stride, shape in spy.seen:
            assert (s_ptr, s_stride, t_ptr, t_stride) == (s.data_ptr(), student_width, t.data_ptr(), teacher_width)
            assert shape == (n, v)


def test_kd_loss_module_takes_vocab_size():
    s, t, y = padded_case(4, 30, 30, 32, torch.float32)
    module = KDLoss(temperature=T, alpha=ALPHA, vocab_size=30)
    torch.testing.assert_close(module(s, t, y).double(), reference_loss_and_grad(s, t[:, :30], y)[0],
                               rtol=1e-5, atol=1e-6)
    assert "vocab_size=30" in repr(module)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("teacher", ["logits", "hidden", "topk"])
def test_kd_loss_linear_reads_every_weight_over_the_first_v_rows(monkeypatch, backend, teacher):
    n, hidden, v, student_width, teacher_width = 7, 12, 45, 48, 64
    h = torch.randn(n, hidden, dtype=torch.float64)
    w = torch.randn(student_width, hidden, dtype=torch.float64)
    b = torch.randn(student_width, dtype=torch.float64)
    th, tw, tb = torch.randn(n, 10, dtype=torch.float64), torch.randn(teacher_width, 10), torch.randn(teacher_width)
    tw, tb = tw.double(), tb.double()
    y = torch.randint(0, v, (n,))
    dense_teacher = th @ tw.T + tb  # (n, teacher_width)
    if teacher == "logits":
        given, t = dict(teacher_logits=dense_teacher.float()), dense_teacher[:, :v]
    elif teacher == "hidden":
        given, t = dict(teacher_hidden=th.float(), teacher_weight=tw.float(), teacher_bias=tb.float()), \
            dense_teacher[:, :v]
    else:
        indices = torch.stack([torch.randperm(v)[:5] for _ in range(n)])
        values = torch.randn(n, 5, dtype=torch.float64)
        given = dict(teacher_topk=(values.float(), indices))
        t = torch.full((n, v), -math.inf, dtype=torch.float64).scatter(1, indices, values)
    h32, w32, b32 = (x.float().requires_grad_() for x in (h, w, b))
    spy = Spy(monkeypatch)
    loss = kd_loss_linear(h32, w32, y, student_bias=b32, **given, temperature=T, alpha=ALPHA, backend=backend,
                          vocab_size=v, chunk_size=3)
    loss.backward()
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h32, w32, b32))
    want_rows = reference_rows(h64 @ w64[:v].T + b64[:v], t.detach() if teacher != "hidden" else
                               (th.float().double() @ tw.float().double()[:v].T + tb.float().double()[:v]), y)
    want = want_rows.mean()
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert w32.grad.shape == (student_width, hidden) and b32.grad.shape == (student_width,)
    assert torch.all(w32.grad[v:] == 0) and torch.all(b32.grad[v:] == 0)
    for got, ref in ((h32.grad, h64.grad), (w32.grad[:v], w64.grad[:v]), (b32.grad[:v], b64.grad[:v])):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    if teacher == "logits":  # the kernel reads the caller's teacher logits in place
        first = spy.seen[0]
        assert first[2:4] == (given["teacher_logits"].data_ptr(), teacher_width)
        assert first[4] == (3, v)


def test_kd_linear_module_takes_vocab_size():
    h, w, t = torch.randn(3, 4), torch.randn(6, 4), torch.randn(3, 8)
    module = KDLinearLoss(vocab_size=6)
    torch.testing.assert_close(module(h, w, teacher_logits=t), kd_loss_linear(h, w, teacher_logits=t[:, :6].clone()))
    assert "vocab_size=6" in repr(module)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_kd_loss_sparse_reads_the_student_over_the_first_v_columns(backend):
    n, v, width, k = 4, 29, 32, 6
    s = (torch.randn(n, width) * 2).requires_grad_()
    indices = torch.stack([torch.randperm(v)[:k] for _ in range(n)])
    values = torch.randn(n, k)
    y = torch.randint(0, v, (n,))
    loss = kd_loss_sparse(s, values, indices, y, temperature=T, alpha=ALPHA, backend=backend, vocab_size=v)
    loss.backward()
    t = torch.full((n, v), -math.inf, dtype=torch.float64).scatter(1, indices, values.double())
    want, want_grad = reference_loss_and_grad(s[:, :v], t, y)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert s.grad.shape == (n, width) and torch.all(s.grad[:, v:] == 0)
    torch.testing.assert_close(s.grad[:, :v].double(), want_grad, rtol=1e-5, atol=1e-6)


def _bad_calls():
    s, t, y = torch.randn(3, 10), torch.randn(3, 12), torch.tensor([0, 1, 9])
    h, w, tw = torch.randn(3, 4), torch.randn(10, 4), torch.randn(12, 5)
    v, i = torch.randn(3, 2), torch.tensor([[0, 1], [2, 3], [8, 9]])
    return [
        (r"student_logits has 10 classes and teacher_logits has 12.*vocab_size", lambda: kd_loss(s, t, y)),
        (r"vocab_size=11 is larger than student_logits's 10", lambda: kd_loss(s, t, y, vocab_size=11)),
        (r"vocab_size=13 is larger than", lambda: kd_loss(t, t, vocab_size=13)),
        (r"vocab_size must be None or an int >= 1, got 0", lambda: kd_loss(s, t, vocab_size=0)),
        (r"vocab_size must be None or an int >= 1, got True", lambda: kd_loss(s, t, vocab_size=True)),
        (r"target holds 9, outside \[0, 8\)", lambda: kd_loss(s, t, y, vocab_size=8)),
        (r"student_weight has 10 classes and teacher_logits has 12", lambda: kd_loss_linear(h, w, teacher_logits=t)),
        (r"student_weight has 10 classes and teacher_weight has 12",
         lambda: kd_loss_linear(h, w, teacher_hidden=torch.randn(3, 5), teacher_weight=tw)),
        (r"vocab_size=11 is larger than student_weight's 10",
         lambda: kd_loss_linear(h, w, teacher_hidden=torch.randn(3, 5), teacher_weight=tw, vocab_size=11)),
        (r"teacher_bias must have teacher_weight's 12", lambda: kd_loss_linear(
            h, w, teacher_hidden=torch.randn(3, 5), teacher_weight=tw, teacher_bias=torch.randn(10), vocab_size=8)),
        (r"row 2 hold class 9 outside \[0, 9\)", lambda: kd_loss_linear(h, w, teacher_topk=(v, i), vocab_size=9)),
        (r"row 2 hold class 9 outside \[0, 9\)", lambda: kd_loss_sparse(s, v, i, vocab_size=9)),
        (r"vocab_size=11 is larger than student_logits's 10", lambda: kd_loss_sparse(s, v, i, vocab_size=11)),
        (r"vocab_size must be None or an int >= 1, got 0", lambda: KDLoss(vocab_size=0)),
        (r"vocab_size must be None or an int >= 1, got 2.0", lambda: KDLinearLoss(vocab_size=2.0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_vocabularies_are_one_value_error_naming_both(case):
    pattern, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_compiles_fullgraph_with_vocab_size():
    s, t, y = padded_case(4, 30, 33, 40, torch.float32)
    s.requires_grad_()
    loss = torch.compile(lambda a, b: kd_loss(a, b, y, temperature=T, alpha=ALPHA, vocab_size=30),
                         fullgraph=True)(s, t)
    loss.backward()
    want, want_grad = reference_loss_and_grad(s[:, :30], t[:, :30], y)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(s.grad[:, 30:] == 0)
    torch.testing.assert_close(s.grad[:, :30].double(), want_grad, rtol=4e-6, atol=1e-6)
