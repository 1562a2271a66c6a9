"""Fused knowledge-distillation loss: temperature softmax, KL divergence and cross-entropy in one pass.

Per row i, with student logits s, teacher logits t, target y, temperature T and soft weight α:

    ℓᵢ = α·T²·KL(softmax(tᵢ/T) ‖ softmax(sᵢ/T)) + (1−α)·CE(sᵢ, yᵢ)        (CE at temperature 1)
    ∂ℓᵢ/∂sᵢ = α·T·(softmax(sᵢ/T) − softmax(tᵢ/T)) + (1−α)·(softmax(sᵢ) − onehot(yᵢ))

The forward op returns the per-row losses and the student gradient together (the gradient is written while the
row is on chip); the backward only scales that gradient by the incoming per-row grad, on the device, without any
host sync, so the whole thing is capturable in a CUDA graph and traceable by torch.compile(fullgraph=True).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor, nn

from . import _kd_loss_triton as _tk

__all__ = ["kd_loss", "KDLoss", "kd_loss_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_BACKENDS = ("auto", "triton", "torch")


# --------------------------------------------------------------------------------------------------------------------
# Implementations of the (rows, grad) forward: the Triton kernel and the CPU one.
# --------------------------------------------------------------------------------------------------------------------

def _triton_rows_and_grad(s, t, target, temperature, alpha, ignore_index, write_grad):
    n, c = s.shape
    rows = torch.empty(n, dtype=_result_dtype(s), device=s.device)
    grad = torch.empty((n, c) if write_grad else (0,), dtype=s.dtype, device=s.device)
    launch_kd_kernel(s, t, target, temperature, alpha, ignore_index, rows, grad if write_grad else None)
    return rows, grad


def _result_dtype(s: Tensor) -> torch.dtype:
    # float32 whatever the input precision; float64 inputs (used for gradcheck) keep float64.
    return torch.float64 if s.dtype == torch.float64 else torch.float32


def launch_kd_kernel(s, t, target, temperature, alpha, ignore_index, rows, grad=None):
    """Fill `rows` (N,) with the per-row losses and, if given, `grad` (N, C) contiguous with ∂ℓ/∂s."""
    n, c = s.shape
    write_grad = grad is not None
    grad = grad if write_grad else rows  # an unused pointer when WRITE_GRAD is off
    has_target = target is not None
    args = (
        s, t, target if has_target else rows, rows, grad,
        c, s.stride(0), s.stride(1), t.stride(0), t.stride(1),
        1.0 / temperature, alpha * temperature * temperature, alpha * temperature,
        1.0 - alpha, ignore_index,
    )
    single_width = triton.next_power_of_2(c)
    if single_width <= _tk.MAX_SINGLE_BLOCK:
        num_warps = 4 if single_width <= 1024 else 8 if single_width <= 4096 else 16
        _tk.kd_loss_fwd_bwd_kernel[(n,)](*args, HAS_TARGET=has_target, WRITE_GRAD=write_grad,
                                         SINGLE_BLOCK=True, BLOCK=single_width, num_warps=num_warps)
    elif _tk.INTERPRETED:
        # Multi-config autotuning needs a live GPU driver; the interpreter takes one fixed block.
        _tk.kd_loss_fwd_bwd_kernel[(n,)](*args, HAS_TARGET=has_target, WRITE_GRAD=write_grad,
                                         SINGLE_BLOCK=False, BLOCK=_tk.STREAM_BLOCK, num_warps=8)
    else:
        _tk.kd_loss_stream_kernel[(n,)](*args, HAS_TARGET=has_target, WRITE_GRAD=write_grad, SINGLE_BLOCK=False)


def _analytic_rows_and_grad(s, t, target, temperature: float, alpha: float, ignore_index: int, write_grad: bool):
    """Loss rows and student gradient from closed forms, no autograd; compiled by inductor on CPU."""
    compute = _result_dtype(s)
    s32, t32 = s.to(compute), t.to(compute)
    inv_t = 1.0 / temperature
    lse_s = torch.logsumexp(s32 * inv_t, 1, keepdim=True)
    lse_t = torch.logsumexp(t32 * inv_t, 1, keepdim=True)
    p_t = torch.exp(t32 * inv_t - lse_t)
    # KL = Σ p_t·(t − s)/T − (lse_t − lse_s), as in the kernel; 0·log 0 = 0 on masked classes. The lse terms
    # stay outside the mask so that a NaN anywhere in the row reaches the loss.
    kl = torch.where(p_t > 0, p_t * ((t32 - s32) * inv_t), 0.0).sum(1) - (lse_t - lse_s).squeeze(1)
    rows = alpha * temperature * temperature * kl
    grad = alpha * temperature * (torch.exp(s32 * inv_t - lse_s) - p_t) if write_grad else None
    if target is not None:
        n, c = s.shape
        keep = target != ignore_index
        in_range = (target >= 0) & (target < c)
        safe_y = torch.where(keep & in_range, target, 0)
        lse_1 = torch.logsumexp(s32, 1, keepdim=True)
        ce = lse_1.squeeze(1) - s32.gather(1, safe_y[:, None]).squeeze(1)
        # Out-of-range targets cannot be checked without a host sync here: they poison the row with NaN instead.
        poison = keep & ~in_range
        rows = torch.where(poison, math.nan, rows + (1.0 - alpha) * ce)
        rows = torch.where(keep, rows, 0.0)
        if write_grad:
            onehot = torch.arange(c, device=s.device)[None, :] == safe_y[:, None]
            grad = grad + (1.0 - alpha) * (torch.exp(s32 - lse_1) - onehot.to(compute))
            grad = torch.where(poison[:, None], math.nan, grad)
            grad = torch.where(keep[:, None], grad, 0.0)
    rows = rows.to(_result_dtype(s))
    grad = grad.to(s.dtype) if write_grad else s.new_empty(0)
    return rows, grad


_compiled_analytic = None


def _cpu_rows_and_grad(s, t, target, *args):
    # Inductor fuses the closed forms into a few vectorised C++ loops: faster on CPU than eager ATen ops, and
    # faster than compiling the autograd reference. The batch dimension is marked dynamic so that a changing N
    # (an evaluation tail batch) does not recompile; C stays static (one compile per class count), which
    # vectorises markedly better than a symbolic C.
    global _compiled_analytic
    if _compiled_analytic is None:
        _compiled_analytic = torch.compile(_analytic_rows_and_grad, dynamic=False)
    # Mark fresh aliases, not the caller's tensors: a marking left on them would make an enclosing compiled graph
    # see a changed input and recompile.
    s, t = s.detach(), t.detach()
    target = target.detach() if target is not None else None
    for x in (s, t) if target is None else (s, t, target):
        torch._dynamo.maybe_mark_dynamic(x, 0)
    # The op's implementation is reached with ADInplaceOrView excluded from the dispatch keys (below its autograd
    # kernel) or included (inside an enclosing compiled graph); the compiled kernel's guards see the difference and
    # would compile it twice. It needs no view tracking, so it always runs below that key.
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return _compiled_analytic(s, t, target, *args)


# --------------------------------------------------------------------------------------------------------------------
# torch.library ops: opaque to Dynamo (no graph break), with fake implementations for tracing.
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::kd_loss_rows", mutates_args=())
def _kd_loss_rows(s: Tensor, t: Tensor, target: Optional[Tensor], temperature: float, alpha: float,
                  ignore_index: int, write_grad: bool, use_triton: bool) -> tuple[Tensor, Tensor]:
    if use_triton:
        return _triton_rows_and_grad(s, t, target, temperature, alpha, ignore_index, write_grad)
    return _cpu_rows_and_grad(s, t, target, temperature, alpha, ignore_index, write_grad)


@_kd_loss_rows.register_fake
def _(s, t, target, temperature, alpha, ignore_index, write_grad, use_triton):
    grad = s.new_empty(s.shape) if write_grad else s.new_empty(0)
    return s.new_empty(s.shape[0], dtype=_result_dtype(s)), grad


@torch.library.custom_op("fastkd::scale_rows", mutates_args=())
def _scale_rows(grad: Tensor, scale: Tensor, use_triton: bool) -> Tensor:
    """grad[i, :] · scale[i], multiplied in float32 (float64 for float64), returned in grad's dtype."""
    if not use_triton:
        return (grad.to(_result_dtype(grad)) * scale[:, None]).to(grad.dtype)
    out = torch.empty_like(grad)
    n, c = grad.shape
    block = min(4096, triton.next_power_of_2(c))
    _tk.scale_rows_kernel[(n, triton.cdiv(c, block))](grad, scale.to(torch.float32).contiguous(), out, c,
                                                       BLOCK=block)
    return out


@_scale_rows.register_fake
def _(grad, scale, use_triton):
    return torch.empty_like(grad)


def _setup_context(ctx, inputs, output):
    ctx.use_triton = inputs[-1]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_rows, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("kd_loss: backward through a call made without a student gradient "
                           "(student_logits did not require grad)")
    student_grad = _scale_rows(grad, grad_rows, ctx.use_triton)
    return student_grad, None, None, None, None, None, None, None


_kd_loss_rows.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# The plain reference (autograd through log_softmax / cross_entropy).
# --------------------------------------------------------------------------------------------------------------------

def _reference_rows(s, t, target, temperature, alpha, ignore_index):
    compute = _result_dtype(s)
    s32, t32 = s.to(compute), t.detach().to(compute)
    log_p_s = F.log_softmax(s32 / temperature, dim=1)
    log_p_t = F.log_softmax(t32 / temperature, dim=1)
    p_t = log_p_t.exp()
    # 0·log 0 = 0 on masked (-inf) teacher classes; a NaN logit is not masked and reaches the loss.
    kl = torch.where(t32 == -math.inf, 0.0, p_t * (log_p_t - log_p_s)).sum(1)
    rows = alpha * temperature**2 * kl
    if target is not None:
        keep = target != ignore_index
        ce = F.cross_entropy(s32, target, ignore_index=ignore_index, reduction="none")
        rows = torch.where(keep, rows + (1 - alpha) * ce, 0.0)
    return rows.to(_result_dtype(s))


def kd_loss_reference(student_logits, teacher_logits, target=None, *, temperature=1.0, alpha=0.5,
                      ignore_index=-100, reduction="mean"):
    """The plain torch reference with autograd: same contract as `kd_loss`, no validation of target values."""
    rows = _reference_rows(student_logits, teacher_logits, target, temperature, alpha, ignore_index)
    return _reduce(rows, target, ignore_index, reduction)


# --------------------------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------------------------

def _reduce(rows: Tensor, target: Optional[Tensor], ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if target is None:
        return total / rows.shape[0]
    counted = (target != ignore_index).sum()
    return total / counted.clamp(min=1)


def _validate(s, t, target, temperature, alpha, ignore_index, reduction, backend, check_target=True):
    if not isinstance(s, Tensor) or s.dim() != 2:
        raise ValueError(f"student_logits must be a 2-D (N, C) tensor, got shape {tuple(getattr(s, 'shape', ()))}")
    if not isinstance(t, Tensor) or t.shape != s.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(s.shape)}, "
                         f"got {tuple(getattr(t, 'shape', ()))}")
    if s.shape[0] < 1 or s.shape[1] < 1:
        raise ValueError(f"student_logits must have N >= 1 rows and C >= 1 classes, got {tuple(s.shape)}")
    if s.dtype not in _DTYPES:
        raise ValueError(f"student_logits must be float32, bfloat16, float16 or float64, got {s.dtype}")
    if t.dtype != s.dtype:
        raise ValueError(f"teacher_logits dtype {t.dtype} does not match student_logits dtype {s.dtype}")
    if t.device != s.device:
        raise ValueError(f"teacher_logits is on {t.device} but student_logits is on {s.device}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if target is not None:
        if not isinstance(target, Tensor) or target.shape != (s.shape[0],):
            raise ValueError(f"target must be an (N,) = ({s.shape[0]},) integer tensor, "
                             f"got shape {tuple(getattr(target, 'shape', ()))}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(f"target must be an integer tensor, got {target.dtype}")
        if target.device != s.device:
            raise ValueError(f"target is on {target.device} but student_logits is on {s.device}")
        if check_target:
            _check_target_values(target, s.shape[1], ignore_index)


def _check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    # Reading target values is a host sync. It is skipped while compiling or capturing a CUDA graph; there, an
    # out-of-range target yields a NaN loss (never a silent wrong value).
    if torch.compiler.is_compiling():
        return
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target holds {value}, outside [0, {num_classes}) and not ignore_index={ignore_index}")


def _use_triton(s: Tensor, backend: str) -> bool:
    if backend == "auto":
        return s.is_cuda
    if not s.is_cuda and not _tk.INTERPRETED:
        raise ValueError("backend='triton' needs CUDA tensors; on CPU tensors it runs only under TRITON_INTERPRET=1 "
                         "(set before fastkd is imported). Use backend='auto' for the CPU implementation.")
    return True


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
            temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100, reduction: str = "mean",
            backend: str = "auto", check_target: bool = True) -> Tensor:
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y) per row, reduced; float32 result.

    The gradient flows to `student_logits` only (in its dtype). Rows whose target is `ignore_index` contribute
    nothing and are not counted by "mean". backend: "auto" (Triton on CUDA, compiled CPU kernel on CPU),
    "triton" (the kernel everywhere; CPU tensors need TRITON_INTERPRET=1) or "torch" (plain autograd reference).
    check_target=False skips the eager range check of target values (a host sync on CUDA) for callers whose labels
    are already known to be valid; an out-of-range target then yields a NaN loss, as under torch.compile.
    """
    _validate(student_logits, teacher_logits, target, temperature, alpha, ignore_index, reduction, backend,
              check_target)
    temperature, alpha = float(temperature), float(alpha)
    if backend == "torch":
        return kd_loss_reference(student_logits, teacher_logits, target, temperature=temperature, alpha=alpha,
                                 ignore_index=ignore_index, reduction=reduction)
    write_grad = student_logits.requires_grad and torch.is_grad_enabled()
    rows, _ = _kd_loss_rows(student_logits, teacher_logits.detach(), target, temperature, alpha, int(ignore_index),
                            write_grad, _use_triton(student_logits, backend))
    return _reduce(rows, target, ignore_index, reduction)


class KDLoss(nn.Module):
    """Module form of `kd_loss`: forward(student_logits, teacher_logits, target=None)."""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        # Validate hyperparameters now, so a bad config fails at construction rather than at the first step.
        probe = torch.zeros(1, 1)
        _validate(probe, probe, None, temperature, alpha, ignore_index, reduction, backend)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.ignore_index, self.reduction, self.backend = int(ignore_index), reduction, backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha,
                       ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}"
