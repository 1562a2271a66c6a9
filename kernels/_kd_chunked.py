"""Distillation at language-model vocabulary scale, row chunk by row chunk: `kd_loss_linear` (the student's logits
made from its hidden states and output weight, never all at once) and `kd_loss_sparse` (a teacher given as its top-k
logits). Both are the objective of `kd_loss`, α·T²·KL + (1−α)·CE per row, through the same fused kernels.

Per chunk of rows: the student's logits (one matmul), the teacher's (given, one matmul, or scattered from its
top-k), then the fused kernel writes the chunk's loss rows and ∂ℓ/∂logits in one pass, and that gradient is
contracted at once into ∂hidden (a matmul) and ∂weight, ∂bias (accumulated), then dropped. So the extra memory is a
few (chunk, V) buffers whatever N is. Nothing reads a tensor's values on the host, except the eager calls' checks
of target and top-k index values (as kd_loss's target check; skipped under torch.compile and CUDA-graph capture).

The gradients are made in the forward (the backward only scales them by the incoming gradient), except for
reduction "none": its per-row incoming gradients are known only in the backward, which then runs the chunks again
with them as row weights (the matmuls twice, as activation checkpointing would).

A top-k teacher is a dense chunk with -inf outside its k classes: the kernel's masked-class handling makes that
exactly softmax(values / T) on the k classes and 0 elsewhere, at the price of writing and reading one (chunk, V)
buffer; the teacher side held between calls is O(N·k).
"""
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import _kd_bucketed as _bucketed
from . import _kd_sharded as _sharded
from ._kd_common import (
    DTYPES,
    OPTIONS_SCHEMA,
    KDOptions,
    bad_topk_rows,
    check_backend_for_device,
    check_options,
    common_vocabulary,
    first_columns,
    first_rows,
    option_value,
    reduce_rows,
    reduction_scale,
    reference_loss,
    result_dtype,
    scaled,
    validate_target,
)
from ._kd_ops import CHUNK_KERNELS

__all__ = ["kd_loss_linear", "kd_loss_sparse", "KDLinearLoss", "auto_chunk_size"]

# Chunk rows: enough for the matmuls to run at full speed, few enough that one (rows, V) buffer stays near this many
# bytes. A batch that fits in one chunk is the materialised computation, no slower than it.
_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}
_MIN_CHUNK_ROWS = {"cuda": 1024, "cpu": 128}


def auto_chunk_size(n: int, vocabulary: int, dtype: torch.dtype, device: torch.device) -> int:
    """The rows per chunk `chunk_size=None` picks for N rows over a V-class vocabulary."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    per_row = vocabulary * torch.empty((), dtype=dtype).element_size()
    return max(1, min(n, max(_MIN_CHUNK_ROWS[kind], _CHUNK_BYTES[kind] // per_row)))


# --------------------------------------------------------------------------------------------------------------------
# The chunk loop, shared by both functions.
# --------------------------------------------------------------------------------------------------------------------

def _in_chunks(n: int, chunk: int, student: Callable, teacher: Callable, target: Optional[Tensor],
               options: KDOptions, write_grad: bool, chunk_kernel: Callable, backend: str, grad_buffer: Callable,
               consume: Callable) -> Tensor:
    """The (N,) loss rows. chunk_kernel (the device's, from CHUNK_KERNELS) runs each chunk [r0, r1) through the
    fused kernel: student(r0, r1) and teacher(r0, r1) give its logits,
    grad_buffer(r0, r1) a contiguous (rows, V) tensor for the kernel's gradient, and consume(r0, r1, grad)
    takes the gradient of the chunk's rows before the next chunk reuses the buffers."""
    rows = None
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        s, t = student(r0, r1), teacher(r0, r1)
        y = target[r0:r1] if target is not None else None
        chunk_rows, grad = chunk_kernel(s, t, y, options, write_grad, grad_buffer(r0, r1) if write_grad else None,
                                        backend)
        if rows is None:
            rows = chunk_rows.new_empty(n)
        rows[r0:r1] = chunk_rows
        if write_grad:
            consume(r0, r1, grad)
    return rows


def _scatterable(values: Tensor, indices: Tensor, vocabulary: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(values in dtype, indices in range) for scattering a top-k teacher; a row with bad indices (repeated or out
    of range) gets NaN values, so that its loss is NaN rather than silently wrong."""
    bad_rows = bad_topk_rows(indices, vocabulary)
    return torch.where(bad_rows[:, None], math.nan, values.to(dtype)), indices.clamp(0, vocabulary - 1)


def _topk_teacher(values: Tensor, indices: Tensor, vocabulary: int, dtype: torch.dtype, buffer: Tensor) -> Callable:
    """teacher(r0, r1) for a top-k teacher: -inf everywhere but its k classes."""
    values, safe = _scatterable(values, indices, vocabulary, dtype)

    def teacher(r0, r1):
        t = buffer[: r1 - r0]
        t.fill_(-math.inf)
        return t.scatter_(1, safe[r0:r1], values[r0:r1])

    return teacher


def _check_topk_values(indices: Tensor, target: Optional[Tensor], ignore_index: int, vocabulary: int,
                       name: str) -> None:
    """Eager calls: a ValueError for the first counted row with bad indices. Like the target check, a host read,
    skipped while compiling or capturing a CUDA graph, where such a row makes the loss NaN instead."""
    if torch.compiler.is_compiling() or (indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    bad_rows = bad_topk_rows(indices, vocabulary)
    if target is not None:
        bad_rows = bad_rows & (target != ignore_index)
    if not bool(bad_rows.any()):
        return
    row = int(bad_rows.nonzero()[0, 0])
    classes = indices[row].tolist()
    outside = [c for c in classes if not 0 <= c < vocabulary]
    what = f"class {outside[0]} outside [0, {vocabulary})" if outside else \
        f"class {next(c for c in classes if classes.count(c) > 1)} twice"
    raise ValueError(f"{name} of row {row} hold {what}")


# --------------------------------------------------------------------------------------------------------------------
# kd_loss_linear: a torch.library op (opaque to Dynamo) whose forward returns the loss and the parameters' gradients.
# --------------------------------------------------------------------------------------------------------------------

# scalars: KDOptions.scalars (the float options, read by the kernels at run time).
_LINEAR_TENSORS = ("hidden", "weight", "bias", "target", "teacher_logits", "teacher_hidden", "teacher_weight",
                   "teacher_bias", "topk_values", "topk_indices", "scalars", "row_weights")
_LINEAR_SCHEMA = ("(Tensor hidden, Tensor weight, Tensor? bias, Tensor? target, Tensor? teacher_logits, "
                  "Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, Tensor? topk_values, "
                  "Tensor? topk_indices, Tensor scalars, Tensor? row_weights, *, " + OPTIONS_SCHEMA
                  + ", str reduction, int chunk, bool grad_hidden, bool grad_weight, bool grad_bias, str backend) "
                  "-> (Tensor, Tensor, Tensor, Tensor)")


def _linear_forward_on(chunk_kernel: Callable, hidden, weight, bias, target, teacher_logits, teacher_hidden,
                       teacher_weight, teacher_bias, topk_values, topk_indices, scalars, row_weights, *, reduction,
                       chunk, grad_hidden, grad_weight, grad_bias, backend, **options):
    """(the reduced loss, or the rows for "none"; ∂/∂hidden, ∂/∂weight, ∂/∂bias, each empty unless asked). The
    gradients are those of the reduced loss; for "none", only when row_weights are given (the backward's incoming
    per-row gradients), of Σᵢ wᵢ·ℓᵢ."""
    options = KDOptions(scalars, **options)
    grad_hidden, grad_weight, grad_bias = _made_here(reduction, row_weights, grad_hidden, grad_weight, grad_bias)
    n, vocabulary = hidden.shape[0], weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    rows_per_chunk = min(chunk, n)
    logits = torch.empty((rows_per_chunk, vocabulary), dtype=dtype, device=device)
    teacher_buffer = None if teacher_logits is not None else torch.empty_like(logits)

    def student(r0, r1):
        out = logits[: r1 - r0]
        if bias is None:
            return torch.mm(hidden[r0:r1], weight.T, out=out)
        return torch.addmm(bias, hidden[r0:r1], weight.T, out=out)

    if teacher_logits is not None:
        def teacher(r0, r1):
            return teacher_logits[r0:r1]
    elif teacher_hidden is not None:
        def teacher(r0, r1):
            out = teacher_buffer[: r1 - r0]
            if teacher_bias is None:
                return torch.mm(teacher_hidden[r0:r1], teacher_weight.T, out=out)
            return torch.addmm(teacher_bias, teacher_hidden[r0:r1], teacher_weight.T, out=out)
    else:
        teacher = _topk_teacher(topk_values, topk_indices, vocabulary, dtype, teacher_buffer)

    d_hidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)  # (outputs must not alias)
    d_weight = torch.zeros_like(weight) if grad_weight else hidden.new_empty(0)
    d_bias = torch.zeros_like(bias) if grad_bias else hidden.new_empty(0)
    grad_buffer = torch.empty_like(logits) if grad_hidden or grad_weight or grad_bias else None

    # Each row's weight in the objective: the reduction's (1 or 1/count), or the backward's per-row gradients. It
    # is applied to each chunk's small factors before anything is summed over rows, so that a float16 ∂weight
    # cannot overflow on an unscaled sum.
    # (The weights are float32, float64 for float64 inputs: each product with them rounds once, to the input's dtype.)
    scale = None
    if row_weights is None and reduction != "none":
        scale = reduction_scale(hidden, target, options.ignore_index, reduction)

    def consume(r0, r1, grad):
        w = scale if row_weights is None else row_weights[r0:r1, None]
        if grad_hidden:
            torch.mm(grad, weight, out=d_hidden[r0:r1]).mul_(w)
        if grad_weight:  # accumulated in the weight's dtype, one rounding per chunk (as a beta=1 GEMM does)
            d_weight.addmm_(grad.T, (hidden[r0:r1] * w).to(dtype))
        if grad_bias:
            d_bias.add_((grad * w).sum(0) if w.dim() else grad.sum(0) * w)

    rows = _in_chunks(n, rows_per_chunk, student, teacher, target, options, grad_hidden or grad_weight or grad_bias,
                      chunk_kernel, backend, lambda r0, r1: grad_buffer[: r1 - r0], consume)
    return reduce_rows(rows, target, options.ignore_index, reduction), d_hidden, d_weight, d_bias


def _made_here(reduction, row_weights, *wanted: bool) -> tuple[bool, ...]:
    """Which gradients a call of the op makes: those wanted, except in a forward for reduction "none" (no row
    weights yet), whose backward makes them."""
    return tuple(want and (reduction != "none" or row_weights is not None) for want in wanted)


def _registered(name: str, schema: str, forward_on: Callable):
    """The op `name`, its kernel per device type being forward_on with that device's chunk kernel."""
    def on(device_type):
        return lambda *args, **fields: forward_on(CHUNK_KERNELS[device_type], *args, **fields)

    op = torch.library.custom_op(name, on("cpu"), mutates_args=(), device_types="cpu", schema=schema)
    op.register_kernel("cuda")(on("cuda"))
    return op


_linear_forward = _registered("fastkd::kd_loss_linear_forward", _LINEAR_SCHEMA, _linear_forward_on)


@_linear_forward.register_fake
def _(hidden, weight, bias, *tensors, reduction, grad_hidden, grad_weight, grad_bias, **fields):
    row_weights = tensors[-1]
    grad_hidden, grad_weight, grad_bias = _made_here(reduction, row_weights, grad_hidden, grad_weight, grad_bias)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=result_dtype(hidden))
    return (loss, torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else hidden.new_empty(0),
            torch.empty_like(bias) if grad_bias else hidden.new_empty(0))


def _linear_setup_context(ctx, inputs, keyword_only_inputs, output):
    tensors, ctx.fields = inputs[:-1], dict(keyword_only_inputs)  # all but row_weights (None in a forward)
    ctx.present = [x is not None for x in tensors]  # which optional inputs were given
    if ctx.fields["reduction"] == "none":  # everything, to run the chunks again with the row weights
        ctx.save_for_backward(*(x for x in tensors if x is not None))
    else:  # the gradients the forward made
        ctx.save_for_backward(*output[1:])


def _no_double_backward(name: str) -> None:
    # The saved gradients are constants to autograd: a gradient of them would be silently zero.
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name}: double backward (create_graph=True) is not supported")


def _linear_backward(ctx, grad_loss, _d_hidden, _d_weight, _d_bias):
    _no_double_backward("kd_loss_linear")
    fields = ctx.fields
    if fields["reduction"] == "none":
        saved = iter(ctx.saved_tensors)
        tensors = [next(saved) if given else None for given in ctx.present]
        row_weights = grad_loss.to(result_dtype(tensors[0]))
        _, d_hidden, d_weight, d_bias = _linear_forward(*tensors, row_weights, **fields)
    else:
        # A new tensor, not the saved one scaled in place, so that a second backward through the same call
        # (retain_graph=True) stays exact; the saved one is freed right after this backward.
        d_hidden, d_weight, d_bias = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    wanted = (fields["grad_hidden"], fields["grad_weight"], fields["grad_bias"])
    grads = [g if want else None for g, want in zip((d_hidden, d_weight, d_bias), wanted)]
    return *grads, *(None for _ in _LINEAR_TENSORS[3:])


_linear_forward.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# kd_loss_sparse: the student's logits given, the teacher as top-k.
# --------------------------------------------------------------------------------------------------------------------

_SPARSE_SCHEMA = ("(Tensor s, Tensor topk_values, Tensor topk_indices, Tensor? target, Tensor scalars, *, "
                  + OPTIONS_SCHEMA
                  + ", str reduction, int chunk, bool write_grad, str backend) -> (Tensor, Tensor)")


def _sparse_forward_on(chunk_kernel: Callable, s, topk_values, topk_indices, target, scalars, *, reduction, chunk,
                       write_grad, backend, **options):
    """(the reduced loss, or the rows for "none"; ∂(Σ rows)/∂s, empty unless write_grad)."""
    options = KDOptions(scalars, **options)
    n, vocabulary = s.shape
    rows_per_chunk = min(chunk, n)
    teacher_buffer = torch.empty((rows_per_chunk, vocabulary), dtype=s.dtype, device=s.device)
    teacher = _topk_teacher(topk_values, topk_indices, vocabulary, s.dtype, teacher_buffer)
    grad = torch.empty((n, vocabulary) if write_grad else (0,), dtype=s.dtype, device=s.device)

    rows = _in_chunks(n, rows_per_chunk, lambda r0, r1: s[r0:r1], teacher, target, options, write_grad,
                      chunk_kernel, backend, lambda r0, r1: grad[r0:r1], lambda r0, r1, chunk_grad: None)
    return reduce_rows(rows, target, options.ignore_index, reduction), grad


_sparse_forward = _registered("fastkd::kd_loss_sparse_forward", _SPARSE_SCHEMA, _sparse_forward_on)


@_sparse_forward.register_fake
def _(s, topk_values, topk_indices, target, scalars, *, reduction, write_grad, **fields):
    loss = s.new_empty((s.shape[0],) if reduction == "none" else (), dtype=result_dtype(s))
    return loss, s.new_empty(s.shape if write_grad else (0,))


def _sparse_setup_context(ctx, inputs, keyword_only_inputs, output):
    target = inputs[3]
    ctx.has_target = target is not None
    ctx.ignore_index, ctx.reduction, ctx.write_grad = (keyword_only_inputs[name] for name in
                                                       ("ignore_index", "reduction", "write_grad"))
    ctx.save_for_backward(output[1], target if target is not None else output[1].new_empty(0))


def _sparse_backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.write_grad:
        raise RuntimeError("kd_loss_sparse: backward through a call made without a student gradient "
                           "(student_logits did not require grad)")
    _no_double_backward("kd_loss_sparse")
    grad, target = ctx.saved_tensors
    target = target if ctx.has_target else None
    if ctx.reduction != "none":
        grad_loss = grad_loss * reduction_scale(grad, target, ctx.ignore_index, ctx.reduction)
    return scaled(grad, grad_loss), None, None, None, None


_sparse_forward.register_autograd(_sparse_backward, setup_context=_sparse_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------------------------

def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def _check_matrix(x, name: str, shape: tuple, dtype: torch.dtype, device) -> None:
    """x is a tensor of `shape` (None entries: any size >= 1), dtype and device, else a ValueError naming it."""
    ok_shape = isinstance(x, Tensor) and x.dim() == len(shape) and all(
        want is None and got >= 1 or got == want for got, want in zip(x.shape, shape))
    if not ok_shape:
        wanted = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
        raise ValueError(f"{name} must be a {len(shape)}-D tensor of shape {wanted}, got {_shape(x)}")
    if x.dtype != dtype:
        raise ValueError(f"{name} dtype {x.dtype} does not match student_hidden's {dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")


def _validate_topk(values, indices, n: int, vocabulary: int, device, names: tuple[str, str, str]) -> None:
    """names: how the caller calls the values, the indices and the student."""
    values_name, indices_name, student_name = names
    if not isinstance(values, Tensor) or values.dim() != 2 or values.shape[0] != n or \
            not values.dtype.is_floating_point:
        raise ValueError(f"{values_name} must be a floating (N, k) = ({n}, k) tensor, got {_shape(values)}")
    if not isinstance(indices, Tensor) or indices.shape != values.shape or indices.dtype != torch.int64:
        raise ValueError(f"{indices_name} must be an int64 tensor of the values' shape {tuple(values.shape)}, "
                         f"got {_shape(indices)} {getattr(indices, 'dtype', type(indices).__name__)}")
    if not 1 <= values.shape[1] <= vocabulary:
        raise ValueError(f"{values_name} must hold 1 <= k <= V = {vocabulary} classes a row, got k = {values.shape[1]}")
    if values.device != device or indices.device != device:
        raise ValueError(f"{values_name} and {indices_name} are on {values.device}/{indices.device} but "
                         f"{student_name} is on {device}")


def _validate_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _as_int64(target: Optional[Tensor]) -> Optional[Tensor]:
    # Any integer dtype is accepted; the kernels and the reference's cross-entropy index with int64.
    return target.long() if target is not None else None


def kd_loss_linear(student_hidden: Tensor, student_weight: Tensor, target: Optional[Tensor] = None, *,
                   student_bias: Optional[Tensor] = None, teacher_logits: Optional[Tensor] = None,
                   teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
                   teacher_bias: Optional[Tensor] = None, teacher_topk: Optional[tuple[Tensor, Tensor]] = None,
                   temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100, reduction: str = "mean",
                   chunk_size: Optional[int] = None, backend: str = "auto", divergence: str = "forward_kl",
                   jsd_beta: float = 0.5, softcap: Optional[float] = None,
                   vocab_size: Optional[int] = None, gather: str = "auto") -> Tensor:
    """`kd_loss(student_hidden @ student_weight.T + student_bias, teacher_logits, target, ...)` without the (N, V)
    logits: rows in chunks of `chunk_size` (None: `auto_chunk_size`), extra memory O(chunk · V). divergence,
    jsd_beta and softcap as in `kd_loss` (the cap applies to the student's and the teacher's logits).

    The teacher is exactly one of: `teacher_logits` (N, V); `teacher_hidden` (N, Ht) with `teacher_weight` (V, Ht)
    and optionally `teacher_bias` (V,); `teacher_topk` = (values (N, k), indices (N, k) int64), the distribution
    softmax(values / T) on those k classes and 0 elsewhere. Gradients reach student_hidden, student_weight and
    student_bias only. backend: as `kd_loss`'s ("auto", "native", "triton"), or "torch" (the materialised
    plain-torch reference, for comparison). No host sync under torch.compile; eager calls check target
    and top-k index values (a host read), as `kd_loss` does.

    vocab_size=V reads the student's weight and bias, and the teacher's logits, weight and bias, over their first V
    classes only (views, no copy; top-k indices must be < V): a teacher whose vocabulary is padded to another
    multiple, or has extra tokens. The gradients of student_weight and student_bias keep their full V_s rows, 0 past
    V. Without it, a teacher width other than the student's is a ValueError naming both.

    Sharded heads (FSDP2, tensor parallelism): student_weight (and teacher_weight, biases) may be DTensors split
    along the vocabulary (Shard(0)) on any mesh dimension. Plain student_hidden: each rank's own batch (FSDP);
    `gather` then picks what crosses the network, "hidden" (the hidden states, the head stays sharded), "head" (the
    head is all-gathered) or "auto" (whichever receives fewer bytes, `_kd_sharded.gather_plan`). student_hidden as
    a replicated DTensor: one batch on every rank (tensor parallelism). See docs/kernels.md, "Sharded heads".
    """
    if any(_sharded.is_dtensor(x) for x in (student_hidden, student_weight, student_bias, teacher_logits,
                                             teacher_hidden, teacher_weight, teacher_bias)):
        options = check_options(temperature, alpha, ignore_index, reduction, backend, divergence, jsd_beta, softcap,
                                _sharded.local_device(student_hidden))
        _validate_chunk_size(chunk_size)
        if isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2:
            rows = student_hidden.to_local() if _sharded.is_dtensor(student_hidden) else student_hidden
            top = vocab_size or student_weight.shape[0]
            _validate_topk(*teacher_topk, rows.shape[0], top, rows.device,
                           ("teacher_topk values", "teacher_topk indices", "student_hidden"))
            _check_topk_values(teacher_topk[1], target, ignore_index, top, "teacher_topk indices")
        return _sharded.sharded_linear(student_hidden, student_weight, student_bias, target, teacher_logits,
                                       teacher_hidden, teacher_weight, teacher_bias, teacher_topk, options,
                                       reduction, chunk_size, vocab_size, gather, kd_loss_linear, auto_chunk_size)
    if gather not in _sharded.GATHERS:
        raise ValueError(f"gather must be one of {_sharded.GATHERS}, got {gather!r}")
    _check_matrix(student_hidden, "student_hidden", (None, None), getattr(student_hidden, "dtype", None),
                  getattr(student_hidden, "device", None))
    if student_hidden.dtype not in DTYPES:
        raise ValueError(f"student_hidden must be float32, bfloat16, float16 or float64, got {student_hidden.dtype}")
    n, width = student_hidden.shape
    dtype, device = student_hidden.dtype, student_hidden.device
    _check_matrix(student_weight, "student_weight", (None, width), dtype, device)
    vocabulary = student_weight.shape[0]
    if student_bias is not None:
        _check_matrix(student_bias, "student_bias", (vocabulary,), dtype, device)
    student_weight, student_bias, teacher_logits, teacher_weight, teacher_bias = _first_vocabulary(
        vocab_size, n, student_weight, student_bias, teacher_logits, teacher_weight, teacher_bias)
    vocabulary = student_weight.shape[0]
    given = [name for name, x in (("teacher_logits", teacher_logits), ("teacher_hidden", teacher_hidden),
                                  ("teacher_topk", teacher_topk)) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one teacher: teacher_logits, teacher_hidden with teacher_weight, or "
                         f"teacher_topk; got {' and '.join(given) if given else 'none'}")
    if (teacher_weight is not None or teacher_bias is not None) and teacher_hidden is None:
        raise ValueError("teacher_weight and teacher_bias go with teacher_hidden, which is missing")
    values = indices = None
    if teacher_logits is not None:
        _check_matrix(teacher_logits, "teacher_logits", (n, vocabulary), dtype, device)
    elif teacher_hidden is not None:
        _check_matrix(teacher_hidden, "teacher_hidden", (n, None), dtype, device)
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight (V, Ht)")
        _check_matrix(teacher_weight, "teacher_weight", (vocabulary, teacher_hidden.shape[1]), dtype, device)
        if teacher_bias is not None:
            _check_matrix(teacher_bias, "teacher_bias", (vocabulary,), dtype, device)
    else:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise ValueError("teacher_topk must be a pair (values (N, k), indices (N, k) int64)")
        values, indices = teacher_topk
        _validate_topk(values, indices, n, vocabulary, device,
                       ("teacher_topk values", "teacher_topk indices", "student_hidden"))
    options = check_options(temperature, alpha, ignore_index, reduction, backend, divergence, jsd_beta, softcap,
                            device)
    validate_target(target, n, vocabulary, device, "student_hidden", True, ignore_index)
    _validate_chunk_size(chunk_size)
    if indices is not None:
        _check_topk_values(indices, target, ignore_index, vocabulary, "teacher_topk indices")
    target = _as_int64(target)
    if backend == "torch":
        return _linear_reference(student_hidden, student_weight, student_bias, target, teacher_logits,
                                 teacher_hidden, teacher_weight, teacher_bias, values, indices, options, reduction)
    check_backend_for_device(student_hidden, backend)
    grad_on = torch.is_grad_enabled()
    wants = [grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    chunk = chunk_size or auto_chunk_size(n, vocabulary, dtype, device)
    detached = [x.detach() if x is not None else None
                for x in (teacher_logits, teacher_hidden, teacher_weight, teacher_bias, values)]
    return _linear_forward(student_hidden, student_weight, student_bias, target, *detached[:4], detached[4], indices,
                           options.scalars, None, **options.fields(), reduction=reduction, chunk=chunk,
                           grad_hidden=wants[0], grad_weight=wants[1], grad_bias=wants[2], backend=backend)[0]


def _first_vocabulary(vocab_size, n, weight, bias, teacher_logits, teacher_weight, teacher_bias) -> tuple:
    """The student's weight and bias and the teacher's logits, weight and bias over their common vocabulary:
    views of their first V classes (vocab_size), or as given. Malformed teacher tensors pass through unchanged,
    for kd_loss_linear's shape checks to name."""
    widths = {"student_weight": weight.shape[0]}
    if isinstance(teacher_logits, Tensor) and teacher_logits.dim() == 2 and teacher_logits.shape[0] == n:
        widths["teacher_logits"] = teacher_logits.shape[1]
    if isinstance(teacher_weight, Tensor) and teacher_weight.dim() == 2:
        widths["teacher_weight"] = teacher_weight.shape[0]
        if isinstance(teacher_bias, Tensor) and teacher_bias.shape != (teacher_weight.shape[0],):
            raise ValueError(f"teacher_bias must have teacher_weight's {teacher_weight.shape[0]} classes, "
                             f"got shape {_shape(teacher_bias)}")
    vocabulary = common_vocabulary(vocab_size, widths)
    if vocab_size is None:
        return weight, bias, teacher_logits, teacher_weight, teacher_bias
    return (first_rows(weight, vocabulary), first_rows(bias, vocabulary), first_columns(teacher_logits, vocabulary),
            first_rows(teacher_weight, vocabulary), first_rows(teacher_bias, vocabulary))


def kd_loss_sparse(student_logits: Tensor, teacher_values: Tensor, teacher_indices: Tensor,
                   target: Optional[Tensor] = None, *, temperature: float = 1.0, alpha: float = 0.5,
                   ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None,
                   backend: str = "auto", vocab_size: Optional[int] = None, teacher_format: str = "logits",
                   divergence: str = "forward_kl", jsd_beta: float = 0.5) -> Tensor:
    """`kd_loss` against a teacher given by its top-k logits: values (N, k) at indices (N, k) int64, the teacher's
    distribution softmax(values / T) on those k classes and 0 elsewhere; the student's log-softmax is over all its
    classes. Repeated or out-of-range indices are a ValueError in eager calls and a NaN loss under compile.
    vocab_size=V reads the student over its first V columns only (a view, no copy): indices and target must be < V,
    and the gradient keeps the student's full width, 0 past V.

    teacher_format="logprobs": the values are stored log-probabilities of the teacher at T = 1 (an offline top-k
    store, total below 1). The teacher is then the k classes at their probabilities plus one tail bucket holding
    the rest of its mass, compared with the student's probabilities of the same k classes and its mass outside them
    (exact for that bucketed distribution: the store knows nothing finer). Only temperature=1: the tempered tail
    mass Σ_{j∉K} q_j^(1/T) depends on the unstored q_j. A log-probability > 0 or a total above 1 (beyond rounding)
    is a ValueError; -inf (a class with no mass) is allowed. divergence and jsd_beta as in `kd_loss`, on the
    bucketed distributions (with "logits", the k classes and an empty tail; "reverse_kl" is then refused, being
    infinite wherever the student has mass outside K). The bucketed forms run in plain torch, chunk by chunk, with
    backend "auto" or "torch"; forward KL on "logits" is the fused kernel's dense loss, which it equals."""
    if _sharded.is_dtensor(student_logits):
        options = check_options(temperature, alpha, ignore_index, reduction, backend, divergence, jsd_beta,
                                device=_sharded.local_device(student_logits))
        if teacher_format != "logits" or divergence != "forward_kl":
            raise ValueError("kd_loss_sparse on sharded student_logits runs the fused form only: forward KL with "
                             f"teacher_format='logits' (got divergence={divergence!r}, jsd_beta={jsd_beta}, "
                             f"teacher_format={teacher_format!r})")
        _validate_chunk_size(chunk_size)
        top = vocab_size or student_logits.shape[1]
        _validate_topk(teacher_values, teacher_indices, student_logits.shape[0], top, student_logits.device,
                       ("teacher_values", "teacher_indices", "student_logits"))
        _check_topk_values(teacher_indices, target, ignore_index, top, "teacher_indices")
        return _sharded.sharded_logits(student_logits, None, (teacher_values, teacher_indices), target, options,
                                       reduction, chunk_size, vocab_size, "kd_loss_sparse", auto_chunk_size)
    if not isinstance(student_logits, Tensor) or student_logits.dim() != 2 or min(student_logits.shape) < 1:
        raise ValueError(f"student_logits must be a 2-D (N, C) tensor with N, C >= 1, got {_shape(student_logits)}")
    if student_logits.dtype not in DTYPES:
        raise ValueError(f"student_logits must be float32, bfloat16, float16 or float64, got {student_logits.dtype}")
    common_vocabulary(vocab_size, {"student_logits": student_logits.shape[1]})
    student_logits = first_columns(student_logits, vocab_size)
    n, vocabulary = student_logits.shape
    values, indices = teacher_values, teacher_indices
    _validate_topk(values, indices, n, vocabulary, student_logits.device,
                   ("teacher_values", "teacher_indices", "student_logits"))
    options = check_options(temperature, alpha, ignore_index, reduction, backend, divergence, jsd_beta,
                            device=student_logits.device)
    bucketed = _bucketed.check_format(teacher_format, divergence, temperature, jsd_beta, backend)
    validate_target(target, n, vocabulary, student_logits.device, "student_logits", True, ignore_index)
    _validate_chunk_size(chunk_size)
    _check_topk_values(indices, target, ignore_index, vocabulary, "teacher_indices")
    target = _as_int64(target)
    if bucketed:
        return _bucketed.sparse_loss(student_logits, values, indices, target, teacher_format, options, reduction,
                                     chunk_size or auto_chunk_size(n, vocabulary, torch.float32, student_logits.device))
    if backend == "torch":
        dense = _dense_from_topk(values, indices, vocabulary, student_logits.dtype)
        return reference_loss(student_logits, dense, target, options, reduction)
    check_backend_for_device(student_logits, backend)
    write_grad = student_logits.requires_grad and torch.is_grad_enabled()
    chunk = chunk_size or auto_chunk_size(n, vocabulary, student_logits.dtype, student_logits.device)
    return _sparse_forward(student_logits, values.detach(), indices, target, options.scalars, **options.fields(),
                           reduction=reduction, chunk=chunk, write_grad=write_grad, backend=backend)[0]


def _dense_from_topk(values: Tensor, indices: Tensor, vocabulary: int, dtype: torch.dtype) -> Tensor:
    values, safe = _scatterable(values.detach(), indices, vocabulary, dtype)
    dense = torch.full((values.shape[0], vocabulary), -math.inf, dtype=dtype, device=values.device)
    return dense.scatter_(1, safe, values)


def _linear_reference(hidden, weight, bias, target, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                      values, indices, options: KDOptions, reduction):
    """The materialised computation in plain torch with autograd (backend="torch")."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    if teacher_logits is None:
        with torch.no_grad():
            if teacher_hidden is not None:
                teacher_logits = teacher_hidden @ teacher_weight.T + (teacher_bias if teacher_bias is not None else 0)
            else:
                teacher_logits = _dense_from_topk(values, indices, weight.shape[0], hidden.dtype)
    return reference_loss(logits, teacher_logits, target, options, reduction)


class KDLinearLoss(nn.Module):
    """Module form of `kd_loss_linear`: forward(student_hidden, student_weight, target=None, **teacher and bias)."""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100,
                 reduction: str = "mean", chunk_size: Optional[int] = None, backend: str = "auto",
                 divergence: str = "forward_kl", jsd_beta: float = 0.5, softcap: Optional[float] = None,
                 vocab_size: Optional[int] = None, gather: str = "auto"):
        super().__init__()
        if gather not in _sharded.GATHERS:
            raise ValueError(f"gather must be one of {_sharded.GATHERS}, got {gather!r}")
        self.gather = gather
        check_options(temperature, alpha, ignore_index, reduction, backend, divergence, jsd_beta, softcap)
        _validate_chunk_size(chunk_size)
        common_vocabulary(vocab_size, {})
        self.vocab_size = vocab_size
        self.temperature, self.alpha = option_value(temperature), option_value(alpha)
        self.ignore_index = int(ignore_index)
        self.reduction, self.chunk_size, self.backend = reduction, chunk_size, backend
        self.divergence, self.jsd_beta, self.softcap = divergence, option_value(jsd_beta), softcap

    def forward(self, student_hidden: Tensor, student_weight: Tensor, target: Optional[Tensor] = None,
                **teacher_and_bias) -> Tensor:
        return kd_loss_linear(student_hidden, student_weight, target, **teacher_and_bias,
                              temperature=self.temperature, alpha=self.alpha, ignore_index=self.ignore_index,
                              reduction=self.reduction, chunk_size=self.chunk_size, backend=self.backend,
                              divergence=self.divergence, jsd_beta=self.jsd_beta, softcap=self.softcap,
                              vocab_size=self.vocab_size, gather=self.gather)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, backend={self.backend!r}, "
                f"divergence={self.divergence!r}, jsd_beta={self.jsd_beta}, softcap={self.softcap}, "
                f"vocab_size={self.vocab_size}, gather={self.gather!r}")
