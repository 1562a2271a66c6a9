"""The losses on vocabulary-sharded heads and logits (FSDP2, tensor parallelism), on torch.distributed's own DTensor
and collectives: no head is gathered unless the cost rule says it is cheaper.

Vocabulary-parallel pass. Each rank holds a slice of the vocabulary (its rows of the head, or its columns of the
logits) and computes that slice of every row's logits, chunk of rows by chunk. Per chunk the ranks combine a few
floats a row with three all-reduces: the maxima of s/T and t/T; the sums of exponentials (student at T and at 1,
teacher at T) and the target's logit; the divergence's partial sums (one, or two for JSD). Then every rank knows
each row's loss. The backward runs the chunks again (the matmuls twice, as activation checkpointing would) with the
rows' incoming gradients, using the saved per-row statistics: no collective but the final sum of ∂hidden.

Whose rows. With plain hidden states (FSDP2: each rank its own batch), every row must meet every vocabulary slice:
either the hidden states are all-gathered (N·H per rank; the head's gradient is made where it lives, and averaged
over ranks as FSDP averages) or the head is all-gathered (V·H) and the unsharded loss runs; `gather_plan` picks the
one that receives fewer bytes. With hidden states given as a replicated DTensor (tensor parallelism: one batch on
every rank), the pass runs on them as they are and ∂hidden is summed over the slices.

Eager only: a call is a graph break under torch.compile (its chunk loop and collectives are not traced)."""
import dataclasses
import math
import sys
import zlib
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ._kd_common import (
    SCALARS,
    KDOptions,
    _kl,
    _log_mixture,
    bad_topk_rows,
    common_vocabulary,
    divergence_grad_from_logs,
    jsd_from_parts,
    reduce_rows,
    reduction_scale,
    result_dtype,
    soft_capped,
    validate_target,
)

GATHERS = ("auto", "hidden", "head")


def is_dtensor(x) -> bool:
    # torch.distributed.tensor costs most of a second to import: a DTensor exists only once it is imported.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def local_device(x) -> torch.device:
    """The device of x's local shard (of x for a plain tensor): where the options' scalars go."""
    return (x.to_local() if is_dtensor(x) else x).device


# --------------------------------------------------------------------------------------------------------------------
# Layouts.
# --------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VocabShards:
    """A vocabulary of `width` classes split over mesh dimension `mesh_dim` as DTensor's Shard splits: rank i holds
    [i·c, (i+1)·c) with c = ceil(width / ranks), clipped to the width (the last slices may be short or empty)."""
    mesh: object
    mesh_dim: int
    width: int

    @property
    def group(self):
        return self.mesh.get_group(self.mesh_dim)

    @property
    def ranks(self) -> int:
        return self.mesh.size(self.mesh_dim)

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank(self.mesh_dim)

    @property
    def piece(self) -> int:
        return -(-self.width // self.ranks)

    def span(self, vocabulary: int) -> tuple[int, int]:
        """This rank's classes [start, stop) of the first `vocabulary` classes."""
        start = min(self.rank * self.piece, vocabulary)
        return start, min(start + self.piece, vocabulary)

    def other_mesh_dims(self) -> list[int]:
        return [d for d in range(self.mesh.ndim) if d != self.mesh_dim]


def vocab_shards(x, name: str, dim: int) -> VocabShards:
    """The split of DTensor x, whose dimension `dim` is its vocabulary; a ValueError naming any other layout."""
    placements = tuple(x.placements)
    sharded = [d for d, p in enumerate(placements) if p.is_shard()]
    if len(sharded) != 1 or not placements[sharded[0]].is_shard(dim) or \
            not all(p.is_replicate() for d, p in enumerate(placements) if d != sharded[0]):
        raise ValueError(f"{name} is a DTensor with placements {placements} over mesh {tuple(x.device_mesh.shape)}: "
                         f"the sharded loss needs its vocabulary (dimension {dim}) split over exactly one mesh "
                         f"dimension (Shard({dim})) and replicated over any others")
    return VocabShards(x.device_mesh, sharded[0], x.shape[dim])


def same_split(a: VocabShards, b: VocabShards, names: tuple[str, str]) -> None:
    if a.mesh != b.mesh or a.mesh_dim != b.mesh_dim or a.piece != b.piece:
        raise ValueError(f"{names[1]} is split over mesh {tuple(b.mesh.shape)} dimension {b.mesh_dim} in pieces of "
                         f"{b.piece} classes, {names[0]} over mesh {tuple(a.mesh.shape)} dimension {a.mesh_dim} in "
                         f"pieces of {a.piece}: shard both on the same mesh dimension and width")


def _layout(x) -> str:
    if x is None:
        return "none"
    if is_dtensor(x):
        return f"DTensor{tuple(x.placements)}{tuple(x.shape)}"
    return f"Tensor{tuple(x.shape[1:])}"


def check_ranks_agree(shards: VocabShards, layout: str, options: KDOptions, device) -> None:
    """Eager calls: every rank of the split must call with the same layout and settings, or the collectives would
    pair up wrongly. One ValueError on every rank naming both layouts. (A rank whose head is a plain tensor never
    gets here: it runs the unsharded loss, and the others wait on it.) The options' values are read to the host only
    here."""
    if torch.compiler.is_compiling() or (torch.device(device).type == "cuda"
                                         and torch.cuda.is_current_stream_capturing()):
        return
    description = f"{layout} {_described(options)}"
    code = torch.tensor([zlib.crc32(description.encode())], dtype=torch.int64, device=device)
    codes = torch.empty(shards.ranks, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(codes, code, group=shards.group)
    if bool((codes != code).any()):
        others = [r for r, c in enumerate(codes.tolist()) if c != int(code)]
        raise ValueError(f"the ranks of mesh dimension {shards.mesh_dim} call the sharded loss with different "
                         f"layouts: rank {shards.rank} has [{description}], rank(s) {others} something else (a plain "
                         f"tensor where others have a DTensor, another batch size, another option)")


# --------------------------------------------------------------------------------------------------------------------
# Collectives, counted: bytes each rank receives, with the ring algorithms' counts (all-gather and reduce-scatter
# (R − 1)/R of the whole, all-reduce twice that, all-to-all (R − 1)/R of what it sends).
# --------------------------------------------------------------------------------------------------------------------

_counters: list = []


@contextmanager
def counted_collectives():
    """with counted_collectives() as bytes_received: ... : bytes_received["total"] after the block (this rank)."""
    counter = {"total": 0}
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


@contextmanager
def largest_new_tensor():
    """with largest_new_tensor() as largest: ... : largest["elements"] and largest["bytes"] after the block, of the
    largest plain tensor any op made in it (DTensors, whose shapes are global, left out): what shows that a rank never
    holds (N, V) logits, or a whole head on the hidden-state plan."""
    largest = {"elements": 0, "bytes": 0}
    with _LargestNewTensor(largest):
        yield largest


class _LargestNewTensor(TorchDispatchMode):
    # A dispatch mode (private in torch.utils._python_dispatch) is the one hook that sees every op's outputs.
    def __init__(self, largest: dict):
        super().__init__()
        self.largest = largest

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if type(t) is torch.Tensor:
                self.largest["elements"] = max(self.largest["elements"], t.numel())
                self.largest["bytes"] = max(self.largest["bytes"], t.numel() * t.element_size())
        return out


def _count(nbytes: float) -> None:
    for counter in _counters:
        counter["total"] += int(nbytes)


def _all_reduce(x: Tensor, op, shards: VocabShards) -> Tensor:
    _count(2 * x.numel() * x.element_size() * (shards.ranks - 1) / shards.ranks)
    dist.all_reduce(x, op=op, group=shards.group)
    return x


def _all_gather(x: Tensor, shards: VocabShards) -> Tensor:
    """Rank-major concatenation along dimension 0 (x of the same shape on every rank)."""
    out = x.new_empty((shards.ranks * x.shape[0], *x.shape[1:]))
    _count(out.numel() * out.element_size() * (shards.ranks - 1) / shards.ranks)
    dist.all_gather_into_tensor(out, x.contiguous(), group=shards.group)
    return out


def _reduce_scatter(x: Tensor, shards: VocabShards) -> Tensor:
    out = x.new_empty((x.shape[0] // shards.ranks, *x.shape[1:]))
    _count(x.numel() * x.element_size() * (shards.ranks - 1) / shards.ranks)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=shards.group)
    return out


def _average_over_replicas(grad: Tensor, shards: VocabShards) -> Tensor:
    """A head gradient summed over the split's ranks, made the mean over every rank of the mesh (FSDP's average;
    the mesh's other dimensions hold other batches, HSDP)."""
    for d in shards.other_mesh_dims():
        other = dataclasses.replace(shards, mesh_dim=d)
        _all_reduce(grad, dist.ReduceOp.SUM, other)
    return grad / shards.mesh.size()


# --------------------------------------------------------------------------------------------------------------------
# One chunk of rows over this rank's slice: the loss rows (after the all-reduces) and the gradient.
# --------------------------------------------------------------------------------------------------------------------

def _row_max(x: Tensor) -> Tensor:
    return x.amax(1) if x.shape[1] else x.new_full(x.shape[:1], -math.inf)


def _local_target(target: Optional[Tensor], start: int, width: int, ignore_index: int):
    """(the target's column in this slice, clamped; whether it is here and counted), or (None, None)."""
    if target is None:
        return None, None
    column = target - start
    here = (target != ignore_index) & (column >= 0) & (column < width)
    return column.clamp(0, max(width - 1, 0)), here


def chunk_rows(z: Tensor, t: Tensor, target: Optional[Tensor], start: int, options: KDOptions,
               shards: VocabShards) -> tuple[Tensor, Tensor]:
    """z, t: this slice of the chunk's student and teacher logits in the compute dtype. (loss rows, statistics
    (rows, 4): lse(s/T), lse(t/T), lse(s), and the KL the gradient needs (reverse KL: the divergence; JSD:
    KL(p ‖ m)))."""
    temperature, alpha = options.temperature, options.alpha
    z, t = soft_capped(z, options.softcap), soft_capped(t, options.softcap)
    s, tt = z / temperature, t / temperature
    maxima = _all_reduce(torch.stack([_row_max(s), _row_max(tt)], 1), dist.ReduceOp.MAX, shards)
    maxima = torch.where(maxima == -math.inf, 0.0, maxima)  # a row with no class here and there: no NaN
    column, here = _local_target(target, start, z.shape[1], options.ignore_index)
    target_logit = torch.where(here, z.gather(1, column[:, None]).squeeze(1), 0.0) if target is not None and \
        z.shape[1] else torch.zeros_like(maxima[:, 0])
    sums = torch.stack([(s - maxima[:, :1]).exp().sum(1), (tt - maxima[:, 1:]).exp().sum(1),
                        (z - temperature * maxima[:, :1]).exp().sum(1), target_logit], 1)
    sums = _all_reduce(sums, dist.ReduceOp.SUM, shards)
    lse = maxima + sums[:, :2].log()
    lse_ce = temperature * maxima[:, 0] + sums[:, 2].log()
    log_p, log_q = s - lse[:, :1], tt - lse[:, 1:]
    divergence, beta = options.divergence, options.jsd_beta
    if divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        parts = torch.stack([_kl(log_q, log_m), _kl(log_p, log_m)], 1)
    else:
        parts = (_kl(log_q, log_p) if divergence == "forward_kl" else _kl(log_p, log_q))[:, None]
    parts = _all_reduce(parts, dist.ReduceOp.SUM, shards)
    value = jsd_from_parts(beta, parts[:, 0], parts[:, 1]) if divergence == "jsd" else parts[:, 0]
    rows = alpha * temperature**2 * value
    if target is not None:
        rows = torch.where(target != options.ignore_index, rows + (1 - alpha) * (lse_ce - sums[:, 3]), 0.0)
    stats = torch.stack([lse[:, 0], lse[:, 1], lse_ce, parts[:, -1]], 1)
    return rows, stats


def chunk_grad(z_raw: Tensor, t: Tensor, target: Optional[Tensor], start: int, stats: Tensor,
               options: KDOptions) -> Tensor:
    """∂(loss row)/∂z on this slice, from the rows' saved statistics; no collective."""
    temperature, alpha, cap = options.temperature, options.alpha, options.softcap
    z, t = soft_capped(z_raw, cap), soft_capped(t, cap)
    log_p = z / temperature - stats[:, :1]
    log_q = t / temperature - stats[:, 1:2]
    grad = alpha * temperature * divergence_grad_from_logs(log_p, log_q, options.divergence, options.jsd_beta,
                                                           kl=stats[:, 3:])
    if target is not None:
        column, here = _local_target(target, start, z.shape[1], options.ignore_index)
        grad = grad + (1 - alpha) * (z - stats[:, 2:3]).exp()
        if z.shape[1]:
            grad.scatter_add_(1, column[:, None], (here.to(grad.dtype) * (alpha - 1))[:, None])
        grad = torch.where((target != options.ignore_index)[:, None], grad, 0.0)
    if cap is not None:
        grad = grad * (1 - (z / cap) ** 2)  # c·tanh(x/c)'s slope, 1 − tanh²
    return grad


# --------------------------------------------------------------------------------------------------------------------
# The pass over a set of rows: what every rank holds, prepared once.
# --------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Pass:
    """The rows this rank's slice meets, and how to make each chunk's logits.

    student(x_rows, r0, r1) and teacher(r0, r1) give the chunk's slice logits in the compute dtype; target: the
    rows' targets or None; own: this rank's rows among them (a slice), the rest being other ranks' (FSDP)."""
    shards: VocabShards
    start: int
    width: int
    rows: int
    chunk: int
    teacher: Callable
    target: Optional[Tensor]
    own: slice
    options: KDOptions
    compute: torch.dtype

    def chunks(self):
        for r0 in range(0, self.rows, self.chunk):
            yield r0, min(r0 + self.chunk, self.rows)

    def forward(self, student: Callable) -> tuple[Tensor, Tensor]:
        rows, stats = [], []
        for r0, r1 in self.chunks():
            y = self.target[r0:r1] if self.target is not None else None
            chunk_loss, chunk_stats = chunk_rows(student(r0, r1), self.teacher(r0, r1), y, self.start,
                                                 self.options, self.shards)
            rows.append(chunk_loss)
            stats.append(chunk_stats)
        return torch.cat(rows), torch.cat(stats)

    def backward(self, student: Callable, stats: Tensor, row_weights: Tensor, consume: Callable) -> None:
        for r0, r1 in self.chunks():
            y = self.target[r0:r1] if self.target is not None else None
            grad = chunk_grad(student(r0, r1), self.teacher(r0, r1), y, self.start, stats[r0:r1], self.options)
            consume(r0, r1, grad * row_weights[r0:r1, None])

    def row_weights(self, grad_loss: Tensor, own_target: Optional[Tensor], reduction: str, n_own: int) -> Tensor:
        """Each pass row's incoming gradient: this rank's rows' from grad_loss, the others' all-gathered."""
        if reduction == "none":
            weights = grad_loss.to(self.compute)
        else:
            probe = grad_loss.new_empty((n_own, 1), dtype=self.compute)
            scale = reduction_scale(probe, own_target, self.options.ignore_index, reduction)
            weights = (grad_loss.to(self.compute) * scale).expand(n_own).contiguous()
        return weights if self.own == slice(0, self.rows) else _all_gather(weights, self.shards)


def _teacher_columns(logits: Tensor, start: int, stop: int, compute) -> Callable:
    return lambda r0, r1: logits[r0:r1, start:stop].to(compute)


def _teacher_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], compute) -> Callable:
    def teacher(r0, r1):
        logits = hidden[r0:r1] @ weight.T
        return (logits + bias if bias is not None else logits).to(compute)
    return teacher


def _teacher_topk(values: Tensor, indices: Tensor, vocabulary: int, start: int, width: int, compute) -> Callable:
    """-inf but at the row's k classes that fall in this slice; a row with bad indices is NaN."""
    values = torch.where(bad_topk_rows(indices, vocabulary)[:, None], math.nan, values.to(compute))
    column = indices - start
    # Classes of other slices go to one spare column, dropped after the scatter.
    column = torch.where((column >= 0) & (column < width), column, width)

    def teacher(r0, r1):
        dense = values.new_full((r1 - r0, width + 1), -math.inf)
        return dense.scatter_(1, column[r0:r1], values[r0:r1])[:, :width]
    return teacher


def _teacher_logits_own_rows(logits: Tensor, shards: VocabShards, vocabulary: int) -> Tensor:
    """Plain per-rank teacher logits (n, V) → every rank's rows over this rank's slice (R·n, piece): one
    all-to-all (each rank sends each other rank its columns)."""
    n, piece, ranks = logits.shape[0], shards.piece, shards.ranks
    send = logits.new_full((ranks, n, piece), -math.inf)
    for r in range(ranks):
        start = min(r * piece, vocabulary)
        stop = min(start + piece, vocabulary)
        send[r, :, :stop - start] = logits[:, start:stop]
    received = torch.empty_like(send)
    _count(send.numel() * send.element_size() * (ranks - 1) / ranks)
    dist.all_to_all_single(received, send, group=shards.group)
    return received.reshape(ranks * n, piece)


# --------------------------------------------------------------------------------------------------------------------
# kd_loss_linear on a sharded head.
# --------------------------------------------------------------------------------------------------------------------

class _VocabParallelLinear(torch.autograd.Function):
    """Loss in the forward; gradients of hidden (own rows), weight and bias slices in the backward."""

    @staticmethod
    def forward(ctx, spec, hidden, weight, bias):
        p: Pass = spec["pass"]
        rows_hidden = hidden if spec["shared"] else _all_gather(hidden.detach(), p.shards)
        student = _student_head(rows_hidden, weight, bias, p)
        rows, stats = p.forward(student)
        own_target = p.target[p.own] if p.target is not None else None
        loss = reduce_rows(rows[p.own], own_target, p.options.ignore_index, spec["reduction"])
        ctx.spec = spec
        ctx.save_for_backward(rows_hidden, weight, bias, stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        spec, p = ctx.spec, ctx.spec["pass"]
        rows_hidden, weight, bias, stats = ctx.saved_tensors
        own_target = p.target[p.own] if p.target is not None else None
        weights = p.row_weights(grad_loss, own_target, spec["reduction"], p.own.stop - p.own.start)
        accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32
        d_rows = rows_hidden.new_zeros(rows_hidden.shape, dtype=accumulate)
        d_weight = weight.new_zeros(weight.shape, dtype=accumulate)
        d_bias = weight.new_zeros(weight.shape[:1], dtype=accumulate) if bias is not None else None
        w = weight[:p.width]

        def consume(r0, r1, grad):
            grad = grad.to(weight.dtype)  # the logits' gradient in their dtype, as the unsharded kernels make it
            d_rows[r0:r1] = (grad @ w).to(accumulate)
            d_weight[:p.width] += (grad.T @ rows_hidden[r0:r1]).to(accumulate)
            if d_bias is not None:
                d_bias[:p.width] += grad.sum(0).to(accumulate)

        p.backward(_student_head(rows_hidden, weight, bias, p), stats, weights, consume)
        if spec["shared"]:
            d_hidden = _all_reduce(d_rows, dist.ReduceOp.SUM, p.shards)
        else:
            d_hidden = _reduce_scatter(d_rows, p.shards)
            d_weight = _average_over_replicas(d_weight, p.shards)
            d_bias = _average_over_replicas(d_bias, p.shards) if d_bias is not None else None
        return (None, d_hidden.to(rows_hidden.dtype), d_weight.to(weight.dtype),
                d_bias.to(bias.dtype) if d_bias is not None else None)


def _student_head(rows_hidden: Tensor, weight: Tensor, bias: Optional[Tensor], p: Pass) -> Callable:
    w = weight[:p.width]
    b = bias[:p.width] if bias is not None else None
    return _teacher_head(rows_hidden.detach(), w.detach(), b.detach() if b is not None else None, p.compute)


class _GatheredHead(torch.autograd.Function):
    """The whole head from its slices (all-gather); backward: each rank's slice of the gradient summed over ranks
    (reduce-scatter) and averaged as FSDP averages."""

    @staticmethod
    def forward(ctx, local, shards: VocabShards):
        ctx.shards, ctx.local_rows = shards, local.shape[0]
        return _gather_head(local, shards)

    @staticmethod
    def backward(ctx, grad):
        shards = ctx.shards
        padded = grad.new_zeros((shards.ranks * shards.piece, *grad.shape[1:]))
        padded[:grad.shape[0]] = grad
        mine = _reduce_scatter(padded.to(torch.float64 if grad.dtype == torch.float64 else torch.float32), shards)
        return _average_over_replicas(mine, shards)[:ctx.local_rows].to(grad.dtype), None


def _gather_head(local: Tensor, shards: VocabShards) -> Tensor:
    padded = local.new_zeros((shards.piece, *local.shape[1:]))
    padded[:local.shape[0]] = local.detach()
    return _all_gather(padded, shards)[:shards.width]


def gather_plan(rows: int, hidden: int, vocabulary: int, ranks: int, itemsize: int, teacher_row_bytes: float,
                teacher_head_bytes: float, divergence_parts: int = 1) -> dict:
    """Bytes each rank receives in a step (forward and backward) for FSDP rows, by plan: "hidden" (gather the
    hidden states, teacher rows, targets; reduce-scatter ∂hidden in float32; all-gather the rows' incoming
    gradients; the pass's all-reduces) or "head" (gather the head and the teacher's sharded head; reduce-scatter
    the head's gradient in float32). rows: this rank's; teacher_row_bytes: the teacher's bytes a row (hidden states,
    logit slice or top-k); teacher_head_bytes: its sharded head's slice in bytes, 0 if not sharded;
    divergence_parts: the divergence's partial sums a row (2 for JSD). Biases are left out (V numbers)."""
    others = ranks - 1
    piece = -(-vocabulary // ranks)
    compute = 8 if itemsize == 8 else 4
    stats_bytes = 2 * (ranks * rows) * (2 + 4 + divergence_parts) * compute * others / ranks  # the all-reduces
    hidden_plan = others * rows * (hidden * itemsize + teacher_row_bytes + 8 + hidden * compute + compute)
    head_plan = others * piece * hidden * (itemsize + compute) + others * teacher_head_bytes
    return {"hidden": hidden_plan + stats_bytes, "head": head_plan}


def sharded_linear(hidden, weight, bias, target, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                   teacher_topk, options: KDOptions, reduction: str, chunk_size: Optional[int], vocab_size,
                   gather: str, unsharded: Callable, auto_chunk: Callable) -> Tensor:
    """kd_loss_linear when a head or hidden states are DTensors (see the module docstring). unsharded: the plain
    kd_loss_linear, run on the gathered head; auto_chunk: auto_chunk_size."""
    if gather not in GATHERS:
        raise ValueError(f"gather must be one of {GATHERS}, got {gather!r}")
    if not is_dtensor(weight):
        other = _first_dtensor(student_hidden=hidden, teacher_weight=teacher_weight, teacher_logits=teacher_logits)
        raise ValueError(f"student_weight is a plain tensor {tuple(weight.shape)} but {other} is a DTensor: "
                         "the sharded loss needs the student's head sharded along the vocabulary")
    shards = vocab_shards(weight, "student_weight", 0)
    shared = is_dtensor(hidden)
    if shared:
        _replicated(hidden, "student_hidden", shards)
        hidden_local = hidden.to_local()
    else:
        hidden_local = hidden
    if hidden_local.dim() != 2 or hidden_local.shape[1] != weight.shape[1]:
        raise ValueError(f"student_hidden must be (N, H) with H = student_weight's {weight.shape[1]}, "
                         f"got {tuple(hidden_local.shape)}")
    if weight.dtype != hidden_local.dtype:
        raise ValueError(f"student_weight dtype {weight.dtype} does not match student_hidden's {hidden_local.dtype}")
    widths = {"student_weight": weight.shape[0]}
    bias_local = _sharded_like(bias, "student_bias", shards, 0) if bias is not None else None
    teacher_weight_local = teacher_bias_local = None
    teacher_kind = [k for k, x in (("logits", teacher_logits), ("hidden", teacher_hidden), ("topk", teacher_topk))
                    if x is not None]
    if len(teacher_kind) != 1:
        raise ValueError("give exactly one teacher: teacher_logits, teacher_hidden with teacher_weight, or "
                         f"teacher_topk; got {len(teacher_kind)}")
    if teacher_topk is not None and (not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2):
        raise ValueError("teacher_topk must be a pair (values (N, k), indices (N, k) int64)")
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight (V, Ht)")
        widths["teacher_weight"] = teacher_weight.shape[0]
        if is_dtensor(teacher_weight):
            same_split(shards, vocab_shards(teacher_weight, "teacher_weight", 0), ("student_weight", "teacher_weight"))
            teacher_weight_local = teacher_weight.to_local()
            if teacher_bias is not None:
                teacher_bias_local = _sharded_like(teacher_bias, "teacher_bias", shards, 0)
    if teacher_logits is not None:
        widths["teacher_logits"] = teacher_logits.shape[1]
    vocabulary = common_vocabulary(vocab_size, widths)
    n = hidden_local.shape[0]
    compute = result_dtype(hidden_local)
    start, stop = shards.span(vocabulary)
    ranks = shards.ranks
    layout = (f"{'shared' if shared else 'own'} rows {n}x{hidden_local.shape[1]} {hidden_local.dtype} "
              f"head {_layout(weight)} bias {_layout(bias)} teacher {teacher_kind[0]} {_layout(teacher_logits)}"
              f" {_layout(teacher_hidden)} {_layout(teacher_weight)} {_layout(teacher_bias)} "
              f"{tuple(teacher_topk[0].shape[1:]) if teacher_topk is not None else ''} target "
              f"{target is not None} V={vocabulary} {reduction} {chunk_size} {gather}")
    check_ranks_agree(shards, layout, options, hidden_local.device)
    validate_target(target, n, vocabulary, hidden_local.device, "student_hidden", True, options.ignore_index)
    target = target.long() if target is not None else None

    if not shared:
        item = hidden_local.element_size()
        teacher_row_bytes = (teacher_hidden.shape[1] * item if teacher_hidden is not None else
                             shards.piece * item if teacher_logits is not None else
                             teacher_topk[0].shape[1] * (teacher_topk[0].element_size() + 8))
        teacher_head_bytes = (shards.piece * teacher_weight.shape[1] * item if teacher_weight_local is not None
                              else 0)
        parts = 2 if options.divergence == "jsd" else 1
        costs = gather_plan(n, hidden_local.shape[1], vocabulary, ranks, item, teacher_row_bytes,
                            teacher_head_bytes, parts)
        plan = gather if gather != "auto" else min(costs, key=lambda k: (costs[k], k != "hidden"))
        if plan == "head":
            return _head_gathered(hidden_local, weight, bias, target, teacher_logits, teacher_hidden, teacher_weight,
                                  teacher_bias, teacher_topk, options, reduction, chunk_size, vocab_size, shards,
                                  unsharded)
    elif gather == "head":
        raise ValueError("gather='head' is for FSDP rows (plain student_hidden, a batch per rank); replicated "
                         "hidden states (tensor parallelism) always run vocabulary-parallel")

    gathered = (lambda x: x) if shared else (lambda x: _all_gather(x, shards))
    rows = n if shared else ranks * n
    own = slice(0, n) if shared else slice(shards.rank * n, (shards.rank + 1) * n)
    if teacher_logits is not None:
        if is_dtensor(teacher_logits):
            if not shared:
                raise ValueError("teacher_logits is a DTensor but student_hidden is not: with FSDP rows give each "
                                 "rank's teacher logits as a plain (N, V) tensor")
            same_split(shards, vocab_shards(teacher_logits, "teacher_logits", 1), ("student_weight", "teacher_logits"))
            teacher = _teacher_columns(teacher_logits.to_local().detach(), 0, stop - start, compute)
        elif shared:
            teacher = _teacher_columns(teacher_logits.detach(), start, stop, compute)
        else:
            teacher = _teacher_columns(_teacher_logits_own_rows(teacher_logits.detach(), shards, vocabulary),
                                       0, stop - start, compute)
    elif teacher_hidden is not None:
        t_hidden = teacher_hidden.to_local() if is_dtensor(teacher_hidden) else gathered(teacher_hidden.detach())
        t_weight = teacher_weight_local if teacher_weight_local is not None else teacher_weight[start:stop]
        t_bias = teacher_bias_local if teacher_bias_local is not None else \
            teacher_bias[start:stop] if teacher_bias is not None else None
        teacher = _teacher_head(t_hidden.detach(), t_weight[:stop - start].detach(),
                                t_bias[:stop - start].detach() if t_bias is not None else None, compute)
    else:
        values, indices = teacher_topk
        teacher = _teacher_topk(gathered(values.detach()), gathered(indices), vocabulary, start, stop - start,
                                compute)
    p = Pass(shards, start, stop - start, rows, chunk_size or auto_chunk(rows, max(stop - start, 1), hidden.dtype,
                                                                          hidden_local.device),
             teacher, gathered(target) if target is not None else None, own, options, compute)
    spec = {"pass": p, "shared": shared, "reduction": reduction}
    weight_local = weight.to_local()
    return _VocabParallelLinear.apply(spec, hidden_local, weight_local, bias_local)


def _head_gathered(hidden, weight, bias, target, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                   teacher_topk, options, reduction, chunk_size, vocab_size, shards, unsharded):
    full = _GatheredHead.apply(weight.to_local(), shards)
    full_bias = _GatheredHead.apply(bias.to_local(), shards) if bias is not None else None
    if is_dtensor(teacher_weight):
        teacher_weight = _gather_head(teacher_weight.to_local(), shards)
        teacher_bias = _gather_head(teacher_bias.to_local(), shards) if teacher_bias is not None else None
    return unsharded(hidden, full, target, student_bias=full_bias, teacher_logits=teacher_logits,
                     teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                     teacher_topk=teacher_topk, temperature=options.temperature, alpha=options.alpha,
                     ignore_index=options.ignore_index, reduction=reduction, chunk_size=chunk_size,
                     divergence=options.divergence, jsd_beta=options.jsd_beta, softcap=options.softcap,
                     vocab_size=vocab_size)


def _described(options: KDOptions) -> str:
    values = dict(zip(SCALARS, options.scalars.tolist()))
    if not options.softcapped:
        values.pop("softcap")
    return " ".join(f"{k}={v}" for k, v in {**values, **options.fields()}.items())


def _first_dtensor(**tensors) -> str:
    return next((name for name, x in tensors.items() if is_dtensor(x)), "another input")


def _replicated(x, name: str, shards: VocabShards) -> None:
    if x.device_mesh != shards.mesh or not all(p.is_replicate() for p in x.placements):
        raise ValueError(f"{name} is a DTensor with placements {tuple(x.placements)} over mesh "
                         f"{tuple(x.device_mesh.shape)}: give it replicated (Replicate()) on the head's mesh for "
                         "tensor parallelism (one batch on every rank), or as a plain tensor for FSDP (a batch per "
                         "rank)")


def _sharded_like(x, name: str, shards: VocabShards, dim: int) -> Tensor:
    """x's local slice, x being split like the head; a ValueError otherwise (a plain bias beside a sharded head)."""
    if not is_dtensor(x):
        raise ValueError(f"{name} is a plain tensor beside a sharded head: shard it along the vocabulary like the "
                         "head (Shard(0) on the same mesh dimension)")
    same_split(shards, vocab_shards(x, name, dim), ("the head", name))
    return x.to_local()


# --------------------------------------------------------------------------------------------------------------------
# kd_loss and kd_loss_sparse on logits sharded along the vocabulary (tensor parallelism's output, Shard(1)).
# --------------------------------------------------------------------------------------------------------------------

class _VocabParallelLogits(torch.autograd.Function):
    """Loss in the forward; the local slice's gradient in the backward, from the saved statistics."""

    @staticmethod
    def forward(ctx, spec, logits):
        p: Pass = spec["pass"]
        rows, stats = p.forward(_columns(logits, p))
        loss = reduce_rows(rows, p.target, p.options.ignore_index, spec["reduction"])
        ctx.spec = spec
        ctx.save_for_backward(logits, stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        spec, p = ctx.spec, ctx.spec["pass"]
        logits, stats = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        weights = p.row_weights(grad_loss, p.target, spec["reduction"], p.rows)

        def consume(r0, r1, chunk_grad_rows):
            grad[r0:r1, :p.width] = chunk_grad_rows.to(grad.dtype)

        p.backward(_columns(logits, p), stats, weights, consume)
        return None, grad


def _columns(logits: Tensor, p: Pass) -> Callable:
    return lambda r0, r1: logits[r0:r1, :p.width].detach().to(p.compute)


def sharded_logits(student_logits, teacher_logits, teacher_topk, target, options: KDOptions, reduction: str,
                   chunk_size: Optional[int], vocab_size, name: str, auto_chunk: Callable) -> Tensor:
    """kd_loss (teacher_logits) or kd_loss_sparse (teacher_topk = (values, indices)) on student logits sharded
    along the vocabulary, Shard(1): one batch on every rank, as tensor parallelism leaves them."""
    if not is_dtensor(student_logits):
        raise ValueError(f"{name}: teacher_logits is a DTensor but student_logits is a plain tensor; shard both "
                         "along the vocabulary (Shard(1)), or neither")
    shards = vocab_shards(student_logits, "student_logits", 1)
    local = student_logits.to_local()
    widths = {"student_logits": student_logits.shape[1]}
    if teacher_logits is not None:
        if teacher_logits.shape[0] != student_logits.shape[0]:
            raise ValueError(f"teacher_logits must have student_logits' {student_logits.shape[0]} rows, "
                             f"got {tuple(teacher_logits.shape)}")
        widths["teacher_logits"] = teacher_logits.shape[1]
    vocabulary = common_vocabulary(vocab_size, widths)
    n, compute = local.shape[0], result_dtype(local)
    start, stop = shards.span(vocabulary)
    layout = (f"{name} logits {_layout(student_logits)} {local.dtype} teacher {_layout(teacher_logits)} "
              f"{tuple(teacher_topk[0].shape) if teacher_topk is not None else ''} target {target is not None} "
              f"V={vocabulary} {reduction} {chunk_size}")
    check_ranks_agree(shards, layout, options, local.device)
    validate_target(target, n, vocabulary, local.device, "student_logits", True, options.ignore_index)
    target = target.long() if target is not None else None
    if teacher_topk is not None:
        values, indices = teacher_topk
        teacher = _teacher_topk(values.detach(), indices, vocabulary, start, stop - start, compute)
    elif is_dtensor(teacher_logits):
        same_split(shards, vocab_shards(teacher_logits, "teacher_logits", 1), ("student_logits", "teacher_logits"))
        teacher = _teacher_columns(teacher_logits.to_local().detach(), 0, stop - start, compute)
    else:
        teacher = _teacher_columns(teacher_logits.detach(), start, stop, compute)
    chunk = chunk_size or auto_chunk(n, max(stop - start, 1), local.dtype, local.device)
    p = Pass(shards, start, stop - start, n, chunk, teacher, target, slice(0, n), options, compute)
    return _VocabParallelLogits.apply({"pass": p, "reduction": reduction}, local)
