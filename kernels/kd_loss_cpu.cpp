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
// Precision: the KL is formed as Σ p_t·(t − s)/T − (m_t − m_s) − log(d_t / d_s) with the sums in float64, so the
// cancellation of two log-sum-exps near log C costs nothing in float32 (per-row loss within 1e-6 of float64).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace {

// e^x in float32 for x <= 88 (the loss only ever takes e^(x − max) <= 1): 2^k · e^r with k = round(x / ln 2),
// r = x − k·ln 2 (ln 2 split in two, so r is exact to float precision) and e^r from its Taylor series to r^7 (the
// truncation is below 1e-8 relative for |r| <= ln2/2). Branch-free, so that the loops around it vectorise. 0 below
// −87.3, where e^x would be a denormal; NaN stays NaN.
inline float exp_float(float x) {
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

// Each storage type with its compute type (float32, float64 for float64), load, rounding store and exponential.
struct Float32 {
    using Storage = float;
    using Compute = float;
    static Compute load(Storage v) { return v; }
    static Storage store(Compute v) { return v; }
    static Compute exp(Compute x) { return exp_float(x); }
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
    static Compute exp(Compute x) { return exp_float(x); }
};

struct Float16 {
    using Storage = _Float16;
    using Compute = float;
    static Compute load(Storage v) { return static_cast<float>(v); }
    static Storage store(Compute v) { return static_cast<_Float16>(v); }  // the hardware's round to nearest even
    static Compute exp(Compute x) { return exp_float(x); }
};

struct Float64 {
    using Storage = double;
    using Compute = double;
    static Compute load(Storage v) { return v; }
    static Storage store(Compute v) { return v; }
    static Compute exp(Compute x) { return std::exp(x); }
};

enum Reduction { kMean = 0, kSum = 1, kNone = 2 };  // the order of fastkd.kernels.kd_loss._REDUCTIONS

struct Problem {
    const void *s, *t;
    int64_t s_row_stride, t_row_stride;  // in elements; classes are at stride 1
    const int64_t *target;               // nullptr: no cross-entropy term
    int64_t n, c;
    double inv_t, kl_loss_scale, kl_grad_scale, ce_weight;
    int64_t ignore_index;
    int reduction;
    void *rows, *reduced, *grad;  // rows (N,) and reduced () in the compute type; grad (N, C) contiguous or nullptr
};

template <class D>
typename D::Compute row_max(const typename D::Storage *x, int64_t c) {
    using C = typename D::Compute;
    C m = -std::numeric_limits<C>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < c; j++) m = std::max(m, D::load(x[j]));
    return m == -std::numeric_limits<C>::infinity() ? C(0) : m;  // an all −inf row: e^(x − 0) = 0, not NaN
}

// One row: its loss into rows[i] and, with WRITE_GRAD, its gradient times `scale` (the reduction's) into grad.
template <class D, bool HAS_TARGET, bool WRITE_GRAD>
void kd_row(const Problem &p, int64_t i, typename D::Compute scale, typename D::Compute *scratch) {
    using S = typename D::Storage;
    using C = typename D::Compute;
    const int64_t c = p.c;
    const S *s = static_cast<const S *>(p.s) + i * p.s_row_stride;
    const S *t = static_cast<const S *>(p.t) + i * p.t_row_stride;
    const C inv_t = static_cast<C>(p.inv_t);
    // max(s/T) = max(s)/T exactly (rounding is monotonic and T > 0): one maximum per tensor.
    const C m_1 = row_max<D>(s, c), m_s = m_1 * inv_t, m_t = row_max<D>(t, c) * inv_t;

    C *e_s = scratch, *e_t = WRITE_GRAD ? scratch + c : nullptr, *e_1 = WRITE_GRAD ? scratch + 2 * c : nullptr;
    double d_s = 0, d_t = 0, d_1 = 0, kl_sum = 0;
#pragma omp simd reduction(+ : d_s, d_t, d_1, kl_sum)
    for (int64_t j = 0; j < c; j++) {
        const C x = D::load(s[j]), y = D::load(t[j]);
        const C p_s = D::exp(x * inv_t - m_s), p_t = D::exp(y * inv_t - m_t);
        d_s += p_s;
        d_t += p_t;
        // 0·log 0 = 0 on masked (−inf) teacher classes; a NaN anywhere reaches the loss.
        kl_sum += p_t > 0 ? static_cast<double>(p_t * ((y - x) * inv_t)) : 0.0;
        if (WRITE_GRAD) {
            e_s[j] = p_s;
            e_t[j] = p_t;
        }
        if (HAS_TARGET) {
            const C q = D::exp(x - m_1);
            d_1 += q;
            if (WRITE_GRAD) e_1[j] = q;
        }
    }
    const double kl = kl_sum / d_t - (static_cast<double>(m_t) - static_cast<double>(m_s)) - std::log(d_t / d_s);
    double loss = p.kl_loss_scale * kl;
    bool keep = true, in_range = true;
    int64_t y = 0;
    if (HAS_TARGET) {
        y = p.target[i];
        keep = y != p.ignore_index;
        in_range = 0 <= y && y < c;
        // Out-of-range targets cannot be checked without a host sync: they poison the row with NaN instead.
        const int64_t safe_y = keep && in_range ? y : 0;
        const double ce = static_cast<double>(m_1) + std::log(d_1) - static_cast<double>(D::load(s[safe_y]));
        loss = !keep ? 0.0 : in_range ? loss + p.ce_weight * ce : std::numeric_limits<double>::quiet_NaN();
    }
    static_cast<C *>(p.rows)[i] = static_cast<C>(loss);
    if (!WRITE_GRAD) return;

    S *g = static_cast<S *>(p.grad) + i * c;
    if (!keep || !in_range) {
        const S fill = D::store(keep ? std::numeric_limits<C>::quiet_NaN() : C(0));
        std::fill(g, g + c, fill);
        return;
    }
    // The row's gradient, then times the reduction's scale: one rounding, as a caller scaling it afterwards gets.
    const C f_s = static_cast<C>(p.kl_grad_scale / d_s), f_t = static_cast<C>(p.kl_grad_scale / d_t);
    const C f_1 = HAS_TARGET ? static_cast<C>(p.ce_weight / d_1) : C(0);
#pragma omp simd
    for (int64_t j = 0; j < c; j++) {
        C v = e_s[j] * f_s - e_t[j] * f_t;
        if (HAS_TARGET) v += e_1[j] * f_1;
        g[j] = D::store(v * scale);
    }
    if (HAS_TARGET)  // the one-hot term, from the unrounded value (no second rounding of a low-precision store)
        g[y] = D::store((e_s[y] * f_s - e_t[y] * f_t + e_1[y] * f_1 - static_cast<C>(p.ce_weight)) * scale);
}

// Below this many elements a call runs on one thread: waking the others costs more than the rows.
constexpr int64_t kParallelElements = 1 << 15;

template <class D, bool HAS_TARGET, bool WRITE_GRAD>
int kd_loss(const Problem &p, int threads) {
    using C = typename D::Compute;
    int64_t kept = p.n;
    if (HAS_TARGET) {
        kept = 0;
        for (int64_t i = 0; i < p.n; i++) kept += p.target[i] != p.ignore_index;
    }
    const C scale = p.reduction == kMean ? C(1) / static_cast<C>(std::max<int64_t>(kept, 1)) : C(1);
    const int64_t scratch_rows = WRITE_GRAD ? (HAS_TARGET ? 3 : 2) : 0;
    bool failed = false;
#pragma omp parallel num_threads(threads) if (threads > 1 && p.n > 1 && p.n * p.c >= kParallelElements)
    {
        C *scratch = scratch_rows ? static_cast<C *>(std::malloc(sizeof(C) * scratch_rows * p.c)) : nullptr;
        const bool usable = scratch_rows == 0 || scratch != nullptr;
        if (!usable) {
#pragma omp atomic write
            failed = true;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < p.n; i++)
            if (usable) kd_row<D, HAS_TARGET, WRITE_GRAD>(p, i, scale, scratch);
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

template <class D>
int dispatch(const Problem &p, int threads) {
    const bool has_target = p.target != nullptr, write_grad = p.grad != nullptr;
    if (has_target) return write_grad ? kd_loss<D, true, true>(p, threads) : kd_loss<D, true, false>(p, threads);
    return write_grad ? kd_loss<D, false, true>(p, threads) : kd_loss<D, false, false>(p, threads);
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16, 3 float64. Returns 0, 1 when scratch memory could not be had, 2 for an
// unknown dtype.
extern "C" int fastkd_kd_loss(int dtype, const void *s, int64_t s_row_stride, const void *t, int64_t t_row_stride,
                              const int64_t *target, int64_t n, int64_t c, double inv_t, double kl_loss_scale,
                              double kl_grad_scale, double ce_weight, int64_t ignore_index, int reduction,
                              void *rows, void *reduced, void *grad, int threads) {
    const Problem p{s, t, s_row_stride, t_row_stride, target, n, c, inv_t, kl_loss_scale, kl_grad_scale,
                    ce_weight, ignore_index, reduction, rows, reduced, grad};
    switch (dtype) {
        case 0: return dispatch<Float32>(p, threads);
        case 1: return dispatch<BFloat16>(p, threads);
        case 2: return dispatch<Float16>(p, threads);
        case 3: return dispatch<Float64>(p, threads);
        default: return 2;
    }
}
