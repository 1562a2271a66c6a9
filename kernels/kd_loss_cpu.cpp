// fastkd's kd_loss on the CPU: per row, the temperature softmaxes of student and teacher, their KL divergence, the
// cross-entropy and the student gradient, in three passes over the row while it sits in cache:
//   1. the row maxima;
//   2. the exponentials e^(s/T − m), e^(t/T − m) and e^(s − m) (three per element: the fewest the loss and its
//      gradient need), kept in a per-thread scratch row, and their sums in float64;
//   3. the gradient, from the kept exponentials: multiplies only.
// Built by kernels/_kd_loss_cpu.py with the machine's C++ compiler (-O3 -march=native, OpenMP over rows) and called
// through ctypes from fastkd.kernels.kd_loss. Plain C++ with no torch headers, so that it builds in about a second.
// No floating-point contraction (-ffp-contract=off) beyond the explicit fma below: every dtype variant does the same
// float32 arithmetic, so a bfloat16 gradient is exactly the float32 one, rounded.
//
// Divergences (a template argument; β and the soft cap are runtime arguments), p = softmax(s/T), q = softmax(t/T):
// forward KL(q ‖ p); reverse KL(p ‖ q), the same form with the roles swapped, its gradient p·((s − t)/T − E_p[(s − t)/T])
// from δ kept in the teacher's scratch row; JSD β·KL(q ‖ m) + (1 − β)·KL(p ‖ m), m = βq + (1 − β)p, one more pass
// over the kept row for the per-element log(p/m), log(q/m) (one division, one log each, and r = log q − log p =
// δ − gap): nothing overflows where p or q is 0. JSD at β = 0 or 1 runs the forward or reverse KL: the
// formula degenerates there, and those are the ends by convention. A soft cap c·tanh(z/c) is applied on load, and
// its slope 1 − tanh² kept for the gradient.
//
// Precision: the KL is formed as Σ p_t·(t − s)/T − (m_t − m_s) − log(d_t / d_s) with the sums in float64, so the
// cancellation of two log-sum-exps near log C costs nothing in float32 (per-row loss within 1e-6 of float64).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace {

// Inlined into every loop, however large: an out-of-line call inside a vectorised loop runs once per lane (JSD with a
// target, whose loop holds three exponentials, ran 14x slower than forward KL before this).
#define FASTKD_INLINE inline __attribute__((always_inline))

// e^x in float32 for x <= 88 (the loss only ever takes e^(x − max) <= 1): 2^k · e^r with k = round(x / ln 2),
// r = x − k·ln 2 (ln 2 split in two, so r is exact to float precision) and e^r from its Taylor series to r^7 (the
// truncation is below 1e-8 relative for |r| <= ln2/2). Branch-free, so that the loops around it vectorise. 0 below
// −87.3, where e^x would be a denormal; NaN stays NaN.
FASTKD_INLINE float exp_float(float x) {
    const float k = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = std::fma(k, 2.12194440e-4f, std::fma(k, -0.693359375f, x));
    float p = std::fma(1.0f / 5040, r, 1.0f / 720);
    p = std::fma(p, r, 1.0f / 120);
    p = std::fma(p, r, 1.0f / 24);
    p = std::fma(p, r, 1.0f / 6);
    p = std::fma(p, r, 0.5f);
    p = std::fma(p, r, 1.0f);
    p = std::fma(p, r, 1.0f);
    const int32_t exponent = (static_cast<int32_t>(std::max(k, -126.0f)) + 127) << 23;
    float two_to_k;
    std::memcpy(&two_to_k, &exponent, sizeof two_to_k);
    const float y = x < -87.33654f ? 0.0f : p * two_to_k;
    return x != x ? x : y;
}

// log x for a positive normal float: x = 2^k·m with m in [√½, √2), log m = 2·atanh(z), z = (m − 1)/(m + 1), |z| <=
// 0.1716, from its series to z^9 (truncation below 3e-9 relative). Branch-free, so that the loops around it vectorise.
FASTKD_INLINE float log_float(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    int32_t k = static_cast<int32_t>((bits >> 23) & 0xffu) - 127;
    const uint32_t mantissa = (bits & 0x7fffffu) | 0x3f800000u;  // in [1, 2)
    float m;
    std::memcpy(&m, &mantissa, sizeof m);
    const bool high = m > 1.41421356f;
    m = high ? m * 0.5f : m;
    k = high ? k + 1 : k;
    const float z = (m - 1.0f) / (m + 1.0f), z2 = z * z;
    float series = std::fma(z2, 1.0f / 9, 1.0f / 7);
    series = std::fma(series, z2, 1.0f / 5);
    series = std::fma(series, z2, 1.0f / 3);
    series = std::fma(series, z2, 1.0f);
    const float kf = static_cast<float>(k);
    return std::fma(kf, 0.693147182f, std::fma(kf, -1.90465430e-9f, 2.0f * z * series));
}

// log(1 + u) for u in (−1, 0]: the rounding of 1 + u cancels in the ratio (Goldberg). Both sides are computed
// and one is selected (0/0 in the unused one), so that the loops around it vectorise.
FASTKD_INLINE float log1p_float(float u) {
    const float w = 1.0f + u, ratio = log_float(w) * (u / (w - 1.0f));
    return w == 1.0f ? u : ratio;
}

// tanh x, with slope = 1 − tanh² x, from one exponential; a series near 0, where 1 − e^(−2|x|) would cancel.
FASTKD_INLINE float tanh_float(float x, float &slope) {
    const float a = std::fabs(x), e = exp_float(-2.0f * a), a2 = a * a;
    const bool near = a < 0.125f;  // the series' next term is below 2e-10 of the value there
    const float th = near ? a * (1.0f - a2 * (1.0f / 3 - a2 * (2.0f / 15 - a2 * (17.0f / 315)))) : (1.0f - e) / (1.0f + e);
    slope = near ? 1.0f - th * th : 4.0f * e / ((1.0f + e) * (1.0f + e));
    return x < 0 ? -th : th;
}

// Each storage type with its compute type (float32, float64 for float64), load, rounding store and exponential.
struct Float32 {
    using Storage = float;
    using Compute = float;
    static Compute load(Storage v) { return v; }
    static Storage store(Compute v) { return v; }
    FASTKD_INLINE static Compute exp(Compute x) { return exp_float(x); }
    FASTKD_INLINE static Compute log1p(Compute u) { return log1p_float(u); }
    FASTKD_INLINE static Compute tanh(Compute x, Compute &slope) { return tanh_float(x, slope); }
};

struct BFloat16 {
    using Storage = uint16_t;
    using Compute = float;
    static Compute load(Storage v) {
        const uint32_t bits = static_cast<uint32_t>(v) << 16;
        float f;
        std::memcpy(&f, &bits, sizeof f);
        return f;
    }
    static Storage store(Compute v) {  // round to nearest even, as torch's cast does (NaN as torch's 0x7fc0)
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
        return static_cast<Storage>(v != v ? 0x7fc0u : rounded);
    }
    FASTKD_INLINE static Compute exp(Compute x) { return exp_float(x); }
    FASTKD_INLINE static Compute log1p(Compute u) { return log1p_float(u); }
    FASTKD_INLINE static Compute tanh(Compute x, Compute &slope) { return tanh_float(x, slope); }
};

struct Float16 {
    using Storage = _Float16;
    using Compute = float;
    static Compute load(Storage v) { return static_cast<float>(v); }
    static Storage store(Compute v) { return static_cast<_Float16>(v); }  // the hardware's round to nearest even
    FASTKD_INLINE static Compute exp(Compute x) { return exp_float(x); }
    FASTKD_INLINE static Compute log1p(Compute u) { return log1p_float(u); }
    FASTKD_INLINE static Compute tanh(Compute x, Compute &slope) { return tanh_float(x, slope); }
};

struct Float64 {
    using Storage = double;
    using Compute = double;
    static Compute load(Storage v) { return v; }
    static Storage store(Compute v) { return v; }
    FASTKD_INLINE static Compute exp(Compute x) { return std::exp(x); }
    FASTKD_INLINE static Compute log1p(Compute u) { return std::log1p(u); }
    FASTKD_INLINE static Compute tanh(Compute x, Compute &slope) {
        const Compute th = std::tanh(x);
        slope = 1 - th * th;
        return th;
    }
};

enum Reduction { kMean = 0, kSum = 1, kNone = 2 };  // the order of fastkd.kernels.kd_loss._REDUCTIONS
enum Divergence { kForward = 0, kReverse = 1, kJsd = 2 };  // fastkd.kernels._kd_loss_triton's DIVERGENCES

struct Problem {
    const void *s, *t;
    int64_t s_row_stride, t_row_stride;  // in elements; classes are at stride 1
    const int64_t *target;               // nullptr: no cross-entropy term
    int64_t n, c;
    double inv_t, kl_loss_scale, kl_grad_scale, ce_weight;
    int64_t ignore_index;
    int reduction;
    void *rows, *reduced, *grad;  // rows (N,) and reduced () in the compute type; grad (N, C) contiguous or nullptr
    double beta, softcap;         // JSD's β; the soft cap c, 0 for none
};

// Scratch rows a row needs: e^(s/T − m), e^(t/T − m) (or δ), e^(s − m), δ (JSD), the cap's slope (soft cap).
constexpr int64_t kScratchRows = 5;

template <class D>
typename D::Compute row_max(const typename D::Storage *x, int64_t c) {
    using C = typename D::Compute;
    C m = -std::numeric_limits<C>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < c; j++) m = std::max(m, D::load(x[j]));
    return m == -std::numeric_limits<C>::infinity() ? C(0) : m;  // an all −inf row: e^(x − 0) = 0, not NaN
}

// One row: its loss into rows[i] and, with WRITE_GRAD, its gradient times `scale` (the reduction's) into grad.
template <class D, bool HAS_TARGET, bool WRITE_GRAD, int DIV, bool CAP>
void kd_row(const Problem &p, int64_t i, typename D::Compute scale, typename D::Compute *scratch) {
    using S = typename D::Storage;
    using C = typename D::Compute;
    const int64_t c = p.c;
    // __restrict: the scratch rows never overlap the inputs, and saying so spares the vectoriser runtime overlap
    // checks, which with JSD's four output rows sent every call down the scalar loop (6x slower).
    const S *__restrict s = static_cast<const S *>(p.s) + i * p.s_row_stride;
    const S *__restrict t = static_cast<const S *>(p.t) + i * p.t_row_stride;
    const C inv_t = static_cast<C>(p.inv_t);
    // A template argument, not a runtime test: inside the vectorised loops a test is a select, and both sides
    // (three more exponentials an element) would be computed on every call.
    constexpr bool cap = CAP;
    const C softcap = static_cast<C>(p.softcap), inv_cap = static_cast<C>(1.0 / (cap ? p.softcap : 1.0));
    C unused_slope;
    // max(s/T) = max(s)/T exactly (rounding is monotonic and T > 0): one maximum per tensor; the cap is monotonic too.
    C m_1 = row_max<D>(s, c), m_t = row_max<D>(t, c);
    if (cap) {
        m_1 = softcap * D::tanh(m_1 * inv_cap, unused_slope);
        m_t = softcap * D::tanh(m_t * inv_cap, unused_slope);
    }
    const C m_s = m_1 * inv_t;
    m_t *= inv_t;

    // Kept per element: for the gradient, and for JSD's second pass.
    constexpr bool KEEP = WRITE_GRAD || DIV == kJsd;
    C *__restrict e_s = scratch, *__restrict e_t = scratch + c, *__restrict e_1 = scratch + 2 * c;
    C *__restrict delta = scratch + 3 * c, *__restrict slope = scratch + 4 * c;
    double d_s = 0, d_t = 0, d_1 = 0, forward_sum = 0, reverse_sum = 0;
#pragma omp simd reduction(+ : d_s, d_t, d_1, forward_sum, reverse_sum)
    for (int64_t j = 0; j < c; j++) {
        C x = D::load(s[j]), y = D::load(t[j]);
        if constexpr (CAP) {  // (a plain if leaves address-taken locals that the simd lowering cannot vectorise)
            C x_slope, y_slope;
            x = softcap * D::tanh(x * inv_cap, x_slope);
            y = softcap * D::tanh(y * inv_cap, y_slope);
            if (WRITE_GRAD) slope[j] = x_slope;
        }
        const C p_s = D::exp(x * inv_t - m_s), p_t = D::exp(y * inv_t - m_t), dj = (y - x) * inv_t;
        d_s += p_s;
        d_t += p_t;
        // 0·log 0 = 0 on masked (−inf) classes; a NaN anywhere reaches the loss.
        if (DIV == kForward) forward_sum += p_t > 0 ? static_cast<double>(p_t * dj) : 0.0;
        if (DIV == kReverse) reverse_sum += p_s > 0 ? static_cast<double>(p_s * -dj) : 0.0;
        if (KEEP) {
            e_s[j] = p_s;
            e_t[j] = DIV == kReverse ? -dj : p_t;  // reverse KL's gradient needs (s − t)/T, not q
            if (DIV == kJsd) delta[j] = dj;
        }
        if (HAS_TARGET) {
            const C q = D::exp(x - m_1);
            d_1 += q;
            if (WRITE_GRAD) e_1[j] = q;
        }
    }
    const double gap = static_cast<double>(m_t) - static_cast<double>(m_s) + std::log(d_t / d_s);  // lse_t − lse_s
    double divergence = 0, extra = 0;  // extra: E_p[(s − t)/T] for reverse KL, KL(p ‖ m) for JSD
    if (DIV == kForward) divergence = forward_sum / d_t - gap;
    if (DIV == kReverse) {
        extra = reverse_sum / d_s;
        divergence = extra + gap;
    }
    if (DIV == kJsd) {
        const C beta = static_cast<C>(p.beta), beta_c = static_cast<C>(1 - p.beta), g = static_cast<C>(gap);
        const C inv_d_s = static_cast<C>(1 / d_s), inv_d_t = static_cast<C>(1 / d_t);
        // q/p = (e_t/e_s)·(d_s/d_t), with d_s/d_t in two parts: one rounding of it would shift every log-ratio the
        // same way, by up to u/2, which JSD's terms (O(r²) from O(r) pieces) would amplify; rounding per element
        // does not add up.
        const double k = d_s / d_t;
        const C k_hi = static_cast<C>(k), k_lo = static_cast<C>(k - static_cast<double>(k_hi));
        double kl_pm = 0, kl_qm = 0;
#pragma omp simd reduction(+ : kl_pm, kl_qm)
        for (int64_t j = 0; j < c; j++) {
            const C ps = e_s[j] * inv_d_s, qt = e_t[j] * inv_d_t, r = delta[j] - g;  // r = log q − log p
            // Where q < p: m/p = 1 + β(q/p − 1), else m/q = 1 + (1 − β)(p/q − 1): a ratio <= 1 (nothing
            // overflows), taken from the kept exponentials (a division, cheaper than e^(−|r|)).
            const C a = e_s[j], b = std::fma(e_t[j], k_hi, e_t[j] * k_lo);  // ∝ p and q, on one scale
            const bool q_low = b < a;
            const C ratio = std::min(a, b) / std::max(a, b);
            const C l = -D::log1p((q_low ? beta : beta_c) * (ratio - 1));
            const C log_pm = q_low ? l : l - r, log_qm = q_low ? l + r : l;
            kl_pm += ps > 0 ? static_cast<double>(ps * log_pm) : 0.0;
            kl_qm += qt > 0 ? static_cast<double>(qt * log_qm) : 0.0;
            if (WRITE_GRAD) delta[j] = log_pm;
        }
        extra = kl_pm;
        // A NaN logit makes p or q NaN, which the 0·log 0 guards above would drop: it reaches the loss here.
        divergence = gap != gap ? gap : p.beta * kl_qm + (1 - p.beta) * kl_pm;
    }
    double loss = p.kl_loss_scale * divergence;
    bool keep = true, in_range = true;
    int64_t y = 0;
    if (HAS_TARGET) {
        y = p.target[i];
        keep = y != p.ignore_index;
        in_range = 0 <= y && y < c;
        // Out-of-range targets cannot be checked without a host sync: they poison the row with NaN instead.
        const int64_t safe_y = keep && in_range ? y : 0;
        C s_y = D::load(s[safe_y]);
        if (cap) s_y = softcap * D::tanh(s_y * inv_cap, unused_slope);
        const double ce = static_cast<double>(m_1) + std::log(d_1) - static_cast<double>(s_y);
        loss = !keep ? 0.0 : in_range ? loss + p.ce_weight * ce : std::numeric_limits<double>::quiet_NaN();
    }
    static_cast<C *>(p.rows)[i] = static_cast<C>(loss);
    if (!WRITE_GRAD) return;

    S *__restrict g = static_cast<S *>(p.grad) + i * c;
    if (!keep || !in_range) {
        const S fill = D::store(keep ? std::numeric_limits<C>::quiet_NaN() : C(0));
        std::fill(g, g + c, fill);
        return;
    }
    // The row's gradient, then times the reduction's scale: one rounding, as a caller scaling it afterwards gets.
    const C f_s = static_cast<C>(p.kl_grad_scale / d_s), f_t = static_cast<C>(p.kl_grad_scale / d_t);
    const C f_1 = HAS_TARGET ? static_cast<C>(p.ce_weight / d_1) : C(0);
    const C f_jsd = static_cast<C>(p.kl_grad_scale * (1 - p.beta) / d_s), e = static_cast<C>(extra);
    auto divergence_grad = [&](int64_t j) -> C {  // α·T·∂D/∂(s/T), 0 where p is 0 (a masked class)
        if (DIV == kForward) return e_s[j] * f_s - e_t[j] * f_t;
        if (DIV == kReverse) return e_s[j] > 0 ? e_s[j] * f_s * (e_t[j] - e) : C(0);
        return e_s[j] > 0 ? e_s[j] * f_jsd * (delta[j] - e) : C(0);
    };
#pragma omp simd
    for (int64_t j = 0; j < c; j++) {
        C v = divergence_grad(j);
        if (HAS_TARGET) v += e_1[j] * f_1;
        if (cap) v *= slope[j];
        g[j] = D::store(v * scale);
    }
    if (HAS_TARGET) {  // the one-hot term, from the unrounded value (no second rounding of a low-precision store)
        const C v = divergence_grad(y) + e_1[y] * f_1 - static_cast<C>(p.ce_weight);
        g[y] = D::store((cap ? v * slope[y] : v) * scale);
    }
}

// Below this many elements a call runs on one thread: waking the others costs more than the rows.
constexpr int64_t kParallelElements = 1 << 15;

template <class D, bool HAS_TARGET, bool WRITE_GRAD, int DIV, bool CAP>
int kd_loss(const Problem &p, int threads) {
    using C = typename D::Compute;
    int64_t kept = p.n;
    if (HAS_TARGET) {
        kept = 0;
        for (int64_t i = 0; i < p.n; i++) kept += p.target[i] != p.ignore_index;
    }
    const C scale = p.reduction == kMean ? C(1) / static_cast<C>(std::max<int64_t>(kept, 1)) : C(1);
    const bool keep = WRITE_GRAD || DIV == kJsd;
    bool failed = false;
#pragma omp parallel num_threads(threads) if (threads > 1 && p.n > 1 && p.n * p.c >= kParallelElements)
    {
        C *scratch = keep ? static_cast<C *>(std::malloc(sizeof(C) * kScratchRows * p.c)) : nullptr;
        const bool usable = !keep || scratch != nullptr;
        if (!usable) {
#pragma omp atomic write
            failed = true;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < p.n; i++)
            if (usable) kd_row<D, HAS_TARGET, WRITE_GRAD, DIV, CAP>(p, i, scale, scratch);
        std::free(scratch);
    }
    if (failed) return 1;
    if (p.reduction != kNone) {  // in row order, in float64: the same sum on any number of threads
        const C *rows = static_cast<const C *>(p.rows);
        double total = 0;
        for (int64_t i = 0; i < p.n; i++) total += rows[i];
        *static_cast<C *>(p.reduced) = static_cast<C>(total * static_cast<double>(scale));
    }
    return 0;
}

template <class D, int DIV, bool CAP>
int dispatch_features(const Problem &p, int threads) {
    const bool has_target = p.target != nullptr, write_grad = p.grad != nullptr;
    if (has_target)
        return write_grad ? kd_loss<D, true, true, DIV, CAP>(p, threads) : kd_loss<D, true, false, DIV, CAP>(p, threads);
    return write_grad ? kd_loss<D, false, true, DIV, CAP>(p, threads) : kd_loss<D, false, false, DIV, CAP>(p, threads);
}

template <class D, int DIV>
int dispatch_cap(const Problem &p, int threads) {
    return p.softcap > 0 ? dispatch_features<D, DIV, true>(p, threads) : dispatch_features<D, DIV, false>(p, threads);
}

template <class D>
int dispatch(const Problem &p, int divergence, int threads) {
    // JSD at β = 0 is forward KL and at β = 1 reverse KL (the formula degenerates there): chosen here, by value.
    if (divergence == kJsd && p.beta == 0) divergence = kForward;
    if (divergence == kJsd && p.beta == 1) divergence = kReverse;
    switch (divergence) {
        case kForward: return dispatch_cap<D, kForward>(p, threads);
        case kReverse: return dispatch_cap<D, kReverse>(p, threads);
        case kJsd: return dispatch_cap<D, kJsd>(p, threads);
        default: return 3;
    }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16, 3 float64; divergence: 0 forward KL, 1 reverse KL, 2 JSD with β = beta;
// softcap: c > 0 for c·tanh(z/c) on both logits, 0 for none. Returns 0, 1 when scratch memory could not be had, 2
// for an unknown dtype, 3 for an unknown divergence.
extern "C" int fastkd_kd_loss(int dtype, const void *s, int64_t s_row_stride, const void *t, int64_t t_row_stride,
                              const int64_t *target, int64_t n, int64_t c, double inv_t, double kl_loss_scale,
                              double kl_grad_scale, double ce_weight, int64_t ignore_index, int reduction,
                              void *rows, void *reduced, void *grad, int threads, int divergence, double beta,
                              double softcap) {
    const Problem p{s, t, s_row_stride, t_row_stride, target, n, c, inv_t, kl_loss_scale, kl_grad_scale,
                    ce_weight, ignore_index, reduction, rows, reduced, grad, beta, softcap};
    switch (dtype) {
        case 0: return dispatch<Float32>(p, divergence, threads);
        case 1: return dispatch<BFloat16>(p, divergence, threads);
        case 2: return dispatch<Float16>(p, divergence, threads);
        case 3: return dispatch<Float64>(p, divergence, threads);
        default: return 2;
    }
}
