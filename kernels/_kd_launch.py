"""Launching the Triton kernels of _kd_loss_triton: block sizes, flags and arguments. The one module besides the
kernels that imports Triton; the ops import it on their first Triton launch, so nothing else needs Triton."""
from typing import Optional

import torch
import triton

from . import _kd_loss_triton as _tk
from ._kd_common import DIVERGENCES, KDOptions, kernel_scalars


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


def _divergence_args(divergence: str, jsd_beta: float, softcap: float) -> dict:
    # β and the cap are runtime arguments (no recompile per value); the divergence and whether to cap select code.
    return dict(beta=float(jsd_beta), softcap=float(softcap) if softcap else 1.0,
                DIVERGENCE=DIVERGENCES.index(divergence), SOFTCAP=bool(softcap))


def launch_kd_kernel(s, t, target, temperature, alpha, ignore_index, rows, grad=None, stats=None, scale=None, *,
                     divergence="forward_kl", jsd_beta=0.5, softcap=0.0):
    """Fill `rows` (N,) with the per-row losses; if given, `stats` (N, stats_per_row(divergence)) with the
    backward's statistics and `grad` (N, C) contiguous with ∂ℓ/∂s times `scale` (a 0-d float32 device tensor; 1 if
    None). softcap 0 (or None): off."""
    n, c = s.shape
    target = _contiguous_target(target)
    write_grad, store_stats = grad is not None, stats is not None
    if write_grad and scale is None:
        scale = torch.ones((), dtype=torch.float32, device=s.device)
    unused = rows  # a pointer the kernel never touches when its feature is off
    inv_t, kl_loss_scale, kl_grad_scale, ce_weight = kernel_scalars(KDOptions(temperature, alpha, ignore_index))
    args = (s, t, target if target is not None else unused, rows, stats if store_stats else unused,
            grad if write_grad else unused, scale if write_grad else unused,
            c, s.stride(0), s.stride(1), t.stride(0), t.stride(1),
            inv_t, kl_loss_scale, kl_grad_scale, ce_weight, ignore_index)
    flags = dict(HAS_TARGET=target is not None, STORE_STATS=store_stats, WRITE_GRAD=write_grad,
                 **_divergence_args(divergence, jsd_beta, softcap))
    single = _row_launch(c, flags)
    if single is not None:
        _tk.kd_loss_fwd_kernel[(n,)](*args, **flags, **single)
    elif _tk.INTERPRETED:
        # Multi-config autotuning needs a live GPU driver; the interpreter takes one fixed block.
        _tk.kd_loss_fwd_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False, BLOCK=_tk.STREAM_BLOCK, num_warps=8)
    else:
        _tk.kd_loss_fwd_stream_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False)


def launch_kd_backward(s, t, target, stats, grad_rows, temperature, alpha, ignore_index, grad, *,
                       divergence="forward_kl", jsd_beta=0.5, softcap=0.0):
    """Fill `grad` (N, C) contiguous with grad_rows[i] · ∂ℓᵢ/∂sᵢ from the forward's `stats`."""
    n, c = s.shape
    target = _contiguous_target(target)
    inv_t, _, kl_grad_scale, ce_weight = kernel_scalars(KDOptions(temperature, alpha, ignore_index))
    args = (s, t, target if target is not None else stats, stats, grad_rows, grad,
            c, s.stride(0), s.stride(1), t.stride(0), t.stride(1),
            inv_t, kl_grad_scale, ce_weight, ignore_index)
    flags = dict(HAS_TARGET=target is not None, **_divergence_args(divergence, jsd_beta, softcap))
    single = _row_launch(c, flags)
    if single is not None:
        _tk.kd_loss_bwd_kernel[(n,)](*args, **flags, **single)
    elif _tk.INTERPRETED:
        _tk.kd_loss_bwd_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False, BLOCK=_tk.STREAM_BLOCK, num_warps=8)
    else:
        _tk.kd_loss_bwd_stream_kernel[(n,)](*args, **flags, SINGLE_BLOCK=False)
