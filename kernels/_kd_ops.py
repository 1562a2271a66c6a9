"""The dense kd_loss operator, registered once with torch.library: its CPU kernel (the native one, kd_loss_cpu.cpp),
its CUDA kernel (Triton), its fake for tracing and its autograd. The dispatcher picks the kernel by device; the
loss's float options (temperature, α, β, the cap) are one float64 tensor argument `scalars` on the logits' device,
read by the kernels at run time (a new value is never a recompile); the op's keyword fields are the options that
select code (KDOptions.fields()), the reduction and the gradient to make by name, and the backend the caller asked
for. The one choice not made by device: backend="triton" on CPU tensors (the Triton
interpreter, for tests) is taken by the CPU kernel from that field. Also the per-device chunk kernels of the chunked
ops (_kd_chunked).

Triton is imported on the first Triton launch only (_kd_launch), so every CPU path runs without it. Where no C++
compiler is found, backend="auto" on the CPU computes the same loss and gradient in plain torch, with one warning.
"""
import functools
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _kd_loss_cpu as _cpu
from ._kd_common import (
    FUSED,
    GRAD,
    LOSS_ONLY,
    OPTIONS_SCHEMA,
    STATS,
    KDOptions,
    kernel_scalars,
    reduce_rows,
    reduction_scale,
    reference_grad,
    reference_rows,
    result_dtype,
    scaled,
    stats_per_row,
)


def _launch():
    from . import _kd_launch  # Triton: imported on the first launch, never by a CPU-only process

    return _kd_launch


# --------------------------------------------------------------------------------------------------------------------
# The three implementations of one forward: (the reduced loss, or the rows for "none"; stats; gradient).
# --------------------------------------------------------------------------------------------------------------------

def _triton_forward(s, t, target, options: KDOptions, reduction: str, gradient: str):
    n, c = s.shape
    rows = torch.empty(n, dtype=result_dtype(s), device=s.device)
    stats = torch.empty((n, stats_per_row(options.divergence)) if gradient == STATS else (0,), dtype=torch.float32,
                        device=s.device)
    grad = torch.empty((n, c) if gradient == FUSED else (0,), dtype=s.dtype, device=s.device)
    scale = reduction_scale(s, target, options.ignore_index, reduction) if gradient == FUSED else None
    _launch().launch_kd_kernel(s, t, target, options, rows, grad if gradient == FUSED else None,
                               stats if gradient == STATS else None, scale)
    return reduce_rows(rows, target, options.ignore_index, reduction), stats, grad


def _native_forward(s, t, target, options: KDOptions, reduction: str, gradient: str, grad_out=None):
    """The gradient is written into grad_out ((N, C) contiguous) if given."""
    # The kernel reads each row at stride 1 (any row stride) and target as contiguous int64.
    s = s if s.stride(1) == 1 or s.shape[1] == 1 else s.contiguous()
    t = t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()
    if target is not None and (target.dtype != torch.int64 or not target.is_contiguous()):
        target = target.to(torch.int64).contiguous()
    n, c = s.shape
    rows = torch.empty(n, dtype=result_dtype(s))
    reduced = torch.empty((), dtype=rows.dtype)
    write_grad = gradient in (GRAD, FUSED)
    if not write_grad:
        grad = s.new_empty(0)
    else:
        grad = torch.empty((n, c), dtype=s.dtype) if grad_out is None else grad_out
    # The CPU tensor of scalars is read here, inside the op: no device sync, and opaque to a compiled caller.
    temperature, alpha, jsd_beta, softcap = options.scalars.tolist()
    _cpu.run(s, t, target, *kernel_scalars(temperature, alpha), options.ignore_index, reduction, rows, reduced,
             grad if write_grad else None, divergence=options.divergence, jsd_beta=jsd_beta,
             softcap=softcap if options.softcapped else 0.0)
    return rows if reduction == "none" else reduced, s.new_empty(0, dtype=torch.float32), grad


def _torch_forward(s, t, target, options: KDOptions, reduction: str, gradient: str, grad_out=None):
    """The native kernel's outputs from the reference, for a CPU without a C++ compiler."""
    loss = reduce_rows(reference_rows(s, t, target, options), target, options.ignore_index, reduction)
    if gradient not in (GRAD, FUSED):
        return loss, s.new_empty(0, dtype=torch.float32), s.new_empty(0)
    grad = reference_grad(s, t, target, options)  # of each row; then of the reduced loss, rounded once
    if reduction != "none":
        grad = grad * reduction_scale(s, target, options.ignore_index, reduction)
    grad = grad.to(s.dtype) if grad_out is None else grad_out.copy_(grad)
    return loss, s.new_empty(0, dtype=torch.float32), grad


@functools.lru_cache(maxsize=None)
def _warn_no_compiler(reason: str) -> None:
    # Once per process (per reason): the fallback is taken on every call after it.
    warnings.warn(f"{reason}. kd_loss on the CPU runs in plain torch instead, several times slower than the native "
                  "kernel; install a C++ compiler (g++ or clang++, or set CXX to one) and the native kernel is built "
                  "on the next start. backend='native' makes this an error.", RuntimeWarning, stacklevel=3)


def _native_or_torch(backend: str):
    """The CPU implementation for backend "auto"/"native": the native kernel, or plain torch (with one warning)
    where "auto" finds no C++ compiler to build it."""
    try:
        _cpu.kernel()
    except _cpu.CompilerMissing as missing:
        if backend != "auto":
            raise
        _warn_no_compiler(str(missing).split(" (install")[0])
        return _torch_forward
    return _native_forward


def _cpu_implementation(backend: str):
    return _triton_forward if backend == "triton" else _native_or_torch(backend)  # "triton": the interpreter


def implementation(device_type: str, backend: str):
    """What the op runs for tensors of this device type (eager calls take it directly, without the dispatch)."""
    return _triton_forward if device_type == "cuda" else _cpu_implementation(backend)


# --------------------------------------------------------------------------------------------------------------------
# fastkd::kd_loss_forward and fastkd::kd_loss_backward: opaque to Dynamo (no graph break), fakes for tracing.
# --------------------------------------------------------------------------------------------------------------------

_FIELDS = f"{OPTIONS_SCHEMA}, str reduction, str gradient, str backend"


def _forward_cpu(s, t, target, scalars, *, reduction, gradient, backend, **options):
    return _cpu_implementation(backend)(s, t, target, KDOptions(scalars, **options), reduction, gradient)


def _forward_cuda(s, t, target, scalars, *, reduction, gradient, backend, **options):
    return _triton_forward(s, t, target, KDOptions(scalars, **options), reduction, gradient)


# scalars: KDOptions.scalars, (4,) float64 on the logits' device.
# Outputs: the reduced loss (the per-row losses for "none"); for gradient "stats" the (N, 3) log-sum-exps; for
# "grad" and "fused" the (N, C) gradient of the reduced loss. Unused outputs are empty.
kd_loss_forward = torch.library.custom_op(
    "fastkd::kd_loss_forward", _forward_cpu, mutates_args=(), device_types="cpu",
    schema=f"(Tensor s, Tensor t, Tensor? target, Tensor scalars, *, {_FIELDS}) -> (Tensor, Tensor, Tensor)")
kd_loss_forward.register_kernel("cuda")(_forward_cuda)


@kd_loss_forward.register_fake
def _(s, t, target, scalars, *, reduction, gradient, backend, **options):
    n, c = s.shape
    # (KDOptions fills in the fields left at their defaults, which the dispatcher does not pass on.)
    divergence = KDOptions(scalars, **options).divergence
    stats = s.new_empty((n, stats_per_row(divergence)) if gradient == STATS else (0,), dtype=torch.float32)
    grad = s.new_empty((n, c) if gradient in (GRAD, FUSED) else (0,))
    return s.new_empty((n,) if reduction == "none" else (), dtype=result_dtype(s)), stats, grad


def _backward_kernel(s, t, target, stats, grad_rows, scalars, **options):
    return recomputed_grad(s, t, target, stats, grad_rows, KDOptions(scalars, **options))


# The Triton backward kernel (gradient "stats" only): on CUDA, and on CPU tensors under the interpreter.
kd_loss_backward = torch.library.custom_op(
    "fastkd::kd_loss_backward", _backward_kernel, mutates_args=(),
    schema=f"(Tensor s, Tensor t, Tensor? target, Tensor stats, Tensor grad_rows, Tensor scalars, *, "
           f"{OPTIONS_SCHEMA}) -> Tensor")


@kd_loss_backward.register_fake
def _(s, t, target, stats, grad_rows, scalars, **options):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


def recomputed_grad(s, t, target, stats, grad_rows, options: KDOptions) -> Tensor:
    """grad_rows[i] · ∂ℓᵢ/∂sᵢ, recomputed by the Triton backward kernel from the saved log-sum-exps."""
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    _launch().launch_kd_backward(s, t, target, stats, grad_rows.to(torch.float32).contiguous(), options, grad)
    return grad


def save_for_backward(ctx, s, t, target, output, options: KDOptions, reduction: str, gradient: str) -> None:
    """What the backward needs of a forward call (the op's setup_context and the eager Function share it)."""
    # The scalars are saved as a tensor (with the statistics, which need them), the other options as fields.
    ctx.fields, ctx.reduction, ctx.gradient = options.fields(), reduction, gradient
    if gradient == STATS:
        ctx.save_for_backward(s, t, target, output[1], options.scalars)
    else:
        ctx.save_for_backward(output[2])


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    fields = dict(keyword_only_inputs)
    reduction, gradient = fields.pop("reduction"), fields.pop("gradient")
    fields.pop("backend")
    s, t, target, scalars = inputs
    save_for_backward(ctx, s, t, target, output, KDOptions(scalars, **fields), reduction, gradient)


def row_gradients(ctx, grad_loss, s, target):
    """What the reduction's backward sends to each row: grad_loss itself for "none", else grad_loss times
    ∂(reduced loss)/∂(row loss), expanded to the N rows."""
    if ctx.reduction == "none":
        return grad_loss
    scale = reduction_scale(s, target, ctx.fields["ignore_index"], ctx.reduction)
    return (grad_loss * scale).expand(s.shape[0])


def no_double_backward() -> None:
    # The gradient comes from a kernel or was saved by the forward: a constant to autograd, whose own gradient
    # (create_graph=True) would be silently zero, or an unrelated autograd error further on.
    if torch.is_grad_enabled():
        raise RuntimeError("kd_loss: double backward (create_graph=True) is not supported; backend='torch' "
                           "(plain autograd) supports it")


def student_gradient(ctx, grad_loss) -> Tensor:
    no_double_backward()
    if ctx.gradient == LOSS_ONLY:
        raise RuntimeError("kd_loss: backward through a call made without a student gradient "
                           "(student_logits did not require grad)")
    if ctx.gradient == STATS:
        s, t, target, stats, scalars = ctx.saved_tensors
        return kd_loss_backward(s, t, target, stats, row_gradients(ctx, grad_loss, s, target), scalars,
                                **ctx.fields)
    if ctx.gradient == GRAD:
        (grad,) = ctx.saved_tensors
        return scaled(grad, grad_loss)
    (grad,) = ctx.saved_tensors  # FUSED: the caller guarantees an incoming gradient of 1
    return grad


def _backward(ctx, grad_loss, _grad_of_stats, _grad_of_grad):
    return student_gradient(ctx, grad_loss), None, None, None


kd_loss_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# One chunk of the chunked ops (_kd_chunked): its loss rows and, if asked, ∂(Σ rows)/∂s into grad_out.
# --------------------------------------------------------------------------------------------------------------------

def _triton_chunk(s, t, y, options: KDOptions, write_grad: bool, grad_out: Optional[Tensor], backend: str):
    rows = torch.empty(s.shape[0], dtype=result_dtype(s), device=s.device)
    _launch().launch_kd_kernel(s, t, y, options, rows, grad_out if write_grad else None)
    return rows, grad_out


def _cpu_chunk(s, t, y, options: KDOptions, write_grad: bool, grad_out: Optional[Tensor], backend: str):
    if backend == "triton":
        return _triton_chunk(s, t, y, options, write_grad, grad_out, backend)
    rows, _, grad = _native_or_torch(backend)(s, t, y, options, "none", GRAD if write_grad else LOSS_ONLY, grad_out)
    return rows, grad


CHUNK_KERNELS = {"cpu": _cpu_chunk, "cuda": _triton_chunk}  # registered per device by the chunked ops
