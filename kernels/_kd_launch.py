"""Launching the Triton kernels of _kd_loss_triton: block sizes, flags and arguments. The one module besides the
kernels that imports Triton; the ops import it on their first Triton launch, so nothing else needs Triton."""
from typing import Optional

import torch
import triton

from . import _kd_loss_triton as _tk
from ._kd_common import DIVERGENCES, KDOptions


def _row_launch(c: int, flags: dict) -> Optional[dict]:
    """Block and warps of a row that fits in one block (read once), or None for the streaming path. JSD and the soft
    cap hold more per element: their rows stream above MAX_SINGLE_BLOCK_HEAVY (at 8192 they spill registers)."""
    width = triton.next_power_of_2(c)
    heavy = flags["DIVERGENCE"] == DIVERGENCES.index("jsd") or flags["SOFTCAP"]
    if width > (min(_tk.MAX_SINGLE_BLOCK, _tk.MAX_SINGLE_BLOCK_HEAVY) if heavy else _tk.MAX_SINGLE_BLOCK):
        return None
    return dict(SINGLE_BLOCK=True, BLOCK=width, num_warps=4 if width <= 1024 else 8 if width <= 4096 else 16)


def _contiguous_target(target):
    # The kernels read target[row] at row × 1: a strided view (a column of a larger tensor) would be misread.
    return target.contiguous() if target is not None else None


def _flags(options: KDOptions) -> dict:
    # The divergence and whether to cap select code; their values (β, the cap) are read by the kernel from the
    # scalars, at run time, as are the temperature and α: no recompile per value, no host read of any.
    return dict(DIVERGENCE=DIVERGENCES.index(options.divergence), SOFTCAP=options.softcapped)


def _scalars(options: KDOptions, device):
    """KDOptions.scalars as the kernels read them: contiguous float64 on the logits' device."""
    return options.scalars.to(device=device, dtype=torch.float64).contiguous()


def launch_kd_kernel(s, t, target, options: KDOptions, rows, grad=None, stats=None, scale=None):
    """Fill `rows` (N,) with the per-row losses; if given, `stats` (N, stats_per_row(divergence)) with the
    backward's statistics and `grad` (N, C) contiguous with ∂ℓ/∂s times `scale` (a 0-d float32 device tensor; 1 if
    None)."""
    n, c = s.shape
    target = _contiguous_target(target)
    write_grad, store_stats = grad is not None, stats is not None
    if write_grad and scale is None:
        scale = torch.ones((), dtype=torch.float32, device=s.device)
    unused = rows  # a pointer the kernel never touches when its feature is off
    args = (s, t, target if target is not None else unused, rows, stats if store_stats else unused,
            grad if write_grad else unused, scale if write_grad else unused, _scalars(options, s.device),
            c, s.stride(0), s.stride(1), t.stride(0), t.stride(1), options.ignore_index)
    flags = dict(HAS_TARGET=target is not None, STORE_STATS=store_stats, WRITE_GRAD=write_grad, **_flags(options))
    single = _row_launch(c, flags)
    if single is not None:
        _tk.kd_loss_fwd_kernel[(n,)](*args, **flags, **single)
    elif _tk.INTERPRETED:
        # Multi-config autotuning needs a live GPU driver; the interpreter takes one fixed block.
        _tk.kd_loss_fwd_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False, BLOCK=_tk.STREAM_BLOCK, num_warps=8)
    else:
        _tk.kd_loss_fwd_stream_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False)


def launch_kd_backward(s, t, target, stats, grad_rows, options: KDOptions, grad):
    """Fill `grad` (N, C) contiguous with grad_rows[i] · ∂ℓᵢ/∂sᵢ from the forward's `stats`."""
    n, c = s.shape
    target = _contiguous_target(target)
    args = (s, t, target if target is not None else stats, stats, grad_rows, grad, _scalars(options, s.device),
            c, s.stride(0), s.stride(1), t.stride(0), t.stride(1), options.ignore_index)
    flags = dict(HAS_TARGET=target is not None, **_flags(options))
    single = _row_launch(c, flags)
    if single is not None:
        _tk.kd_loss_bwd_kernel[(n,)](*args, **flags, **single)
    elif _tk.INTERPRETED:
        _tk.kd_loss_bwd_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False, BLOCK=_tk.STREAM_BLOCK, num_warps=8)
    else:
        _tk.kd_loss_bwd_stream_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False)
