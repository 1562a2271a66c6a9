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
from typing import Optional

import torch
from torch import Tensor, nn

from . import _kd_ops as _ops
from . import _kd_sharded as _sharded
from ._kd_chunked import KDLinearLoss, auto_chunk_size, kd_loss_linear, kd_loss_sparse
from ._kd_common import (
    FUSED,
    GRAD,
    LOSS_ONLY,
    STATS,
    KDOptions,
    check_backend_for_device,
    check_logits,
    check_options,
    common_vocabulary,
    first_columns,
    kd_loss_reference,
    option_value,
    reference_loss,
    validate_hyperparameters,
    validate_target,
)

__all__ = ["kd_loss", "KDLoss", "kd_loss_reference", "kd_loss_linear", "kd_loss_sparse", "KDLinearLoss",
           "auto_chunk_size", "validate_hyperparameters", "validate_target"]


class _EagerKDLoss(torch.autograd.Function):
    """The op fastkd::kd_loss_forward's forward and backward, for eager calls: torch.library's dispatch costs more
    than the whole loss at small sizes on a CPU. Under torch.compile the op is used, since Dynamo must see it as one."""

    @staticmethod
    def forward(ctx, s, t, target, options: KDOptions, reduction: str, gradient: str, backend: str):
        output = _ops.implementation(s.device.type, backend)(s, t, target, options, reduction, gradient)
        _ops.save_for_backward(ctx, s, t, target, output, options, reduction, gradient)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        _ops.no_double_backward()
        if ctx.gradient == STATS:  # straight to the kernel launch, not through the backward op's dispatch
            s, t, target, stats, scalars = ctx.saved_tensors
            return _ops.recomputed_grad(s, t, target, stats, _ops.row_gradients(ctx, grad_loss, s, target),
                                        KDOptions(scalars, **ctx.fields)), *_NO_GRADS
        if ctx.gradient == GRAD and grad_loss.dim() == 0 and not grad_loss.is_cuda and grad_loss.item() == 1.0:
            # `loss.backward()` on the CPU: the saved gradient is the answer, as it is. (Reading a CPU scalar is no
            # device sync; a compiled graph takes the multiply in the op's backward, as it cannot branch on it.)
            return ctx.saved_tensors[0], *_NO_GRADS
        return _ops.student_gradient(ctx, grad_loss), *_NO_GRADS


_NO_GRADS = (None,) * 6  # for teacher_logits, target and the four settings


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
            temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100, reduction: str = "mean",
            backend: str = "auto", check_target: bool = True, fused_backward: bool = False,
            divergence: str = "forward_kl", jsd_beta: float = 0.5, softcap: Optional[float] = None,
            vocab_size: Optional[int] = None) -> Tensor:
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y) per row, reduced; float32 result.

    divergence: "forward_kl" (the KL above), "reverse_kl" (KL(p_s ‖ p_t)) or "jsd" (β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m),
    m = β·p_t + (1−β)·p_s with β = jsd_beta in [0, 1]; β = 0 is forward KL, β = 1 reverse KL). softcap=c replaces
    both logits by c·tanh(z/c) before the temperature (and in the cross-entropy); None: off.

    temperature, alpha, jsd_beta and softcap are numbers (range-checked) or 0-d floating tensors on the logits'
    device (checked for shape, dtype and device only: their values are not read on the host, so keeping them in
    range is the caller's; no gradient reaches them). The kernels read them at run time: under
    torch.compile(fullgraph=True) a new value never recompiles (0-d tensors, or floats with dynamic=True: one
    compile; plain floats: at most two, as Dynamo makes a changed float symbolic).

    The gradient flows to `student_logits` only (in its dtype). Rows whose target is `ignore_index` contribute
    nothing and are not counted by "mean". backend: "auto" (Triton on CUDA, the native CPU kernel on CPU, or plain
    torch with one warning where no C++ compiler is found to build it), "native" (the CPU kernel, else an error),
    "triton" (the kernel everywhere; CPU tensors need TRITON_INTERPRET=1) or "torch" (plain autograd reference).
    check_target=False skips the eager range check of target values (a host sync on CUDA) for callers whose labels
    are already known to be valid; an out-of-range target then yields a NaN loss, as under torch.compile.
    fused_backward=True writes the gradient, already scaled by the reduction, in the forward, and the backward
    returns it untouched: one pass over the logits, the least memory traffic there is. It is exact only when the
    returned loss reaches the backward with gradient 1 (`loss.backward()`, or a sum in which it has weight 1), as in
    fastkd's own training steps; scale the loss after it and the gradient is not scaled. "mean" or "sum" only.
    vocab_size=V reads both logits over their first V columns only (a teacher or student whose tokenizer is padded
    to another multiple), as strided views, never a copy; target must be < V. The student's gradient keeps its full
    width, 0 in the columns past V. Without it, logits of different widths are a ValueError.
    """
    if _sharded.is_dtensor(student_logits) or _sharded.is_dtensor(teacher_logits):
        sharded = student_logits if _sharded.is_dtensor(student_logits) else teacher_logits
        options = check_options(temperature, alpha, ignore_index, reduction, backend, divergence, jsd_beta, softcap,
                                _sharded.local_device(sharded))
        if fused_backward:
            raise ValueError("fused_backward=True is not available on sharded logits (DTensor): the sharded pass "
                             "makes the gradient in the backward")
        return _sharded.sharded_logits(student_logits, teacher_logits, None, target, options, reduction, None,
                                       vocab_size, "kd_loss", auto_chunk_size)
    student_logits, teacher_logits = _first_vocabulary(student_logits, teacher_logits, vocab_size)
    check_logits(student_logits, teacher_logits, target, ignore_index, check_target)
    options = check_options(temperature, alpha, ignore_index, reduction, backend, divergence, jsd_beta, softcap,
                            student_logits.device)
    if not isinstance(fused_backward, bool) or (fused_backward and reduction == "none"):
        raise ValueError(f"fused_backward must be a bool, and needs reduction 'mean' or 'sum'; got "
                         f"fused_backward={fused_backward!r} with reduction={reduction!r}")
    if backend == "torch":
        return reference_loss(student_logits, teacher_logits, target, options, reduction)
    check_backend_for_device(student_logits, backend)
    if not (student_logits.requires_grad and torch.is_grad_enabled()):
        gradient = LOSS_ONLY
    elif fused_backward:
        gradient = FUSED
    else:  # Triton recomputes the gradient in a backward kernel; the CPU kernel writes it in the forward
        gradient = STATS if student_logits.is_cuda or backend == "triton" else GRAD
    teacher_logits = teacher_logits.detach()
    if torch.compiler.is_compiling():
        return _ops.kd_loss_forward(student_logits, teacher_logits, target, options.scalars, **options.fields(),
                                    reduction=reduction, gradient=gradient, backend=backend)[0]
    return _EagerKDLoss.apply(student_logits, teacher_logits, target, options, reduction, gradient, backend)


def _first_vocabulary(s, t, vocab_size):
    """(s, t) read over their common vocabulary: views of their first vocab_size columns, or as given."""
    both = all(isinstance(x, Tensor) and x.dim() == 2 for x in (s, t)) and s.shape[0] == t.shape[0]
    vocabulary = common_vocabulary(vocab_size, {"student_logits": s.shape[1], "teacher_logits": t.shape[1]}
                                   if both else {})
    if vocab_size is None:
        return s, t
    return first_columns(s, vocabulary), first_columns(t, vocabulary)


class KDLoss(nn.Module):
    """Module form of `kd_loss`: forward(student_logits, teacher_logits, target=None)."""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", divergence: str = "forward_kl",
                 jsd_beta: float = 0.5, softcap: Optional[float] = None, vocab_size: Optional[int] = None):
        super().__init__()
        # Validate hyperparameters now, so a bad config fails at construction rather than at the first step.
        check_options(temperature, alpha, ignore_index, reduction, backend, divergence, jsd_beta, softcap)
        common_vocabulary(vocab_size, {})
        self.vocab_size = vocab_size
        self.temperature, self.alpha = option_value(temperature), option_value(alpha)
        self.ignore_index, self.reduction, self.backend = int(ignore_index), reduction, backend
        self.divergence, self.jsd_beta, self.softcap = divergence, option_value(jsd_beta), softcap

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, target, temperature=self.temperature, alpha=self.alpha,
                       ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                       divergence=self.divergence, jsd_beta=self.jsd_beta, softcap=self.softcap,
                       vocab_size=self.vocab_size)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"divergence={self.divergence!r}, jsd_beta={self.jsd_beta}, softcap={self.softcap}, "
                f"vocab_size={self.vocab_size}")
