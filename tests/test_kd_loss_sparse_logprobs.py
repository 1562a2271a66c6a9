"""kd_loss_sparse with a teacher stored as top-k log-probabilities (teacher_format="logprobs"): the k classes plus a
tail bucket, against a float64 reference written here from the definition, with autograd for the gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.kernels.kd_loss import kd_loss_sparse

IGNORE = -100


def _kl(a, b):
    """Σ a·log(a/b) over buckets, 0 where a = 0 (also in the gradient)."""
    present = a > 0
    log_a = torch.where(present, a, 1.0).log()
    log_b = torch.where(present, b, 1.0).log()
    return torch.where(present, a * (log_a - log_b), 0.0).sum(1)


def reference_rows(s, values, indices, y, divergence, beta, alpha, teacher_format="logprobs", temperature=1.0):
    s = s.double()
    log_p = F.log_softmax(s / temperature, 1)
    in_k = torch.zeros_like(s, dtype=torch.bool).scatter(1, indices, True)
    p_k = log_p.gather(1, indices).exp()
    p_tail = torch.logsumexp(log_p.masked_fill(in_k, -math.inf), 1).exp()
    if teacher_format == "logprobs":
        q_k = values.double().exp()
        q_tail = (1 - q_k.sum(1)).clamp(min=0)
    else:
        q_k, q_tail = F.softmax(values.double() / temperature, 1), torch.zeros(s.shape[0], dtype=torch.float64)
    p, q = torch.cat([p_k, p_tail[:, None]], 1), torch.cat([q_k, q_tail[:, None]], 1)
    if divergence == "forward_kl":
        d = _kl(q, p)
    elif divergence == "reverse_kl":
        d = _kl(p, q)
    else:
        m = beta * q + (1 - beta) * p
        d = beta * _kl(q, m) + (1 - beta) * _kl(p, m)
    rows = alpha * temperature**2 * d
    if y is not None:
        keep = y != IGNORE
        ce = -F.log_softmax(s, 1).gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1)
        rows = torch.where(keep, rows + (1 - alpha) * ce, 0.0)
    return rows


def reference_mean(s, values, indices, y, **kw):
    s64 = s.detach().double().requires_grad_()
    rows = reference_rows(s64, values, indices, y, **kw)
    loss = rows.sum() / ((y != IGNORE).sum().clamp(min=1) if y is not None else s.shape[0])
    loss.backward()
    return loss.detach(), s64.grad


def stored_topk(teacher_logits, k):
    """What an offline store keeps: the teacher's top-k log-probabilities at T = 1, and their classes."""
    values, indices = F.log_softmax(teacher_logits.double(), 1).topk(k, 1)
    return values, indices


CASES = [  # n, V, k, dtype, logit scale
    (5, 37, 6, torch.float32, 3.0),
    (1, 10, 10, torch.float32, 2.0),  # k = V: both tails empty
    (6, 101, 1, torch.bfloat16, 4.0),
    (4, 23, 5, torch.float64, 30.0),  # extreme logits
]


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_logprobs_match_the_bucketed_float64_reference(divergence, beta, case):
    n, v, k, dtype, scale = CASES[case]
    s = (torch.randn(n, v, dtype=torch.float64) * scale).to(dtype)
    values, indices = stored_topk(torch.randn(n, v) * scale, k)
    if k < v:
        in_k = torch.zeros(n, v, dtype=torch.bool).scatter(1, indices, True)
        s[0, (~in_k[0]).nonzero()[0, 0]] = -math.inf  # a student class ruled out (outside K)
        if divergence != "reverse_kl":  # (reverse KL is rightly infinite where the student has mass q lacks)
            values[0, -1] = -math.inf  # a stored class with no teacher mass
    values = values.to(dtype)
    y = torch.randint(0, v, (n,))
    if n > 1:
        y[1] = IGNORE
    s.requires_grad_()
    loss = kd_loss_sparse(s, values, indices, y, alpha=0.7, teacher_format="logprobs", divergence=divergence,
                          jsd_beta=beta, chunk_size=2)
    loss.backward()
    want, want_grad = reference_mean(s, values, indices, y, divergence=divergence, beta=beta, alpha=0.7)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=rtol)
    grad_tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2.0**-8}[dtype]
    torch.testing.assert_close(s.grad.double(), want_grad, rtol=4 * grad_tol, atol=grad_tol)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gradcheck_in_float64_with_reduction_none(divergence):
    n, v, k = 3, 9, 3
    s = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    values, indices = stored_topk(torch.randn(n, v), k)
    y = torch.tensor([1, IGNORE, 8])
    assert torch.autograd.gradcheck(
        lambda x: kd_loss_sparse(x, values, indices, y, reduction="none", teacher_format="logprobs",
                                 divergence=divergence, jsd_beta=0.4), (s,))


def test_a_confident_student_keeps_its_tail_mass():
    """p_tail ≈ e^-60 would be 0 as 1 − Σp in float32: then forward KL against a teacher tail is infinite."""
    s = torch.zeros(2, 50)
    s[:, 3] = 60.0
    values, indices = stored_topk(torch.randn(2, 50), 4)
    indices[:, 0] = 3
    values = values.float()
    loss = kd_loss_sparse(s, values, indices, teacher_format="logprobs", alpha=1.0, reduction="sum")
    want = reference_rows(s, values, indices, None, "forward_kl", 0.5, 1.0).sum()
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)


def test_a_complete_distribution_equals_the_renormalised_default():
    """Log-probabilities that sum to 1 over K leave no tail: the same loss as the default form of the same k."""
    s = torch.randn(7, 33, requires_grad=True)
    logits = torch.randn(7, 5)
    indices = torch.stack([torch.randperm(33)[:5] for _ in range(7)])
    y = torch.randint(0, 33, (7,))
    loss = kd_loss_sparse(s, F.log_softmax(logits, 1), indices, y, teacher_format="logprobs")
    grad, = torch.autograd.grad(loss, s)
    dense = kd_loss_sparse(s, logits, indices, y)
    dense_grad, = torch.autograd.grad(dense, s)
    torch.testing.assert_close(loss, dense, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-5, atol=1e-7)


def test_jsd_on_a_renormalised_teacher_has_an_empty_tail():
    s = torch.randn(4, 20, dtype=torch.float64, requires_grad=True)
    values = torch.randn(4, 3, dtype=torch.float64)
    indices = torch.stack([torch.randperm(20)[:3] for _ in range(4)])
    loss = kd_loss_sparse(s, values, indices, temperature=2.0, divergence="jsd", jsd_beta=0.25)
    loss.backward()
    want, want_grad = reference_mean(s, values, indices, None, divergence="jsd", beta=0.25, alpha=0.5,
                                     teacher_format="logits", temperature=2.0)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.grad, want_grad, rtol=1e-10, atol=1e-12)


def _bad_calls():
    s, i = torch.randn(3, 8), torch.tensor([[0, 1], [2, 3], [4, 5]])
    good = torch.log(torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.1, 0.1]]))
    above_one = good.clone()
    above_one[1] = math.log(0.6)
    positive = good.clone()
    positive[2, 0] = 0.01
    return [
        (r"row 1 must be log-probabilities <= 0 summing to at most 1.*total probability 1\.2",
         lambda: kd_loss_sparse(s, above_one, i, teacher_format="logprobs")),
        (r"row 2 must be log-probabilities <= 0.*max 0\.01",
         lambda: kd_loss_sparse(s, positive, i, teacher_format="logprobs")),
        (r"teacher_format must be one of", lambda: kd_loss_sparse(s, good, i, teacher_format="probs")),
        (r"temperature must be 1 with teacher_format='logprobs'",
         lambda: kd_loss_sparse(s, good, i, teacher_format="logprobs", temperature=2.0)),
        (r"divergence='reverse_kl' needs teacher_format='logprobs'",
         lambda: kd_loss_sparse(s, good, i, divergence="reverse_kl")),
        (r"backend must be 'auto' or 'torch' for a bucketed",
         lambda: kd_loss_sparse(s, good, i, teacher_format="logprobs", backend="native")),
        (r"divergence must be one of", lambda: kd_loss_sparse(s, good, i, divergence="kl")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_are_one_value_error_naming_them(case):
    pattern, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_rounding_above_one_and_zero_mass_classes_are_accepted():
    s = torch.randn(2, 6)
    values = torch.log(torch.tensor([[0.5, 0.5 + 1e-7], [0.25, 0.0]]))  # total 1 + 1e-7; a class with no mass
    indices = torch.tensor([[0, 1], [2, 3]])
    loss = kd_loss_sparse(s, values, indices, teacher_format="logprobs")
    assert math.isfinite(loss.item())


def test_compiles_fullgraph_and_bad_rows_are_nan_there():
    """Under torch.compile the eager value check (a host read) is skipped: a bad row's loss is NaN, never wrong."""
    s = torch.randn(3, 12, requires_grad=True)
    values, indices = stored_topk(torch.randn(3, 12), 4)
    values = values.float()
    call = lambda x, v: kd_loss_sparse(x, v, indices, reduction="none", teacher_format="logprobs",  # noqa: E731
                                       divergence="jsd")
    compiled = torch.compile(call, fullgraph=True)
    got = compiled(s, values)
    got.sum().backward()
    grad = s.grad.clone()
    s.grad = None
    want = call(s, values)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, s.grad)
    bad = values.clone()
    bad[1, 0] = 0.5
    rows = compiled(s.detach(), bad)
    assert rows[1].isnan() and rows[[0, 2]].isfinite().all()


def test_bad_log_probabilities_in_an_ignored_row_are_not_an_error():
    s = torch.randn(2, 6, requires_grad=True)
    values = torch.log(torch.tensor([[0.5, 0.2], [0.9, 0.9]]))  # row 1: padding, total 1.8
    loss = kd_loss_sparse(s, values, torch.tensor([[0, 1], [2, 3]]), torch.tensor([4, IGNORE]),
                          teacher_format="logprobs")
    loss.backward()
    assert torch.isfinite(loss) and torch.all(s.grad[1] == 0)


def test_the_bucketed_path_works_chunk_by_chunk(monkeypatch):
    """Its (rows, V) float32 buffers are per chunk: no chunk holds more than chunk_size rows."""
    from fastkd.kernels import _kd_bucketed

    seen, original = [], _kd_bucketed.bucketed_chunk
    monkeypatch.setattr(_kd_bucketed, "bucketed_chunk", lambda s, *a, **k: seen.append(s.shape[0]) or original(
        s, *a, **k))
    s = torch.randn(7, 15, requires_grad=True)
    values, indices = stored_topk(torch.randn(7, 15), 3)
    kd_loss_sparse(s, values, indices, teacher_format="logprobs", chunk_size=3).backward()
    assert seen == [3, 3, 1]
