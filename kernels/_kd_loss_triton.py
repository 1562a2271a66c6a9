"""Triton kernels for the fused KD loss: one program per row.

The forward reads the row's student and teacher logits, computes the three log-sum-exps it needs (student at T,
teacher at T, student at 1 for the cross-entropy) and the KL numerator, and writes the row's loss. Then, by mode:
* STORE_STATS: it also writes the three log-sum-exps (12 bytes a row) for the backward kernel, which re-reads the
  row once and writes ∂ℓ/∂s times the incoming per-row gradient. Forward + backward move 5·C elements a row at any C
  (read s, t; read s, t, write ∂s) and nothing of size (N, C) lives between them: the generic autograd path.
* WRITE_GRAD: it also writes ∂ℓ/∂s times a scale read from the device (the reduction's 1/N): the training engine's
  path, whose backward returns that gradient as it is. C ≤ one block: 3·C elements, the floor (read s, t, write ∂s);
  wider rows are streamed twice (statistics, then the gradient): 5·C.

The KL is formed as Σ p_t·(t − s)/T − (m_t − m_s) − log(d_t / d_s) with m the running maxima and d the rescaled sums:
the ratio d_t / d_s keeps the log-sum-exps' cancellation (two values near log C for a KL near 1) out of the result.
Masked classes (-inf) are handled explicitly: a running max of -inf is replaced by 0 before subtracting, so
exp(-inf - (-inf)) never produces NaN, and p·log p is taken as 0 where p is 0. NaN inputs propagate into the loss.
Gradients are stored rounded to nearest even in bfloat16 and float16, on the GPU and under the interpreter alike.

The float options (temperature, α, β = jsd_beta, the soft cap c) are read at run time from one float64 tensor on the
device (KDOptions.scalars): a new value never recompiles, is never read on the host, and a CUDA graph replays with
whatever the tensor holds. Each program reads T (8 bytes) at its start, T and α (16 bytes) where the loss or
gradient weights are needed (again for every block of a streamed gradient), β (8) for JSD and c (8) with SOFTCAP.

Divergences (DIVERGENCE, a constexpr; SOFTCAP likewise, chosen by whether a cap is given, not by its value),
with p = softmax(s/T), q = softmax(t/T) and δ = (t − s)/T:
* FORWARD_KL: KL(q ‖ p), as above; ∂/∂(s/T) = p − q.
* REVERSE_KL: KL(p ‖ q), the same shifted form with the roles swapped (E_p[−δ] + log E_p[e^δ]), in the same single
  pass; ∂/∂(s/T) = p·(−δ − E_p[−δ]). Its backward keeps E_p[−δ] as a fourth statistic.
* JSD: β·KL(q ‖ m) + (1 − β)·KL(p ‖ m) with m = β·q + (1 − β)·p, from the log-ratio r = log q − log p = δ − gap
  per element, gap = lse(t/T) − lse(s/T) taken from the forward-KL sums (E_q[δ] − KL(q‖p)), which holds it to the
  rounding of O(1) values rather than of two log-sum-exps near log C. Its terms need the normalisers first: a
  streamed row reads s and t once more between the statistics and the gradient (one block holds them anyway).
  ∂/∂(s/T) = (1 − β)·p·(log(p/m) − KL(p ‖ m)). β = 0 is forward KL and β = 1 reverse KL, exactly (the formula
  degenerates there): chosen on the value inside the kernel, and the extra pass is skipped at those ends.
* SOFTCAP: logits z are replaced by c·tanh(z/c) (c = softcap) on load, before the temperature, in the loss, the
  cross-entropy and the gradient, which is multiplied by 1 − tanh²(z/c). A −inf logit becomes −c (the formula).
"""
import triton
import triton.language as tl

from ._kd_common import DIVERGENCES, INTERPRETED, STATS_PER_ROW, stats_per_row  # noqa: F401 (read here too)

# Rows whose padded width fits in this many columns take the single-block, read-once path.
MAX_SINGLE_BLOCK = 8192
# The same for JSD and soft-capped rows, which hold more values an element (checked on sm_90: at 8192 columns and 16
# warps their forward spills 56 to 440 bytes of registers; at 4096 and 8 warps none).
MAX_SINGLE_BLOCK_HEAVY = 4096
# Column block of the streaming path under the interpreter (tests lower both limits to exercise it on small C).
STREAM_BLOCK = 4096


@triton.jit
def _safe_max(m):
    # A max of -inf (a fully masked prefix) would give exp(-inf - (-inf)) = NaN; shift by 0 instead.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rounded(g, out_ptr):
    """g (float32) in out_ptr's element type, rounded to nearest even. bfloat16 by integer rounding of the bits:
    the interpreter's float32 → bfloat16 cast truncates, and the compiled cast rounds the same way as this."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = g.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(g != g, g.to(tl.bfloat16), rounded)  # NaN stays NaN
    else:
        return g.to(out_ptr.dtype.element_ty)


@triton.jit
def _tanh(x):
    """(tanh x, 1 − tanh² x) in float32 from one exponential; a series near 0, where 1 − e^(−2|x|) would cancel."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    near = a < 0.125  # the series' next term is below 2e-10 of the value there
    th = tl.where(near, a * (1.0 - a2 * (1.0 / 3 - a2 * (2.0 / 15 - a2 * (17.0 / 315)))), (1.0 - e) / (1.0 + e))
    slope = tl.where(near, 1.0 - th * th, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return tl.where(x < 0, -th, th), slope


@triton.jit
def _load_scale_options(scalars_ptr, SOFTCAP: tl.constexpr):
    """(1/T, c) in float32 from KDOptions.scalars (float64: T, α, β, c), rounded once, as a float argument computed
    on the host would be; c = 1.0 (unused) without SOFTCAP. Needed from the row's first element on."""
    inv_t = (1.0 / tl.load(scalars_ptr)).to(tl.float32)
    if SOFTCAP:
        softcap = tl.load(scalars_ptr + 3).to(tl.float32)
    else:
        softcap = tl.full((), 1.0, tl.float32)
    return inv_t, softcap


@triton.jit
def _load_weights(scalars_ptr):
    """(α·T², α·T, 1 − α) in float32, the products taken in float64 and rounded once. Loaded where needed, not at
    the start: volatile, so that the compiler neither merges them with the first load of T nor hoists them, which
    would hold three more registers through the row's loops (a streamed gradient loop reloads them each block, 16
    bytes a block: without that, some streamed variants spill)."""
    temperature = tl.load(scalars_ptr, volatile=True)
    alpha = tl.load(scalars_ptr + 1, volatile=True)
    kl_loss_scale = (alpha * temperature * temperature).to(tl.float32)
    kl_grad_scale = (alpha * temperature).to(tl.float32)
    ce_weight = (1.0 - alpha).to(tl.float32)
    return kl_loss_scale, kl_grad_scale, ce_weight


@triton.jit
def _load_beta(scalars_ptr, DIVERGENCE: tl.constexpr):
    """JSD's β in float32 (0.0, not loaded, for the other divergences)."""
    if DIVERGENCE == 2:
        beta = tl.load(scalars_ptr + 2).to(tl.float32)
    else:
        beta = tl.full((), 0.0, tl.float32)
    return beta


@triton.jit
def _load_logits(row, cols, stride, mask, softcap, SOFTCAP: tl.constexpr):
    """A block of logits in float32, −inf past C; soft-capped with SOFTCAP. And the cap's slope (1.0 without)."""
    x = tl.load(row + cols * stride, mask=mask, other=float("-inf")).to(tl.float32)
    if SOFTCAP:
        th, slope = _tanh(x / softcap)
        x = tl.where(mask, softcap * th, float("-inf"))
    else:
        slope = 1.0
    return x, slope


@triton.jit
def _load_target(y_ptr, s_row, row, C, s_stride_c, ignore_index, softcap, HAS_TARGET: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    """(y, keep, poison, s[y]) of a row; without a target every row is kept."""
    if HAS_TARGET:
        y = tl.load(y_ptr + row).to(tl.int64)
        keep = y != ignore_index
        in_range = (y >= 0) & (y < C)
        # An out-of-range target cannot be checked on the host without a sync; it poisons the row with NaN instead.
        poison = keep & (~in_range)
        s_y = tl.load(s_row + y * s_stride_c, mask=keep & in_range, other=0.0).to(tl.float32)
        if SOFTCAP:
            th, _ = _tanh(s_y / softcap)
            s_y = softcap * th
    else:
        y = -1
        keep = tl.full((), 1, tl.int1)
        poison = tl.full((), 0, tl.int1)
        s_y = 0.0
    return y, keep, poison, s_y


@triton.jit
def _reverse_grad(s, t, p_s, inv_t, mean_r):
    # p·(log p − log q − KL(p‖q)) = p·((s − t)/T − E_p[(s − t)/T]); 0 where p is 0 (a masked class).
    return tl.where(p_s > 0, p_s * ((s - t) * inv_t - mean_r), 0.0)


@triton.jit
def _jsd_logs(s, t, inv_t, gap, beta):
    """(log(p/m), log(q/m)) per element from r = log q − log p = δ − gap: the exponential is only ever taken of
    −|r| (no overflow where one of p, q is 0), and log1p keeps the small ratios near r = 0."""
    r = (t - s) * inv_t - gap
    neg = r < 0
    e = tl.exp(tl.where(neg, r, -r))
    # r < 0: m/p = 1 + β(e^r − 1); r ≥ 0: m/q = 1 + (1 − β)(e^(−r) − 1).
    log_ratio = -_log1p(tl.where(neg, beta, 1.0 - beta) * (e - 1.0))
    return tl.where(neg, log_ratio, log_ratio - r), tl.where(neg, log_ratio + r, log_ratio)


@triton.jit
def _jsd_block_sums(s, t, inv_t, m_s, m_t, d_s, d_t, gap, beta):
    """One block's Σ p·log(p/m) and Σ q·log(q/m) (0·log 0 = 0)."""
    p = tl.exp(s * inv_t - m_s) / d_s
    q = tl.exp(t * inv_t - m_t) / d_t
    log_pm, log_qm = _jsd_logs(s, t, inv_t, gap, beta)
    return tl.sum(tl.where(p > 0, p * log_pm, 0.0), 0), tl.sum(tl.where(q > 0, q * log_qm, 0.0), 0)


@triton.jit
def _divergence_grad(s, t, p_s, inv_t, lse_t_t, extra, gap, beta, DIVERGENCE: tl.constexpr):
    """∂D/∂(s/T) for one block. extra: E_p[(s − t)/T] for reverse KL (and JSD at β = 1), else KL(p ‖ m)."""
    if DIVERGENCE == 0:
        d = p_s - tl.exp(t * inv_t - lse_t_t)
    elif DIVERGENCE == 1:
        d = _reverse_grad(s, t, p_s, inv_t, extra)
    else:
        log_pm, _ = _jsd_logs(s, t, inv_t, gap, beta)
        jsd = (1.0 - beta) * tl.where(p_s > 0, p_s * (log_pm - extra), 0.0)
        forward = p_s - tl.exp(t * inv_t - lse_t_t)
        d = tl.where(beta == 0.0, forward, tl.where(beta == 1.0, _reverse_grad(s, t, p_s, inv_t, extra), jsd))
    return d


@triton.jit
def _store_grad_block(g_row, cols, mask, s, t, slope, lse_s_t, lse_t_t, lse_1, extra, gap, y, scale, inv_t,
                      kl_grad_scale, ce_weight, beta, keep, HAS_TARGET: tl.constexpr, DIVERGENCE: tl.constexpr):
    """scale · slope · (α·T·∂D/∂(s/T) + (1−α)·(softmax(s) − onehot(y))) for one block of a row."""
    p_s = tl.exp(s * inv_t - lse_s_t)
    g = kl_grad_scale * _divergence_grad(s, t, p_s, inv_t, lse_t_t, extra, gap, beta, DIVERGENCE)
    if HAS_TARGET:
        p_1 = tl.exp(s - lse_1)
        g += ce_weight * (p_1 - tl.where(cols == y, 1.0, 0.0))
    g = tl.where(keep, g * slope * scale, 0.0)
    tl.store(g_row + cols, _rounded(g, g_row), mask=mask)


@triton.jit
def _stream_grad_row(scalars_ptr, s_row, t_row, g_row, C, s_stride_c, t_stride_c, lse_s_t, lse_t_t, lse_1, extra,
                     gap, y, scale, inv_t, beta, softcap, keep, HAS_TARGET: tl.constexpr,
                     BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr, SOFTCAP: tl.constexpr):
    """A wide row's gradient, block by block: one read of s and t, one write of ∂s."""
    cols = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        c = start + cols
        mask = c < C
        s, slope = _load_logits(s_row, c, s_stride_c, mask, softcap, SOFTCAP)
        t, _ = _load_logits(t_row, c, t_stride_c, mask, softcap, SOFTCAP)
        _, kl_grad_scale, ce_weight = _load_weights(scalars_ptr)
        _store_grad_block(g_row, c, mask, s, t, slope, lse_s_t, lse_t_t, lse_1, extra, gap, y, scale, inv_t,
                          kl_grad_scale, ce_weight, beta, keep, HAS_TARGET, DIVERGENCE)


@triton.jit
def _weighted_excess(s, t, inv_t, m_t, shift, e_t, x):
    """e_t·(e^(−x) − 1 + x) with x = δ − shift: a series where |x| is small (the direct form cancels there), else
    written with e_t·e^(−x) = e^(s/T − m_t + shift), which keeps the student's mass on classes whose teacher
    probability underflows or is 0 (a masked class: e_t·x counts as 0 there)."""
    series = x * x * (0.5 - x * (1.0 / 6 - x * (1.0 / 24 - x * (1.0 / 120 - x * (1.0 / 720 - x / 5040)))))
    direct = tl.exp(s * inv_t - m_t + shift) - e_t + tl.where(e_t > 0, e_t * x, 0.0)
    return tl.where(tl.abs(x) < 0.5, e_t * series, direct)


@triton.jit
def _block_sums(s, t, inv_t, m_s, m_t, shift):
    """One block's Σ e^(s/T − m_s), Σ e_t with e_t = e^(t/T − m_t), and with x = δ − shift: Σ e_t·x (0 where the
    teacher's probability is 0) and Σ e_t·(e^(−x) − 1 + x)."""
    e_t = tl.exp(t * inv_t - m_t)
    x = (t - s) * inv_t - shift
    d_s = tl.sum(tl.exp(s * inv_t - m_s), 0)
    q = tl.sum(tl.where(e_t > 0, e_t * x, 0.0), 0)
    p = tl.sum(_weighted_excess(s, t, inv_t, m_t, shift, e_t, x), 0)
    return d_s, tl.sum(e_t, 0), q, p


@triton.jit
def _log1p(u):
    # log(1 + u) accurate for small u (Goldberg): the rounding of 1 + u cancels in the ratio.
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _kl(q, p, d_s, d_t, m_s, m_t, shift):
    """KL(p_t ‖ p_s) from the row sums. With δ = (t − s)/T, KL = E[δ] + log E[e^(−δ)] under p_t, which for any c is
    (E[δ] − c) + log(1 + E[excess(δ − c)] − (E[δ] − c)): with c near E[δ] both terms are small and nothing cancels
    (the plain form subtracts two log-sum-exps near log C to get a KL near 1). Where that form overflows (a student
    logit far above the teacher's), or is not finite, the plain form."""
    mean_offset = q / d_t
    shifted = mean_offset + _log1p(p / d_t - mean_offset)
    plain = mean_offset + shift - (m_t - m_s) - tl.log(d_t / d_s)
    return tl.where((shifted == shifted) & (tl.abs(shifted) != float("inf")), shifted, plain)


@triton.jit
def kd_loss_fwd_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, stats_ptr, g_ptr, scale_ptr, scalars_ptr,
    C, s_stride_r, s_stride_c, t_stride_r, t_stride_c, ignore_index,
    HAS_TARGET: tl.constexpr, STORE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr = 0, SOFTCAP: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    inv_t, softcap = _load_scale_options(scalars_ptr, SOFTCAP)
    s_row = s_ptr + row * s_stride_r
    t_row = t_ptr + row * t_stride_r
    y, keep, poison, s_y = _load_target(y_ptr, s_row, row, C, s_stride_c, ignore_index, softcap, HAS_TARGET,
                                        SOFTCAP)

    # The first block (the whole row when SINGLE_BLOCK) also fixes each KL's shift: the teacher-weighted mean of
    # δ = (t − s)/T over it for the forward KL, the student-weighted mean of −δ for the reverse one (see _kl).
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    s, slope = _load_logits(s_row, cols, s_stride_c, mask, softcap, SOFTCAP)
    t, _ = _load_logits(t_row, cols, t_stride_c, mask, softcap, SOFTCAP)
    m_s = _safe_max(tl.max(s * inv_t, 0))
    m_t = _safe_max(tl.max(t * inv_t, 0))
    if DIVERGENCE != 1:  # forward KL; JSD takes its gap from these sums
        e_t = tl.exp(t * inv_t - m_t)
        d_t = tl.sum(e_t, 0)
        shift = tl.where(d_t > 0, tl.sum(tl.where(e_t > 0, e_t * ((t - s) * inv_t), 0.0), 0) / d_t, 0.0)
        d_s, d_t, q, p = _block_sums(s, t, inv_t, m_s, m_t, shift)
    if DIVERGENCE != 0:  # reverse KL: the same sums with the roles swapped
        e_s = tl.exp(s * inv_t - m_s)
        d_s = tl.sum(e_s, 0)
        shift_r = tl.where(d_s > 0, tl.sum(tl.where(e_s > 0, e_s * ((s - t) * inv_t), 0.0), 0) / d_s, 0.0)
        d_t, d_s, q_r, p_r = _block_sums(t, s, inv_t, m_t, m_s, shift_r)
    if HAS_TARGET:
        m_1 = _safe_max(tl.max(s, 0))
        d_1 = tl.sum(tl.exp(s - m_1), 0)
    if not SINGLE_BLOCK:
        for start in range(BLOCK, C, BLOCK):
            c = start + cols
            mask = c < C
            s, _ = _load_logits(s_row, c, s_stride_c, mask, softcap, SOFTCAP)
            t, _ = _load_logits(t_row, c, t_stride_c, mask, softcap, SOFTCAP)
            new_s = _safe_max(tl.maximum(m_s, tl.max(s * inv_t, 0)))
            new_t = _safe_max(tl.maximum(m_t, tl.max(t * inv_t, 0)))
            rescale_s = tl.exp(m_s - new_s)
            rescale_t = tl.exp(m_t - new_t)
            if DIVERGENCE != 1:
                block_d_s, block_d_t, block_q, block_p = _block_sums(s, t, inv_t, new_s, new_t, shift)
                q = q * rescale_t + block_q
                p = p * rescale_t + block_p
            if DIVERGENCE != 0:
                block_d_t, block_d_s, block_q_r, block_p_r = _block_sums(t, s, inv_t, new_t, new_s, shift_r)
                q_r = q_r * rescale_s + block_q_r
                p_r = p_r * rescale_s + block_p_r
            d_s = d_s * rescale_s + block_d_s
            d_t = d_t * rescale_t + block_d_t
            m_s = new_s
            m_t = new_t
            if HAS_TARGET:
                new_1 = _safe_max(tl.maximum(m_1, tl.max(s, 0)))
                d_1 = d_1 * tl.exp(m_1 - new_1) + tl.sum(tl.exp(s - new_1), 0)
                m_1 = new_1

    kl_loss_scale, kl_grad_scale, ce_weight = _load_weights(scalars_ptr)
    beta = _load_beta(scalars_ptr, DIVERGENCE)
    extra = 0.0  # the backward's fourth statistic (see _divergence_grad)
    gap = 0.0  # lse(t/T) − lse(s/T), JSD's
    if DIVERGENCE == 0:
        divergence = _kl(q, p, d_s, d_t, m_s, m_t, shift)
    elif DIVERGENCE == 1:
        divergence = _kl(q_r, p_r, d_t, d_s, m_t, m_s, shift_r)
        extra = q_r / d_s + shift_r  # E_p[(s − t)/T]
    else:
        forward_kl = _kl(q, p, d_s, d_t, m_s, m_t, shift)
        reverse_kl = _kl(q_r, p_r, d_t, d_s, m_t, m_s, shift_r)
        gap = q / d_t + shift - forward_kl  # E_q[δ] − KL(q ‖ p)
        kl_pm = tl.full((), 0.0, tl.float32)
        kl_qm = tl.full((), 0.0, tl.float32)
        if (beta > 0.0) & (beta < 1.0):  # a runtime branch: the ends need no second pass
            if SINGLE_BLOCK:
                kl_pm, kl_qm = _jsd_block_sums(s, t, inv_t, m_s, m_t, d_s, d_t, gap, beta)
            else:
                for start in range(0, C, BLOCK):
                    c = start + cols
                    mask = c < C
                    s_b, _ = _load_logits(s_row, c, s_stride_c, mask, softcap, SOFTCAP)
                    t_b, _ = _load_logits(t_row, c, t_stride_c, mask, softcap, SOFTCAP)
                    block_pm, block_qm = _jsd_block_sums(s_b, t_b, inv_t, m_s, m_t, d_s, d_t, gap, beta)
                    kl_pm += block_pm
                    kl_qm += block_qm
        # A NaN logit makes p or q NaN, which the 0·log 0 guards would drop: it reaches the loss through the gap.
        jsd = tl.where(gap == gap, beta * kl_qm + (1.0 - beta) * kl_pm, gap)
        divergence = tl.where(beta == 0.0, forward_kl, tl.where(beta == 1.0, reverse_kl, jsd))
        extra = tl.where(beta == 1.0, q_r / d_s + shift_r, kl_pm)
    loss = kl_loss_scale * divergence
    lse_1 = 0.0
    if HAS_TARGET:
        lse_1 = m_1 + tl.log(d_1)
        loss += ce_weight * (lse_1 - s_y)
    loss = tl.where(poison, float("nan"), loss)
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))
    lse_s_t = m_s + tl.log(d_s)
    lse_t_t = m_t + tl.log(d_t)
    lse_1 = tl.where(poison, float("nan"), lse_1)
    if STORE_STATS:
        stats_row = stats_ptr + row * (3 + DIVERGENCE)  # stats_per_row(DIVERGENCE)
        tl.store(stats_row, lse_s_t)
        tl.store(stats_row + 1, lse_t_t)
        tl.store(stats_row + 2, lse_1)
        if DIVERGENCE != 0:
            tl.store(stats_row + 3, extra)
        if DIVERGENCE == 2:
            tl.store(stats_row + 4, gap)

    if WRITE_GRAD:
        g_row = g_ptr + row * C
        scale = tl.load(scale_ptr)
        if SINGLE_BLOCK:
            _store_grad_block(g_row, cols, cols < C, s, t, slope, lse_s_t, lse_t_t, lse_1, extra, gap, y, scale,
                              inv_t, kl_grad_scale, ce_weight, beta, keep, HAS_TARGET, DIVERGENCE)
        else:
            _stream_grad_row(scalars_ptr, s_row, t_row, g_row, C, s_stride_c, t_stride_c, lse_s_t, lse_t_t, lse_1,
                             extra, gap, y, scale, inv_t, beta, softcap, keep, HAS_TARGET, BLOCK, DIVERGENCE, SOFTCAP)


@triton.jit
def kd_loss_bwd_kernel(
    s_ptr, t_ptr, y_ptr, stats_ptr, grad_rows_ptr, g_ptr, scalars_ptr,
    C, s_stride_r, s_stride_c, t_stride_r, t_stride_c, ignore_index,
    HAS_TARGET: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
    DIVERGENCE: tl.constexpr = 0, SOFTCAP: tl.constexpr = False,
):
    """∂s = grad_rows[i] · ∂ℓᵢ/∂sᵢ from the forward's saved statistics: one read of s and t, one write of ∂s."""
    row = tl.program_id(0).to(tl.int64)
    inv_t, softcap = _load_scale_options(scalars_ptr, SOFTCAP)
    s_row = s_ptr + row * s_stride_r
    t_row = t_ptr + row * t_stride_r
    g_row = g_ptr + row * C
    if HAS_TARGET:
        y = tl.load(y_ptr + row).to(tl.int64)
        keep = y != ignore_index
    else:
        y = -1
        keep = tl.full((), 1, tl.int1)
    stats_row = stats_ptr + row * (3 + DIVERGENCE)  # stats_per_row(DIVERGENCE)
    lse_s_t = tl.load(stats_row)
    lse_t_t = tl.load(stats_row + 1)
    lse_1 = tl.load(stats_row + 2)
    extra = 0.0
    gap = 0.0
    if DIVERGENCE != 0:
        extra = tl.load(stats_row + 3)
    if DIVERGENCE == 2:
        gap = tl.load(stats_row + 4)
    scale = tl.load(grad_rows_ptr + row)
    beta = _load_beta(scalars_ptr, DIVERGENCE)
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        _, kl_grad_scale, ce_weight = _load_weights(scalars_ptr)
        mask = cols < C
        s, slope = _load_logits(s_row, cols, s_stride_c, mask, softcap, SOFTCAP)
        t, _ = _load_logits(t_row, cols, t_stride_c, mask, softcap, SOFTCAP)
        _store_grad_block(g_row, cols, mask, s, t, slope, lse_s_t, lse_t_t, lse_1, extra, gap, y, scale, inv_t,
                          kl_grad_scale, ce_weight, beta, keep, HAS_TARGET, DIVERGENCE)
    else:
        _stream_grad_row(scalars_ptr, s_row, t_row, g_row, C, s_stride_c, t_stride_c, lse_s_t, lse_t_t, lse_1, extra,
                         gap, y, scale, inv_t, beta, softcap, keep, HAS_TARGET, BLOCK, DIVERGENCE, SOFTCAP)


# The streaming path on a GPU picks its block and warps by autotuning per C. Only ever launched with a live
# driver: the interpreter cannot autotune, and takes the plain kernels with BLOCK=STREAM_BLOCK instead.
# tests/test_kernel_compiles_for_gpu.py fails on any register spill, and has removed two configs: BLOCK 8192 at 8
# warps (32 columns a thread; the old forward spilled 4 bytes at 128 registers on sm_80 and sm_90), and BLOCK 4096
# at 8 warps (the forward's gradient variant with a target spilled 8 bytes on sm_90, and the backward's bf16 one
# 4 bytes once the float options became run-time loads from KDOptions.scalars).
STREAM_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((2048, 8), (2048, 16), (4096, 16), (8192, 16))]
kd_loss_fwd_stream_kernel = triton.autotune(configs=STREAM_CONFIGS,
                                            key=["C", "HAS_TARGET", "STORE_STATS", "WRITE_GRAD",
                                                 "DIVERGENCE", "SOFTCAP"])(kd_loss_fwd_kernel)
kd_loss_bwd_stream_kernel = triton.autotune(configs=STREAM_CONFIGS,
                                            key=["C", "HAS_TARGET", "DIVERGENCE", "SOFTCAP"])(kd_loss_bwd_kernel)
