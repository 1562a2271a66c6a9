"""Fused knowledge-distillation loss: temperature softmax, KL divergence and cross-entropy in one pass.

Per row i, with student logits s, teacher logits t, target y, temperature T and soft weight α:

    ℓᵢ = α·T²·KL(softmax(tᵢ/T) ‖ softmax(sᵢ/T)) + (1−α)·CE(sᵢ, yᵢ)        (CE at temperature 1)
    ∂ℓᵢ/∂sᵢ = α·T·(softmax(sᵢ/T) − softmax(tᵢ/T)) + (1−α)·(softmax(sᵢ) − onehot(yᵢ))

How the gradient is made (no path has a host sync; all are traceable by torch.compile(fullgraph=True)):
* Triton, `loss.backward()` (generic): the forward keeps three log-sum-exps a row; the backward kernel re-reads s and
  t once and writes ∂s already multiplied by the incoming per-row gradient. 5·N·C elements moved at any C, no
  (N, C) buffer between forward and backward.
* `fused_backward=True` (fastkd's own training steps): the forward writes ∂s already scaled by the reduction and the
  backward hands it to autograd as it is: 3·N·C elements for C ≤ 8192, the floor (read s, t, write ∂s).
* CPU (a native kernel, kd_loss_cpu.cpp): compute-bound rather than bandwidth-bound, so the forward writes ∂s of the
  reduced loss from the three exponentials per element it keeps (the reduction is taken in the same kernel), and the
  backward multiplies it by the incoming gradient, or returns it as it is when that is 1 (eager) or promised to be
  (fused). It never compiles per temperature, α, reduction, class count or dtype.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor, nn

from . import _kd_loss_cpu as _cpu
from . import _kd_loss_triton as _tk
from . import _kd_reference as _ref

__all__ = ["kd_loss", "KDLoss", "kd_loss_reference", "kd_loss_linear", "kd_loss_sparse", "KDLinearLoss"]  # noqa: F822

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
NONE, SUM, MEAN = (_REDUCTIONS.index(r) for r in ("none", "sum", "mean"))  # the op's `reduction` argument
_BACKENDS = ("auto", "triton", "torch")

# What the forward op produces besides the per-row losses.
LOSS_ONLY = 0  # nothing: no gradient is needed
STATS = 1  # per-row log-sum-exps for the Triton backward kernel (the generic autograd path)
GRAD = 2  # the gradient of the reduced loss (of each row for "none"), times the incoming gradient in the backward
FUSED = 3  # the gradient already scaled by the reduction, returned as it is by the backward (fused_backward=True)


def _result_dtype(s: Tensor) -> torch.dtype:
    # float32 whatever the input precision; float64 inputs (used for gradcheck) keep float64.
    return torch.float64 if s.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------------
# Triton launchers.
# --------------------------------------------------------------------------------------------------------------------

def _row_launch(c: int) -> Optional[dict]:
    """Block and warps of a row that fits in one block (read once), or None for the streaming path."""
    width = triton.next_power_of_2(c)
    if width > _tk.MAX_SINGLE_BLOCK:
        return None
    return dict(SINGLE_BLOCK=True, BLOCK=width, num_warps=4 if width <= 1024 else 8 if width <= 4096 else 16)


def _scalars(temperature: float, alpha: float):
    """1/T, the KL's loss and gradient weights, and the cross-entropy weight."""
    return 1.0 / temperature, alpha * temperature * temperature, alpha * temperature, 1.0 - alpha


def _contiguous_target(target):
    # The kernels read target[row] at row × 1: a strided view (a column of a larger tensor) would be misread.
    return target.contiguous() if target is not None else None


def _divergence_args(divergence: int, jsd_beta: float, softcap: Optional[float]) -> dict:
    # β and the cap are runtime arguments (no recompile per value); the divergence and whether to cap select code.
    return dict(beta=jsd_beta, softcap=1.0 if softcap is None else softcap, DIVERGENCE=divergence,
                SOFTCAP=softcap is not None)


def launch_kd_kernel(s, t, target, temperature, alpha, ignore_index, rows, grad=None, stats=None, scale=None,
                     divergence=_tk.FORWARD_KL, jsd_beta=0.5, softcap=None):
    """Fill `rows` (N,) with the per-row losses; if given, `stats` (N, stats_per_row(divergence)) with the
    backward's statistics and `grad` (N, C) contiguous with ∂ℓ/∂s times `scale` (a 0-d float32 device tensor; 1 if
    None)."""
    n, c = s.shape
    target = _contiguous_target(target)
    write_grad, store_stats = grad is not None, stats is not None
    if write_grad and scale is None:
        scale = torch.ones((), dtype=torch.float32, device=s.device)
    unused = rows  # a pointer the kernel never touches when its feature is off
    inv_t, kl_loss_scale, kl_grad_scale, ce_weight = _scalars(temperature, alpha)
    args = (s, t, target if target is not None else unused, rows, stats if store_stats else unused,
            grad if write_grad else unused, scale if write_grad else unused,
            c, s.stride(0), s.stride(1), t.stride(0), t.stride(1),
            inv_t, kl_loss_scale, kl_grad_scale, ce_weight, ignore_index)
    flags = dict(HAS_TARGET=target is not None, STORE_STATS=store_stats, WRITE_GRAD=write_grad,
                 **_divergence_args(divergence, jsd_beta, softcap))
    single = _row_launch(c)
    if single is not None:
        _tk.kd_loss_fwd_kernel[(n,)](*args, **flags, **single)
    elif _tk.INTERPRETED:
        # Multi-config autotuning needs a live GPU driver; the interpreter takes one fixed block.
        _tk.kd_loss_fwd_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False, BLOCK=_tk.STREAM_BLOCK, num_warps=8)
    else:
        _tk.kd_loss_fwd_stream_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False)


def launch_kd_backward(s, t, target, stats, grad_rows, temperature, alpha, ignore_index, grad,
                       divergence=_tk.FORWARD_KL, jsd_beta=0.5, softcap=None):
    """Fill `grad` (N, C) contiguous with grad_rows[i] · ∂ℓᵢ/∂sᵢ from the forward's `stats`."""
    n, c = s.shape
    target = _contiguous_target(target)
    _, _, kl_grad_scale, ce_weight = _scalars(temperature, alpha)
    args = (s, t, target if target is not None else stats, stats, grad_rows, grad,
            c, s.stride(0), s.stride(1), t.stride(0), t.stride(1),
            1.0 / temperature, kl_grad_scale, ce_weight, ignore_index)
    flags = dict(HAS_TARGET=target is not None, **_divergence_args(divergence, jsd_beta, softcap))
    single = _row_launch(c)
    if single is not None:
        _tk.kd_loss_bwd_kernel[(n,)](*args, **flags, **single)
    elif _tk.INTERPRETED:
        _tk.kd_loss_bwd_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False, BLOCK=_tk.STREAM_BLOCK, num_warps=8)
    else:
        _tk.kd_loss_bwd_stream_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False)


def _triton_forward(s, t, target, temperature, alpha, ignore_index, mode, reduction, *, divergence=_tk.FORWARD_KL,
                    jsd_beta=0.5, softcap=None):
    n, c = s.shape
    rows = torch.empty(n, dtype=_result_dtype(s), device=s.device)
    stats = torch.empty((n, _tk.stats_per_row(divergence)) if mode == STATS else (0,), dtype=torch.float32,
                        device=s.device)
    grad = torch.empty((n, c) if mode == FUSED else (0,), dtype=s.dtype, device=s.device)
    scale = _reduction_scale(s, target, ignore_index, _REDUCTIONS[reduction]) if mode == FUSED else None
    launch_kd_kernel(s, t, target, temperature, alpha, ignore_index, rows, grad if mode == FUSED else None,
                     stats if mode == STATS else None, scale, divergence, jsd_beta, softcap)
    return _reduce(rows, target, ignore_index, _REDUCTIONS[reduction]), stats, grad


# --------------------------------------------------------------------------------------------------------------------
# The CPU implementation: kd_loss_cpu.cpp, a native kernel built once per machine (_kd_loss_cpu).
# --------------------------------------------------------------------------------------------------------------------

def _cpu_forward(s, t, target, temperature, alpha, ignore_index, mode, reduction, grad_out=None, *,
                 divergence=_tk.FORWARD_KL, jsd_beta=0.5, softcap=None):
    """The op's outputs (as _triton_forward's); the gradient is written into grad_out ((N, C) contiguous) if given."""
    # The kernel reads each row at stride 1 (any row stride) and target as contiguous int64.
    s = s if s.stride(1) == 1 or s.shape[1] == 1 else s.contiguous()
    t = t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()
    if target is not None and (target.dtype != torch.int64 or not target.is_contiguous()):
        target = target.to(torch.int64).contiguous()
    n, c = s.shape
    rows = torch.empty(n, dtype=_result_dtype(s))
    reduced = torch.empty((), dtype=rows.dtype)
    write_grad = mode in (GRAD, FUSED)
    if not write_grad:
        grad = s.new_empty(0)
    else:
        grad = torch.empty((n, c), dtype=s.dtype) if grad_out is None else grad_out
    _cpu.run(s, t, target, *_scalars(temperature, alpha), ignore_index, reduction, rows, reduced,
             grad if write_grad else None, divergence, jsd_beta, softcap)
    return rows if reduction == NONE else reduced, s.new_empty(0, dtype=torch.float32), grad


# --------------------------------------------------------------------------------------------------------------------
# torch.library ops: opaque to Dynamo (no graph break), with fake implementations for tracing.
# --------------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::kd_loss_forward", mutates_args=())
def _kd_loss_forward(s: Tensor, t: Tensor, target: Optional[Tensor], temperature: float, alpha: float,
                     ignore_index: int, mode: int, reduction: int, use_triton: bool, divergence: int = 0,
                     jsd_beta: float = 0.5, softcap: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(the reduced loss, or the per-row losses for NONE; STATS: (N, 3) log-sum-exps; GRAD/FUSED: (N, C) gradient
    of the reduced loss); unused outputs are empty."""
    implementation = _triton_forward if use_triton else _cpu_forward
    return implementation(s, t, target, temperature, alpha, ignore_index, mode, reduction, divergence=divergence,
                          jsd_beta=jsd_beta, softcap=softcap)


@_kd_loss_forward.register_fake
def _(s, t, target, temperature, alpha, ignore_index, mode, reduction, use_triton, divergence=0, jsd_beta=0.5,
      softcap=None):
    n, c = s.shape
    stats = s.new_empty((n, _tk.stats_per_row(divergence)) if mode == STATS else (0,), dtype=torch.float32)
    grad = s.new_empty((n, c) if mode in (GRAD, FUSED) else (0,))
    return s.new_empty((n,) if reduction == NONE else (), dtype=_result_dtype(s)), stats, grad


@torch.library.custom_op("fastkd::kd_loss_backward", mutates_args=())
def _kd_loss_backward(s: Tensor, t: Tensor, target: Optional[Tensor], stats: Tensor, grad_rows: Tensor,
                      temperature: float, alpha: float, ignore_index: int, divergence: int, jsd_beta: float,
                      softcap: Optional[float]) -> Tensor:
    """Triton: grad_rows[i] · ∂ℓᵢ/∂sᵢ, recomputed from the saved statistics."""
    return _recomputed_grad(s, t, target, stats, grad_rows, temperature, alpha, ignore_index, divergence, jsd_beta,
                            softcap)


def _recomputed_grad(s, t, target, stats, grad_rows, temperature, alpha, ignore_index, divergence, jsd_beta,
                     softcap):
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    launch_kd_backward(s, t, target, stats, grad_rows.to(torch.float32).contiguous(), temperature, alpha,
                       ignore_index, grad, divergence, jsd_beta, softcap)
    return grad


@_kd_loss_backward.register_fake
def _(s, t, target, stats, grad_rows, temperature, alpha, ignore_index, divergence, jsd_beta, softcap):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    s, t, target, temperature, alpha, ignore_index, mode, reduction, _, divergence, jsd_beta, softcap = inputs
    ctx.mode, ctx.reduction = mode, reduction
    ctx.hyper = (temperature, alpha, ignore_index, divergence, jsd_beta, softcap)
    if mode == STATS:
        ctx.save_for_backward(s, t, target, output[1])
    else:
        ctx.save_for_backward(output[2])


def _row_gradients(ctx, grad_loss, s, target):
    """What the reduction's backward sends to each row: grad_loss itself for NONE, else grad_loss times
    ∂(reduced loss)/∂(row loss), expanded to the N rows."""
    if ctx.reduction == NONE:
        return grad_loss
    scale = _reduction_scale(s, target, ctx.hyper[2], _REDUCTIONS[ctx.reduction])
    return (grad_loss * scale).expand(s.shape[0])


def _no_double_backward() -> None:
    # The gradient comes from a kernel or was saved by the forward: a constant to autograd, whose own gradient
    # (create_graph=True) would be silently zero, or an unrelated autograd error further on.
    if torch.is_grad_enabled():
        raise RuntimeError("kd_loss: double backward (create_graph=True) is not supported; backend='torch' "
                           "(plain autograd) supports it")


def _backward(ctx, grad_loss, _grad_of_stats, _grad_of_grad):
    _no_double_backward()
    if ctx.mode == LOSS_ONLY:
        raise RuntimeError("kd_loss: backward through a call made without a student gradient "
                           "(student_logits did not require grad)")
    if ctx.mode == STATS:
        s, t, target, stats = ctx.saved_tensors
        student_grad = _kd_loss_backward(s, t, target, stats, _row_gradients(ctx, grad_loss, s, target), *ctx.hyper)
    elif ctx.mode == GRAD:
        (grad,) = ctx.saved_tensors
        student_grad = _scaled(grad, grad_loss)
    else:  # FUSED: the caller guarantees an incoming gradient of 1
        (student_grad,) = ctx.saved_tensors
    return student_grad, *(None,) * 11


def _scaled(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """The saved gradient (of the reduced loss, or of each row for NONE) times the incoming gradient, multiplied in
    float32 (float64 for float64), in grad's dtype."""
    factor = grad_loss[:, None] if grad_loss.dim() == 1 else grad_loss
    return (grad.to(_result_dtype(grad)) * factor).to(grad.dtype)


_kd_loss_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerKDLoss(torch.autograd.Function):
    """The same forward and backward as the op above, for eager calls: torch.library's dispatch costs more than the
    whole loss at small sizes on a CPU. Under torch.compile the op is used, since Dynamo must see it as one."""

    @staticmethod
    def forward(ctx, *inputs):
        *_, use_triton, divergence, jsd_beta, softcap = inputs
        implementation = _triton_forward if use_triton else _cpu_forward
        output = implementation(*inputs[:-4], divergence=divergence, jsd_beta=jsd_beta, softcap=softcap)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        _no_double_backward()
        if ctx.mode == STATS:  # straight to the kernel launch, not through the backward op's dispatch
            s, t, target, stats = ctx.saved_tensors
            return _recomputed_grad(s, t, target, stats, _row_gradients(ctx, grad_loss, s, target),
                                    *ctx.hyper), *(None,) * 11
        if ctx.mode == GRAD and grad_loss.dim() == 0 and not grad_loss.is_cuda and grad_loss.item() == 1.0:
            # `loss.backward()` on the CPU: the saved gradient is the answer, as it is. (Reading a CPU scalar is no
            # device sync; a compiled graph takes the multiply in _backward instead, as it cannot branch on it.)
            return ctx.saved_tensors[0], *(None,) * 11
        return _backward(ctx, grad_loss, None, None)


# --------------------------------------------------------------------------------------------------------------------
# The plain reference (autograd through log_softmax / cross_entropy).
# --------------------------------------------------------------------------------------------------------------------

def _reference_rows(s, t, target, temperature, alpha, ignore_index, divergence="forward_kl", jsd_beta=0.5,
                    softcap=None):
    compute = _result_dtype(s)
    s32 = _ref.soft_capped(s.to(compute), softcap)
    t32 = _ref.soft_capped(t.detach().to(compute), softcap)
    # 0·log 0 = 0 on masked (-inf) classes; a NaN logit is not masked and reaches the loss.
    rows = alpha * temperature**2 * _ref.divergence_rows(s32, t32, temperature, divergence, jsd_beta)
    if target is not None:
        keep = target != ignore_index
        ce = F.cross_entropy(s32, target, ignore_index=ignore_index, reduction="none")
        rows = torch.where(keep, rows + (1 - alpha) * ce, 0.0)
    return rows.to(_result_dtype(s))


def kd_loss_reference(student_logits, teacher_logits, target=None, *, temperature=1.0, alpha=0.5,
                      ignore_index=-100, reduction="mean", divergence="forward_kl", jsd_beta=0.5, softcap=None):
    """The plain torch reference with autograd: same contract as `kd_loss`, no validation of target values."""
    rows = _reference_rows(student_logits, teacher_logits, target, temperature, alpha, ignore_index, divergence,
                           jsd_beta, softcap)
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
    validate_hyperparameters(temperature, alpha, reduction, backend)
    validate_target(target, s.shape[0], s.shape[1], s.device, "student_logits", check_target, ignore_index)


def validate_hyperparameters(temperature, alpha, reduction, backend) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def validate_target(target, n: int, num_classes: int, device, rows_name: str, check_values: bool,
                    ignore_index: int) -> None:
    """target: None or an (n,) integer tensor on `device` (that of `rows_name`), whose values (if check_values) are
    in [0, num_classes) or ignore_index."""
    if target is None:
        return
    if not isinstance(target, Tensor) or target.shape != (n,):
        raise ValueError(f"target must be an (N,) = ({n},) integer tensor, "
                         f"got shape {tuple(getattr(target, 'shape', ()))}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but {rows_name} is on {device}")
    if check_values:
        _check_target_values(target, num_classes, ignore_index)


def _check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    # Reading target values is a host sync. It is skipped while compiling or capturing a CUDA graph; there, an
    # out-of-range target yields a NaN loss (never a silent wrong value).
    if torch.compiler.is_compiling():
        return
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = (int(v) for v in torch.aminmax(target))  # one pass, one read; the common case ends here
    if 0 <= low and high < num_classes:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target holds {value}, outside [0, {num_classes}) and not ignore_index={ignore_index}")


def _use_triton(s: Tensor, backend: str) -> bool:
    if s.device.type not in ("cpu", "cuda"):  # the kernels read raw CPU or CUDA memory
        raise ValueError(f"backend={backend!r} takes CUDA or CPU tensors, got {s.device.type} tensors; "
                         "backend='torch' runs on any device")
    if backend == "auto":
        return s.is_cuda
    if not s.is_cuda and not _tk.INTERPRETED:
        raise ValueError("backend='triton' needs CUDA tensors; on CPU tensors it runs only under TRITON_INTERPRET=1 "
                         "(set before fastkd is imported). Use backend='auto' for the CPU implementation.")
    return True


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
            temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100, reduction: str = "mean",
            backend: str = "auto", check_target: bool = True, fused_backward: bool = False,
            divergence: str = "forward_kl", jsd_beta: float = 0.5, softcap: Optional[float] = None) -> Tensor:
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y) per row, reduced; float32 result.

    divergence: "forward_kl" (the KL above), "reverse_kl" (KL(p_s ‖ p_t)) or "jsd" (β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m),
    m = β·p_t + (1−β)·p_s with β = jsd_beta in [0, 1]; β = 0 is forward KL, β = 1 reverse KL). softcap=c replaces
    both logits by c·tanh(z/c) before the temperature (and in the cross-entropy); None: off.

    The gradient flows to `student_logits` only (in its dtype). Rows whose target is `ignore_index` contribute
    nothing and are not counted by "mean". backend: "auto" (Triton on CUDA, native CPU kernel on CPU),
    "triton" (the kernel everywhere; CPU tensors need TRITON_INTERPRET=1) or "torch" (plain autograd reference).
    check_target=False skips the eager range check of target values (a host sync on CUDA) for callers whose labels
    are already known to be valid; an out-of-range target then yields a NaN loss, as under torch.compile.
    fused_backward=True writes the gradient, already scaled by the reduction, in the forward, and the backward
    returns it untouched: one pass over the logits, the least memory traffic there is. It is exact only when the
    returned loss reaches the backward with gradient 1 (`loss.backward()`, or a sum in which it has weight 1), as in
    fastkd's own training steps; scale the loss after it and the gradient is not scaled. "mean" or "sum" only.
    """
    _validate(student_logits, teacher_logits, target, temperature, alpha, ignore_index, reduction, backend,
              check_target)
    _ref.validate_divergence(divergence, jsd_beta, softcap)
    if not isinstance(fused_backward, bool) or (fused_backward and reduction == "none"):
        raise ValueError(f"fused_backward must be a bool, and needs reduction 'mean' or 'sum'; got "
                         f"fused_backward={fused_backward!r} with reduction={reduction!r}")
    temperature, alpha, ignore_index = float(temperature), float(alpha), int(ignore_index)
    jsd_beta, softcap = float(jsd_beta), None if softcap is None else float(softcap)
    if backend == "torch":
        return kd_loss_reference(student_logits, teacher_logits, target, temperature=temperature, alpha=alpha,
                                 ignore_index=ignore_index, reduction=reduction, divergence=divergence,
                                 jsd_beta=jsd_beta, softcap=softcap)
    use_triton = _use_triton(student_logits, backend)
    if not (student_logits.requires_grad and torch.is_grad_enabled()):
        mode = LOSS_ONLY
    elif fused_backward:
        mode = FUSED
    else:
        mode = STATS if use_triton else GRAD
    args = (student_logits, teacher_logits.detach(), target, temperature, alpha, ignore_index, mode,
            _REDUCTIONS.index(reduction), use_triton, _ref.DIVERGENCES.index(divergence), jsd_beta, softcap)
    return _kd_loss_forward(*args)[0] if torch.compiler.is_compiling() else _EagerKDLoss.apply(*args)


def _reduction_scale(s: Tensor, target: Optional[Tensor], ignore_index: int, reduction: str) -> Tensor:
    """∂(reduced loss)/∂(row loss), on the device: what _reduce's backward would send to every row."""
    one = torch.ones((), dtype=_result_dtype(s), device=s.device)
    if reduction == "sum":
        return one
    if target is None:
        return one / s.shape[0]
    return one / (target != ignore_index).sum().clamp(min=1)


class KDLoss(nn.Module):
    """Module form of `kd_loss`: forward(student_logits, teacher_logits, target=None)."""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", divergence: str = "forward_kl",
                 jsd_beta: float = 0.5, softcap: Optional[float] = None):
        super().__init__()
        # Validate hyperparameters now, so a bad config fails at construction rather than at the first step.
        probe = torch.zeros(1, 1)
        _validate(probe, probe, None, temperature, alpha, ignore_index, reduction, backend)
        _ref.validate_divergence(divergence, jsd_beta, softcap)
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.ignore_index, self.reduction, self.backend = int(ignore_index), reduction, backend
        self.divergence, self.jsd_beta, self.softcap = divergence, float(jsd_beta), softcap

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha,
                       ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                       divergence=self.divergence, jsd_beta=self.jsd_beta, softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"divergence={self.divergence!r}, jsd_beta={self.jsd_beta}, softcap={self.softcap}")


_CHUNKED = ("kd_loss_linear", "kd_loss_sparse", "KDLinearLoss")


def __getattr__(name):
    # The vocabulary-scale forms (fused linear + KD, top-k teachers) live in _kd_chunked, which builds on this
    # module; they are imported from it on first use, so that neither module's import needs the other finished.
    if name in _CHUNKED:
        from . import _kd_chunked

        return getattr(_kd_chunked, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
