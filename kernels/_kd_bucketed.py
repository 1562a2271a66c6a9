"""A top-k teacher as a bucketed distribution: its k classes, plus (for stored log-probabilities) the rest of its
mass as one tail bucket, compared with the student's probabilities of the same k classes and its mass outside them.

Teacher: q_i for i in K (k given classes), q_tail = 1 − Σ_K q_i. Student: p = softmax(s/T), p_i for i in K and
p_tail = Σ_{j∉K} p_j, computed as exp(lse_{j∉K}(s_j/T) − lse(s/T)), never as 1 − Σ_K p_i (which cancels when the
student is confident). The divergence is D(P, Q) on these k + 1 buckets: exact for the bucketed teacher, which is all
an offline top-k store knows. Forward KL with a zero tail (the renormalised form) equals the dense kernel's loss.

Plain torch, row chunk by row chunk (a few (chunk, V) float32 buffers; the (N, V) gradient in the student's dtype is
the output). The gradient is closed form: with h_b = ∂D/∂log P_b and b(j) the bucket of class j,
∂D/∂(s_j/T) = p_j·(h_b(j)/P_b(j) − Σ_b h_b), i.e. h_j − p_j·Σh in K and h_tail·p_j/p_tail − p_j·Σh outside it, where
h_b = −Q_b (forward KL), P_b·(log(P_b/Q_b) + 1) (reverse KL), (1 − β)·P_b·log(P_b/M_b) (JSD, M = βQ + (1 − β)P),
each 0 where its factor's mass is 0.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._kd_common import (
    _kl,
    _log_mixture,
    bad_topk_rows,
    jsd_ends,
    jsd_from_parts,
    reduce_rows,
    reduction_scale,
    result_dtype,
    scaled,
)

TEACHER_FORMATS = ("logits", "logprobs")


def logprob_tolerance(values: Tensor) -> float:
    """How far above 0 a stored log-probability, or above 1 a row's total, may be from rounding alone: k units of
    the values' precision (each exp(log q) is off by at most q·|log q|·u ≤ u/e)."""
    return values.shape[1] * torch.finfo(values.dtype).eps


def check_logprobs(values: Tensor, indices_ok_rows: Optional[Tensor] = None) -> None:
    """Eager calls: one ValueError for the first row with a log-probability > 0 or a total above 1 (beyond
    rounding). A host read, skipped while compiling or capturing, where such a row makes the loss NaN instead."""
    if torch.compiler.is_compiling() or (values.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    bad = _bad_logprob_rows(values)
    if indices_ok_rows is not None:
        bad = bad & indices_ok_rows
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    v = values[row].double()
    raise ValueError(f"teacher_values (teacher_format='logprobs') of row {row} must be log-probabilities <= 0 "
                     f"summing to at most 1; got max {float(v.max()):.6g}, total probability "
                     f"{float(v.exp().sum()):.6g}")


def _bad_logprob_rows(values: Tensor) -> Tensor:
    tol = logprob_tolerance(values)
    v = values.double()
    return (v > tol).any(1) | (v.exp().sum(1) > 1 + tol) | v.isnan().any(1)


def teacher_buckets(values: Tensor, teacher_format: str, temperature: float) -> tuple[Tensor, Tensor]:
    """(log Q of the k classes (N, k), log Q_tail (N,)) in float64 (O(N·k), the cancellation in 1 − Σq at full
    precision). "logprobs": the stored values, a total above 1 by rounding scaled back to 1, the tail what is left;
    "logits": softmax(values / T) on the k classes, no tail. Rows with bad log-probabilities are NaN."""
    v = values.detach().double()
    if teacher_format == "logits":
        return F.log_softmax(v / temperature, 1), torch.full_like(v[:, 0], -math.inf)
    log_q = v.clamp(max=0.0)
    total = log_q.exp().sum(1)
    log_q = log_q - total.clamp(min=1.0).log()[:, None]
    tail = (1.0 - total).clamp(min=0.0)
    log_q = torch.where(_bad_logprob_rows(values)[:, None], math.nan, log_q)
    return log_q, tail.log()


def _bucket_h(log_p: Tensor, log_q: Tensor, divergence: str, beta: Tensor) -> Tensor:
    """h_b = ∂D/∂log P_b (see the module docstring), 0 where the mass it multiplies is 0. β: a 0-d tensor; JSD's
    ends (β = 0, 1) are forward and reverse KL, chosen on its value at run time."""
    q = log_q.exp()
    forward = torch.where(q != 0, -q, 0.0)
    if divergence == "forward_kl":
        return forward
    p = log_p.exp()
    reverse = torch.where(p != 0, p * (log_p - torch.where(p != 0, log_q, 0.0) + 1), 0.0)
    if divergence == "reverse_kl":
        return reverse
    log_m = _log_mixture(log_p, log_q, beta)
    jsd = torch.where(p != 0, (1 - beta) * p * (log_p - torch.where(p != 0, log_m, 0.0)), 0.0)
    return jsd_ends(beta, forward, reverse, jsd)


def _bucket_divergence(log_p: Tensor, log_q: Tensor, divergence: str, beta: Tensor) -> Tensor:
    if divergence == "forward_kl":
        return _kl(log_q, log_p)
    if divergence == "reverse_kl":
        return _kl(log_p, log_q)
    log_m = _log_mixture(log_p, log_q, beta)
    return jsd_from_parts(beta, _kl(log_q, log_m), _kl(log_p, log_m))


def bucketed_chunk(s: Tensor, indices: Tensor, log_q: Tensor, log_q_tail: Tensor, target: Optional[Tensor], *,
                   temperature: Tensor, alpha: Tensor, ignore_index: int, divergence: str, jsd_beta: Tensor,
                   write_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(the chunk's loss rows, ∂rows/∂s in s's dtype or None): α·T²·D(P, Q) + (1 − α)·CE(s, y) per row. The float
    options are 0-d tensors (KDOptions'), never read on the host."""
    compute = result_dtype(s)
    z = s.detach().to(compute) / temperature
    lse = torch.logsumexp(z, 1)
    outside = z.scatter(1, indices, -math.inf)  # the student's classes outside K
    lse_tail = torch.logsumexp(outside, 1)
    log_p = torch.cat([z.gather(1, indices) - lse[:, None], (lse_tail - lse)[:, None]], 1)
    log_qb = torch.cat([log_q, log_q_tail[:, None]], 1).to(compute)
    rows = alpha * temperature**2 * _bucket_divergence(log_p, log_qb, divergence, jsd_beta)
    keep = None
    if target is not None:
        keep = target != ignore_index
        safe = torch.where(keep, target, 0)
        log_p1 = torch.log_softmax(s.detach().to(compute), 1)
        rows = torch.where(keep, rows - (1 - alpha) * log_p1.gather(1, safe[:, None]).squeeze(1), 0.0)
    if not write_grad:
        return rows, None
    h = _bucket_h(log_p, log_qb, divergence, jsd_beta)
    p = (z - lse[:, None]).exp()
    # p_j / p_tail outside K; 0 where the student has no mass there (lse_tail = -inf: no tail classes).
    tail_share = torch.where(outside == -math.inf, 0.0, (outside - lse_tail[:, None]).exp())
    grad = tail_share * h[:, -1:] - p * h.sum(1, keepdim=True)
    grad.scatter_add_(1, indices, h[:, :-1])
    grad = alpha * temperature * grad
    if target is not None:
        grad = grad + (1 - alpha) * log_p1.exp()
        # − onehot(y), no (chunk, V) copy
        grad.scatter_add_(1, safe[:, None], torch.zeros_like(grad[:, :1]) + (alpha - 1))
        grad = torch.where(keep[:, None], grad, 0.0)
    return rows, grad.to(s.dtype)


class BucketedLoss(torch.autograd.Function):
    """kd_loss_sparse on the bucketed teacher: the chunks' gradients made in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, s, indices, log_q, log_q_tail, target, options: dict, reduction: str, chunk: int):
        n = s.shape[0]
        write_grad = ctx.needs_input_grad[0]
        rows = torch.empty(n, dtype=result_dtype(s), device=s.device)
        grad = torch.empty(s.shape if write_grad else (0,), dtype=s.dtype, device=s.device)
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            y = target[r0:r1] if target is not None else None
            rows[r0:r1], chunk_grad = bucketed_chunk(s[r0:r1], indices[r0:r1], log_q[r0:r1], log_q_tail[r0:r1], y,
                                                     **options, write_grad=write_grad)
            if write_grad:
                grad[r0:r1] = chunk_grad
        ctx.reduction, ctx.ignore_index = reduction, options["ignore_index"]
        ctx.has_target = target is not None
        ctx.save_for_backward(grad, target if target is not None else grad.new_empty(0))
        return reduce_rows(rows, target, options["ignore_index"], reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("kd_loss_sparse: double backward (create_graph=True) is not supported")
        grad, target = ctx.saved_tensors
        target = target if ctx.has_target else None
        if ctx.reduction != "none":
            grad_loss = grad_loss * reduction_scale(grad, target, ctx.ignore_index, ctx.reduction)
        return scaled(grad, grad_loss), None, None, None, None, None, None, None


def check_format(teacher_format, divergence: str, temperature, jsd_beta, backend: str) -> bool:
    """Whether kd_loss_sparse takes the bucketed path (chosen by the format and the divergence's name, never by a
    value: every divergence but forward KL is bucketed); one ValueError per argument that does not fit it. The
    value checks (β = 1 is reverse KL, temperature 1) are made on numbers only: a tensor's value is the caller's."""
    if teacher_format not in TEACHER_FORMATS:
        raise ValueError(f"teacher_format must be one of {TEACHER_FORMATS}, got {teacher_format!r}")
    reverse = divergence == "reverse_kl" or divergence == "jsd" and not isinstance(jsd_beta, Tensor) and jsd_beta == 1
    if teacher_format == "logits" and reverse:
        raise ValueError("divergence='reverse_kl' needs teacher_format='logprobs': a renormalised top-k teacher has "
                         "no mass outside its k classes, so KL(p_s ‖ p_t) is infinite wherever the student has some")
    if teacher_format == "logprobs" and not isinstance(temperature, Tensor) and temperature != 1.0:
        raise ValueError(f"temperature must be 1 with teacher_format='logprobs' (the stored log-probabilities are at "
                         f"T = 1 and the tail's tempered mass is unknown), got {temperature!r}")
    bucketed = teacher_format == "logprobs" or divergence != "forward_kl"
    if bucketed and backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch' for a bucketed top-k teacher (teacher_format="
                         f"{teacher_format!r}, divergence={divergence!r}), which runs in plain torch; "
                         f"got {backend!r}")
    return bucketed


def sparse_loss(s: Tensor, values: Tensor, indices: Tensor, target: Optional[Tensor], teacher_format: str, options,
                reduction: str, chunk: int) -> Tensor:
    """kd_loss_sparse on the bucketed teacher (arguments already checked, but for the log-probabilities' values)."""
    vocabulary = s.shape[1]
    bad_indices = bad_topk_rows(indices, vocabulary)
    if teacher_format == "logprobs":
        counted = ~bad_indices if target is None else ~bad_indices & (target != options.ignore_index)
        check_logprobs(values, counted)
    log_q, log_q_tail = teacher_buckets(values, teacher_format, options.temperature)
    # Rows with bad indices (only reachable under compile, or when ignored) are NaN, their indices made safe.
    log_q = torch.where(bad_indices[:, None], math.nan, log_q)
    safe = indices.clamp(0, vocabulary - 1)
    fields = dict(temperature=options.temperature, alpha=options.alpha, ignore_index=options.ignore_index,
                  divergence=options.divergence, jsd_beta=options.jsd_beta)
    if not (s.requires_grad and torch.is_grad_enabled()):
        s = s.detach()
    return BucketedLoss.apply(s, safe, log_q, log_q_tail, target, fields, reduction, chunk)
