"""Triton kernels for the fused KD loss.

One program handles one row. It reads the student and teacher logits of that row, computes the three log-sum-exps
it needs (student at T, teacher at T, student at 1 for the cross-entropy) and the KL numerator, writes the row's loss,
then writes the row's gradient with respect to the student logits.

* C <= one block: the row is loaded once and kept in registers; it is read exactly once.
* C > one block: pass 1 streams the row with online (running-max) rescaling; pass 2 re-reads it to write the
  gradient. Bytes moved per row: 2·C·(size s + size t) read + C·size ∂s written, against the useful
  C·(size s + size t + size ∂s). The re-read usually hits L2, since one row of a program is at most a few hundred KB.

Masked classes (-inf) are handled explicitly: a running max of -inf is replaced by 0 before subtracting, so
exp(-inf - (-inf)) never produces NaN, and p·log p is taken as 0 where p is 0. NaN inputs are not masked and
propagate into the loss.
"""
import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Rows whose padded width fits in this many columns take the single-block, read-once path.
MAX_SINGLE_BLOCK = 8192
# Column block of the streaming path under the interpreter (tests lower both limits to exercise it on small C).
STREAM_BLOCK = 4096


@triton.jit
def _safe_max(m):
    # A max of -inf (a fully masked prefix) would give exp(-inf - (-inf)) = NaN; shift by 0 instead.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _store_grad_block(g_row, cols, mask, s, t, lse_s_t, lse_t_t, lse_1, y,
                      inv_t, kl_grad_scale, ce_weight, keep, HAS_TARGET: tl.constexpr):
    p_s = tl.exp(s * inv_t - lse_s_t)
    p_t = tl.exp(t * inv_t - lse_t_t)
    g = kl_grad_scale * (p_s - p_t)
    if HAS_TARGET:
        p_1 = tl.exp(s - lse_1)
        g += ce_weight * (p_1 - tl.where(cols == y, 1.0, 0.0))
    g = tl.where(keep, g, 0.0)
    tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def kd_loss_fwd_bwd_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, g_ptr,
    C, s_stride_r, s_stride_c, t_stride_r, t_stride_c,
    inv_t, kl_loss_scale, kl_grad_scale, ce_weight, ignore_index,
    HAS_TARGET: tl.constexpr, WRITE_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_r
    t_row = t_ptr + row * t_stride_r
    g_row = g_ptr + row * C
    NEG_INF: tl.constexpr = float("-inf")

    if HAS_TARGET:
        y = tl.load(y_ptr + row).to(tl.int64)
        keep = y != ignore_index
        in_range = (y >= 0) & (y < C)
        # An out-of-range target cannot be checked on the host without a sync; it poisons the row with NaN instead.
        poison = keep & (~in_range)
        s_y = tl.load(s_row + y * s_stride_c, mask=keep & in_range, other=0.0).to(tl.float32)
    else:
        y = -1
        keep = tl.full((), 1, tl.int1)
        poison = tl.full((), 0, tl.int1)
        s_y = 0.0

    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = cols < C
        s = tl.load(s_row + cols * s_stride_c, mask=mask, other=NEG_INF).to(tl.float32)
        t = tl.load(t_row + cols * t_stride_c, mask=mask, other=NEG_INF).to(tl.float32)
        st = s * inv_t
        tt = t * inv_t
        m_s = _safe_max(tl.max(st, 0))
        m_t = _safe_max(tl.max(tt, 0))
        d_s = tl.sum(tl.exp(st - m_s), 0)
        e_t = tl.exp(tt - m_t)
        d_t = tl.sum(e_t, 0)
        # Σ e_t·(t - s)/T, with 0 where the teacher probability is 0 (masked class).
        a = tl.sum(tl.where(e_t > 0, e_t * ((t - s) * inv_t), 0.0), 0)
        if HAS_TARGET:
            m_1 = _safe_max(tl.max(s, 0))
            d_1 = tl.sum(tl.exp(s - m_1), 0)
    else:
        m_s = tl.full((), NEG_INF, tl.float32)
        m_t = tl.full((), NEG_INF, tl.float32)
        m_1 = tl.full((), NEG_INF, tl.float32)
        d_s = tl.zeros((), tl.float32)
        d_t = tl.zeros((), tl.float32)
        d_1 = tl.zeros((), tl.float32)
        a = tl.zeros((), tl.float32)
        for start in range(0, C, BLOCK):
            c = start + cols
            mask = c < C
            s = tl.load(s_row + c * s_stride_c, mask=mask, other=NEG_INF).to(tl.float32)
            t = tl.load(t_row + c * t_stride_c, mask=mask, other=NEG_INF).to(tl.float32)
            st = s * inv_t
            tt = t * inv_t
            new_s = _safe_max(tl.maximum(m_s, tl.max(st, 0)))
            d_s = d_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(st - new_s), 0)
            m_s = new_s
            new_t = _safe_max(tl.maximum(m_t, tl.max(tt, 0)))
            rescale_t = tl.exp(m_t - new_t)
            e_t = tl.exp(tt - new_t)
            d_t = d_t * rescale_t + tl.sum(e_t, 0)
            a = a * rescale_t + tl.sum(tl.where(e_t > 0, e_t * ((t - s) * inv_t), 0.0), 0)
            m_t = new_t
            if HAS_TARGET:
                new_1 = _safe_max(tl.maximum(m_1, tl.max(s, 0)))
                d_1 = d_1 * tl.exp(m_1 - new_1) + tl.sum(tl.exp(s - new_1), 0)
                m_1 = new_1

    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)
    # KL(p_t || p_s) = Σ p_t·(t - s)/T - (lse_t - lse_s), written with shifted maxima to limit cancellation.
    kl = a / d_t - (m_t - m_s) - log_d_t + log_d_s
    loss = kl_loss_scale * kl
    lse_1 = 0.0
    if HAS_TARGET:
        lse_1 = m_1 + tl.log(d_1)
        loss += ce_weight * (lse_1 - s_y)
    loss = tl.where(poison, float("nan"), loss)
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))

    if WRITE_GRAD:
        lse_s_t = m_s + log_d_s
        lse_t_t = m_t + log_d_t
        lse_1 = tl.where(poison, float("nan"), lse_1)
        if SINGLE_BLOCK:
            _store_grad_block(g_row, cols, cols < C, s, t, lse_s_t, lse_t_t, lse_1, y,
                              inv_t, kl_grad_scale, ce_weight, keep, HAS_TARGET)
        else:
            for start in range(0, C, BLOCK):
                c = start + cols
                mask = c < C
                s = tl.load(s_row + c * s_stride_c, mask=mask, other=NEG_INF).to(tl.float32)
                t = tl.load(t_row + c * t_stride_c, mask=mask, other=NEG_INF).to(tl.float32)
                _store_grad_block(g_row, c, mask, s, t, lse_s_t, lse_t_t, lse_1, y,
                                  inv_t, kl_grad_scale, ce_weight, keep, HAS_TARGET)


# The streaming path on a GPU picks its block and warps by autotuning per C. Only ever launched with a live
# driver: the interpreter cannot autotune, and takes kd_loss_fwd_bwd_kernel with BLOCK=STREAM_BLOCK instead.
# No BLOCK=8192 at 8 warps (32 columns per thread): ptxas spills its forward-only variant with a target (4 bytes
# at 128 registers, sm_80 and sm_90), and its gradient variant takes 220 registers, one 8-warp block per SM, half
# the resident warps of every config here. tests/test_kernel_compiles_for_gpu.py fails on any spill.
kd_loss_stream_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK": b}, num_warps=w)
             for b, w in ((2048, 8), (2048, 16), (4096, 8), (4096, 16), (8192, 16))],
    key=["C", "HAS_TARGET", "WRITE_GRAD"],
)(kd_loss_fwd_bwd_kernel)


@triton.jit
def scale_rows_kernel(g_ptr, scale_ptr, out_ptr, C, BLOCK: tl.constexpr):
    """out[i, :] = g[i, :] · scale[i], multiplied in float32: the backward of the fused loss."""
    row = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    scale = tl.load(scale_ptr + row)
    g = tl.load(g_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * C + cols, (g * scale).to(out_ptr.dtype.element_ty), mask=mask)
