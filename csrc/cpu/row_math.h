// Row kernels shared by the CPU ops: reductions, argmax, exponentials,
// softmax and the Gumbel noise fill over one row of K (or D) values.
//
// One NaN rule for every op, torch's: a NaN anywhere in a row makes it the
// row's maximum (row_argmax returns the first NaN's index, like torch.argmax)
// and propagates through every softmax and sum of that row.
//
// Why hand-vectorised and not at::vec: this translation unit is compiled for
// baseline x86-64, so at::vec would fall back to scalar code. The float paths
// are plain loops GCC vectorises, or GCC vector extensions where a select
// would not be if-converted under trapping math, and GMVQ_CLONES builds
// AVX-512 and AVX2 copies picked at load time. Every copy does the same
// correctly rounded IEEE operations in the same order (no FMA contraction:
// -ffp-contract=off), so results are bitwise identical whichever copy runs;
// the one exception, the exponentials' AVX2 + FMA copy, is chosen per machine
// (see "exponentials" below). The noise never uses FMA: its bits are the
// reference's.
// Reductions use 16 fixed partial sums combined in a fixed order: vectorisable
// without -ffast-math, and independent of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "gmvq/philox.h"

#include "x86_paths.h"

#if GMVQ_X86_PATHS
#define GMVQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// AVX2 intrinsics paths, each behind a run-time check: the Philox noise, the
// index search, the exponentials (with FMA).
#include <immintrin.h>
#else
#define GMVQ_CLONES
#endif

namespace gmvq::cpu::row {

// Partial sums of the reductions (plain loops the compiler vectorises).
constexpr int kLanes = 16;
// Lanes of the explicit vector code: 8 floats, native on AVX2 (a wider GCC
// vector type is lowered to scalar code in the AVX2 clone).
constexpr int kVector = 8;

// --- 16-lane vectors ------------------------------------------------------------
// Helpers on vector types are always inlined into the cloned callers, so the
// vector calling convention (-Wpsabi, silenced to the end of the file) never matters.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#define GMVQ_VECTOR_INLINE inline __attribute__((always_inline))
// Lambdas handed to the row loops below, inlined like the helpers.
#define GMVQ_SINK __attribute__((always_inline))
typedef float vfloat __attribute__((vector_size(32)));
typedef int32_t vint __attribute__((vector_size(32)));

GMVQ_VECTOR_INLINE vfloat splat(float v) { return vfloat{} + v; }

GMVQ_VECTOR_INLINE vfloat load_vector(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

GMVQ_VECTOR_INLINE void store_vector(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// Up to kVector values from p, the rest `fill`.
GMVQ_VECTOR_INLINE vfloat load_tail(const float* p, int64_t count, float fill) {
  float tail[kVector];
  for (int j = 0; j < kVector; ++j) tail[j] = j < count ? p[j] : fill;
  return load_vector(tail);
}

// Polynomials are long chains of dependent multiplies and adds: one vector at
// a time leaves the out-of-order window too few independent operations. The
// *_chains functions advance kChains vectors in step, operation by operation;
// each vector gets exactly the single-vector function's operations (same bits).
// 8 rather than 4 (Zen 3, one core): Gumbel noise 2.33 -> 2.09 ns per element,
// exp_affine_dot 0.81 -> 0.68; the spills that 8 chains cost are cheaper than
// the idle pipes of 4.
constexpr int kChains = 8;
#define GMVQ_EACH_CHAIN _Pragma("GCC unroll 8") for (int s = 0; s < kChains; ++s)

// --- reductions -------------------------------------------------------------------
GMVQ_CLONES static float row_sum(const float* x, int64_t n) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += x[i + j];
  }
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += lane[j];
  for (; i < n; ++i) total += x[i];
  return total;
}

// sum_i x[i] * y[i]
GMVQ_CLONES static float row_dot(const float* x, const float* y, int64_t n) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += x[i + j] * y[i + j];
  }
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += lane[j];
  for (; i < n; ++i) total += x[i] * y[i];
  return total;
}

inline double row_sum(const double* x, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += x[i];
  return total;
}

inline double row_dot(const double* x, const double* y, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += x[i] * y[i];
  return total;
}

// max_i x[i]; NaN if the row holds one.
// The running maximum of row_max: per lane, the largest value and the last NaN.
struct RunningMax {
  vfloat m = splat(-std::numeric_limits<float>::infinity());
  vfloat nan = splat(0.0f);

  GMVQ_VECTOR_INLINE void take(vfloat v) {
    m = v > m ? v : m;
    nan = v != v ? v : nan;
  }
  // The maximum over the lanes and the `count` values at rest; NaN if any was.
  GMVQ_VECTOR_INLINE float finish(const float* rest, int64_t count) const {
    float best = -std::numeric_limits<float>::infinity(), any_nan = 0.0f;
    for (int j = 0; j < kVector; ++j) {
      best = m[j] > best ? m[j] : best;
      any_nan = nan[j] != nan[j] ? nan[j] : any_nan;
    }
    for (int64_t i = 0; i < count; ++i) {
      best = rest[i] > best ? rest[i] : best;
      any_nan = rest[i] != rest[i] ? rest[i] : any_nan;
    }
    return any_nan != any_nan ? any_nan : best;
  }
};

GMVQ_CLONES static float row_max(const float* x, int64_t n) {
  RunningMax running;
  int64_t i = 0;
  for (; i + kVector <= n; i += kVector) running.take(load_vector(x + i));
  return running.finish(x + i, n - i);
}

inline double row_max(const double* x, int64_t n) {
  double best = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    best = x[i] > best ? x[i] : best;
  }
  return best;
}

// First index of the maximum (ties to the lowest index); a row with NaN
// gives its first NaN's index. Both as torch.argmax. An empty row gives 0.
template <typename T>
int64_t row_argmax(const T* x, int64_t n) {
  const T m = row_max(x, n);
  const bool nan = m != m;
  for (int64_t i = 0; i < n; ++i) {
    if (nan ? x[i] != x[i] : x[i] == m) return i;
  }
  return 0;
}

// First index holding m, the row's maximum (row_max's result): as row_argmax.
template <typename T>
int64_t index_of_max(const T* x, T m, int64_t n) {
  const bool nan = m != m;
  for (int64_t i = 0; i < n; ++i) {
    if (nan ? x[i] != x[i] : x[i] == m) return i;
  }
  return 0;
}

#if GMVQ_X86_PATHS
// The first index holding m (not NaN), 8 elements a compare: the scalar scan
// above reads half the row on average at about one element per 1.5 cycles.
__attribute__((target("avx2"))) inline int64_t index_of_value_avx2(const float* x, float m, int64_t n) {
  const __m256 target = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + kVector <= n; i += kVector) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (hits != 0) return i + __builtin_ctz(static_cast<unsigned>(hits));
  }
  for (; i < n; ++i) {
    if (x[i] == m) return i;
  }
  return 0;
}
#endif

inline int64_t index_of_max(const float* x, float m, int64_t n) {
#if GMVQ_X86_PATHS
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2 && m == m) return index_of_value_avx2(x, m, n);
#endif
  return index_of_max<float>(x, m, n);
}

// --- elementwise ------------------------------------------------------------------------
// The logits epilogue: x[i] = -max(row_term + x[i], 0) (x holds the GEMM's
// cross terms); a NaN distance stays NaN (a select on d > 0 would turn it into
// a perfect match).
// One rule for every copy: the scalars and a vector.
GMVQ_VECTOR_INLINE float clamped_logit(float cross, float row_term) {
  const float d = cross + row_term;
  return -(d < 0.0f ? 0.0f : d);
}
GMVQ_VECTOR_INLINE double clamped_logit(double cross, double row_term) {
  const double d = cross + row_term;
  return -(d < 0.0 ? 0.0 : d);
}
GMVQ_VECTOR_INLINE vfloat clamped_logit(vfloat cross, float row_term) {
  const vfloat d = cross + row_term;
  return -(d < splat(0.0f) ? splat(0.0f) : d);
}

GMVQ_CLONES static void clamp_logits_row(float* x, float row_term, int64_t n) {
  int64_t i = 0;
  for (; i + kVector <= n; i += kVector) store_vector(x + i, clamped_logit(load_vector(x + i), row_term));
  for (; i < n; ++i) x[i] = clamped_logit(x[i], row_term);
}

inline void clamp_logits_row(double* x, double row_term, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = clamped_logit(x[i], row_term);
}

// The epilogue, then the row's maximum logit (NaN if one is NaN); for float
// in one pass (the block's logits have left L1 by the time a second pass reads them).
inline double clamped_logits_row(double* x, double row_term, int64_t n) {
  clamp_logits_row(x, row_term, n);
  return row_max(x, n);
}

GMVQ_CLONES static float clamped_logits_row(float* x, float row_term, int64_t n) {
  RunningMax running;
  int64_t i = 0;
  for (; i + kVector <= n; i += kVector) {
    const vfloat l = clamped_logit(load_vector(x + i), row_term);
    store_vector(x + i, l);
    running.take(l);
  }
  clamp_logits_row(x + i, row_term, n - i);
  return running.finish(x + i, n - i);
}

// out[i] = a[i] + b[i] (out may alias a).
GMVQ_CLONES static void add_rows(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

inline void add_rows(const double* a, const double* b, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// sums[i] += x[i] * scale.
GMVQ_CLONES static void accumulate_scaled(float* sums, const float* x, float scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) sums[i] += x[i] * scale;
}

inline void accumulate_scaled(double* sums, const double* x, double scale, int64_t n) {
  for (int64_t i = 0; i < n; ++i) sums[i] += x[i] * scale;
}

// The fused quantize's logit gradient of one row (docs/math.md, quantize):
//   out = pi (g_pi - b_pi) + s y (g_y - beta),  s = 1/T,
// without the y part when y is null (evaluation: no tempered sample), and the
// y part alone in through_sample when asked (the Gumbel noise's gradient).
// Returns sum_i out[i] (the distance backward's row sum), in kLanes partial sums.
GMVQ_CLONES static float logit_gradient_row(const float* pi, const float* g_pi, float b_pi, const float* y,
                                            const float* g_y, float beta, float s, float* out,
                                            float* through_sample, int64_t n) {
  // One loop for every case: the bits may not depend on through_sample.
  const auto element = [&](int64_t q) GMVQ_SINK {
    const float posterior_part = pi[q] * (g_pi[q] - b_pi);
    if (y == nullptr) return out[q] = posterior_part;
    const float sample_part = s * y[q] * (g_y[q] - beta);
    if (through_sample != nullptr) through_sample[q] = sample_part;
    return out[q] = posterior_part + sample_part;
  };
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += element(i + j);
  }
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += lane[j];
  for (; i < n; ++i) total += element(i);
  return total;
}

inline double logit_gradient_row(const double* pi, const double* g_pi, double b_pi, const double* y,
                                 const double* g_y, double beta, double s, double* out, double* through_sample,
                                 int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = pi[i] * (g_pi[i] - b_pi);
    if (y != nullptr) {
      const double sample_part = s * y[i] * (g_y[i] - beta);
      if (through_sample != nullptr) through_sample[i] = sample_part;
      out[i] += sample_part;
    }
    total += out[i];
  }
  return total;
}

// --- exponentials -------------------------------------------------------------------
// The float kernels, twice (exp_rows.inc): portable (GMVQ_CLONES: AVX-512,
// AVX2 and baseline copies of the same IEEE operations, hence the same bits) and,
// on x86 machines with AVX2 and FMA, with fused multiply-adds (0.71 -> 0.49 ns
// per element in exp_affine_dot on one Zen 3 core, 0.63 portably). The two give
// different bits (FMA rounds once), like the BLAS does from one CPU to another;
// each is deterministic. GMVQ_CPU_PORTABLE_EXP=1 forces the portable copy, so
// that the tests check both on one machine.
namespace portable {
#define GMVQ_EXP_MADD(a, b, c) ((a) * (b) + (c))
#define GMVQ_EXP_ROW GMVQ_CLONES static
#include "exp_rows.inc"
#undef GMVQ_EXP_MADD
#undef GMVQ_EXP_ROW
}  // namespace portable

#if GMVQ_X86_PATHS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2_fma {
#define GMVQ_EXP_MADD(a, b, c) vfloat(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)))
#define GMVQ_EXP_ROW static
#include "exp_rows.inc"
#undef GMVQ_EXP_MADD
#undef GMVQ_EXP_ROW
}  // namespace avx2_fma
#pragma GCC pop_options

inline bool avx2_fma_exp() {
  static const bool use = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("GMVQ_CPU_PORTABLE_EXP") == nullptr;
  return use;
}
#endif

// out[i] = exp(x[i] * scale - shift) (x and out may alias); returns sum_i out[i].
inline float exp_affine_row(const float* x, float scale, float shift, float* out, int64_t n) {
#if GMVQ_X86_PATHS
  if (avx2_fma_exp()) return avx2_fma::exp_affine_row(x, scale, shift, out, n);
#endif
  return portable::exp_affine_row(x, scale, shift, out, n);
}

// out[i] = exp(x[i] * scale - shift) (x and out may alias); returns sum_i out[i] * w[i].
inline float exp_affine_dot(const float* x, float scale, float shift, const float* w, float* out, int64_t n) {
#if GMVQ_X86_PATHS
  if (avx2_fma_exp()) return avx2_fma::exp_affine_dot(x, scale, shift, w, out, n);
#endif
  return portable::exp_affine_dot(x, scale, shift, w, out, n);
}

// sum_i exp(x[i] * scale - shift), nothing stored.
inline float exp_affine_sum(const float* x, float scale, float shift, int64_t n) {
#if GMVQ_X86_PATHS
  if (avx2_fma_exp()) return avx2_fma::exp_affine_sum(x, scale, shift, n);
#endif
  return portable::exp_affine_sum(x, scale, shift, n);
}

inline double exp_affine_row(const double* x, double scale, double shift, double* out, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(x[i] * scale - shift);
    total += out[i];
  }
  return total;
}

inline double exp_affine_dot(const double* x, double scale, double shift, const double* w, double* out, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(x[i] * scale - shift);
    total += out[i] * w[i];
  }
  return total;
}

inline double exp_affine_sum(const double* x, double scale, double shift, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += std::exp(x[i] * scale - shift);
  return total;
}

// logsumexp_i (x[i] * scale) given m = max_i x[i] * scale (scale > 0: the max commutes with it).
template <typename T>
T log_sum_exp_from_max(const T* x, T scale, T m, int64_t n) {
  if (!(std::abs(m) < std::numeric_limits<T>::infinity())) return m;  // NaN, +-inf: the row's verdict
  return m + std::log(exp_affine_sum(x, scale, m, n));
}

// logsumexp_i (x[i] * scale), scale > 0.
template <typename T>
T log_sum_exp(const T* x, T scale, int64_t n) {
  return log_sum_exp_from_max(x, scale, row_max(x, n) * scale, n);
}

// out = softmax(x * scale) over the row (x and out may alias).
template <typename T>
void softmax_row(const T* x, T scale, T* out, int64_t n) {
  const T m = row_max(x, n) * scale;
  const T total = exp_affine_row(x, scale, m, out, n);
  const T inverse = T(1) / total;
  for (int64_t i = 0; i < n; ++i) out[i] *= inverse;
}

// --- noise -----------------------------------------------------------------------
// rng's transforms with the uniform built through int32 (exact: r >> 9 < 2^23),
// because AVX2 has no uint32 -> float conversion; the same bits as rng::*_from_bits.
inline float uniform_from_word(uint32_t r) {
  const float bits23 = static_cast<float>(static_cast<int32_t>(r >> 9));
  return rng::mul_rn(rng::add_rn(bits23, 0.5f), 0x1p-23f);
}

struct UniformWord {
  float operator()(uint32_t r) const { return uniform_from_word(r); }
};
struct GumbelWord {
  float operator()(uint32_t r) const { return -rng::log_canonical(-rng::log_canonical(uniform_from_word(r))); }
};
struct GaussianWord {
  float operator()(uint32_t r) const {
    const float u = uniform_from_word(r);
    return rng::mul_rn(0x1.6a09e6p+0f, rng::erfinv_canonical(rng::add_rn(rng::add_rn(u, u), -1.0f)));
  }
};

// The noise of the 4 * blocks elements starting at element 4 * first_block of
// `stream`, equal bit for bit to rng::fill_range with the same transform. The
// Philox words are produced into four lane arrays so that both loops vectorise
// (the transforms are branch-free: philox.h).
template <typename Transform>
GMVQ_CLONES static void fill_aligned(int64_t seed, int64_t offset, uint64_t stream, uint64_t first_block,
                                     int64_t blocks, float* __restrict out) {
  constexpr int64_t kChunk = 64;
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u, kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  const Transform transform;
  const uint64_t key = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
  uint32_t w0[kChunk], w1[kChunk], w2[kChunk], w3[kChunk];
  for (int64_t j0 = 0; j0 < blocks; j0 += kChunk) {
    const int64_t count = std::min(kChunk, blocks - j0);
    // rng::philox_block for `count` consecutive blocks, one round at a time over
    // all of them (structure of arrays: each round's loop vectorises).
    for (int64_t j = 0; j < count; ++j) {
      const uint64_t counter = first_block + static_cast<uint64_t>(j0 + j) + (stream << 62);
      w0[j] = static_cast<uint32_t>(counter);
      w1[j] = static_cast<uint32_t>(counter >> 32);
      w2[j] = static_cast<uint32_t>(off);
      w3[j] = static_cast<uint32_t>(off >> 32);
    }
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int64_t j = 0; j < count; ++j) {
        const uint64_t p0 = static_cast<uint64_t>(kMul0) * w0[j];
        const uint64_t p1 = static_cast<uint64_t>(kMul1) * w2[j];
        const uint32_t c0 = static_cast<uint32_t>(p1 >> 32) ^ w1[j] ^ k0;
        const uint32_t c2 = static_cast<uint32_t>(p0 >> 32) ^ w3[j] ^ k1;
        w1[j] = static_cast<uint32_t>(p1);
        w3[j] = static_cast<uint32_t>(p0);
        w0[j] = c0;
        w2[j] = c2;
      }
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    float* o = out + 4 * j0;
    for (int64_t j = 0; j < count; ++j) {
      o[4 * j] = transform(w0[j]);
      o[4 * j + 1] = transform(w1[j]);
      o[4 * j + 2] = transform(w2[j]);
      o[4 * j + 3] = transform(w3[j]);
    }
  }
}

#if GMVQ_X86_PATHS
// rng::log_canonical on kChains vectors in step (see exp_chains): the Gumbel
// transform ran 1.8x slower one vector at a time.

GMVQ_VECTOR_INLINE void log_canonical_chains(vfloat (&x)[kChains]) {
  vfloat t[kChains], t2[kChains], e[kChains], y[kChains];
  GMVQ_EACH_CHAIN {
    vint bits;
    std::memcpy(&bits, &x[s], sizeof bits);
    const vint m_bits = (bits & 0x007fffff) | 0x3f000000;
    const vint small = (m_bits < 0x3f3504f3) & 1;  // the comparison gives -1 (true) or 0
    const vint t_bits = m_bits + (small << 23);
    std::memcpy(&t[s], &t_bits, sizeof t_bits);
    t[s] = t[s] + -1.0f;
    e[s] = __builtin_convertvector((bits >> 23) - 126 - small, vfloat);
    t2[s] = t[s] * t[s];
    y[s] = splat(0x1.204376p-4f);
  }
  GMVQ_EACH_CHAIN y[s] = y[s] * t[s] + -0x1.d7a370p-4f;
  GMVQ_EACH_CHAIN y[s] = y[s] * t[s] + 0x1.de4a34p-4f;
  GMVQ_EACH_CHAIN y[s] = y[s] * t[s] + -0x1.fcba9ep-4f;
  GMVQ_EACH_CHAIN y[s] = y[s] * t[s] + 0x1.23d37ep-3f;
  GMVQ_EACH_CHAIN y[s] = y[s] * t[s] + -0x1.555ca0p-3f;
  GMVQ_EACH_CHAIN y[s] = y[s] * t[s] + 0x1.999d58p-3f;
  GMVQ_EACH_CHAIN y[s] = y[s] * t[s] + -0x1.fffff8p-3f;
  GMVQ_EACH_CHAIN y[s] = y[s] * t[s] + 0x1.555554p-2f;
  GMVQ_EACH_CHAIN {
    vfloat r = (y[s] * t[s]) * t2[s];
    r = r + -0x1.bd0106p-13f * e[s];
    r = r + -0.5f * t2[s];
    x[s] = (t[s] + r) + 0x1.63p-1f * e[s];
  }
}

// u from uniform_from_word on 8 * kChains words.
GMVQ_VECTOR_INLINE void uniform_chains(const uint32_t* words, vfloat (&u)[kChains]) {
  GMVQ_EACH_CHAIN {
    vint r;
    std::memcpy(&r, words + kVector * s, sizeof r);
    // r >> 9 as int32 (the logical shift of uniform_from_word: the top 9 bits masked off).
    u[s] = (__builtin_convertvector((r >> 9) & 0x7fffff, vfloat) + 0.5f) * 0x1p-23f;
  }
}

// GumbelWord on 8 * kChains words: -log(-log(u)).
GMVQ_VECTOR_INLINE void gumbel_chains(const uint32_t* words, float* out) {
  vfloat x[kChains];
  uniform_chains(words, x);
  log_canonical_chains(x);
  GMVQ_EACH_CHAIN x[s] = -x[s];
  log_canonical_chains(x);
  GMVQ_EACH_CHAIN store_vector(out + kVector * s, -x[s]);
}

// GaussianWord on 8 * kChains words: sqrt(2) erfinv(2u - 1), the operations of
// rng::erfinv_canonical (3.9 -> 2.5 ns per element on one Zen 3 core).
// target("avx2"): the square root is an AVX intrinsic (correctly rounded, like sqrtf).
__attribute__((target("avx2"))) GMVQ_VECTOR_INLINE void gaussian_chains(const uint32_t* words, float* out) {
  vfloat x[kChains], w[kChains];
  uniform_chains(words, x);
  GMVQ_EACH_CHAIN {
    x[s] = (x[s] + x[s]) + -1.0f;
    w[s] = (1.0f + -x[s]) * (1.0f + x[s]);
  }
  log_canonical_chains(w);
  GMVQ_EACH_CHAIN {
    w[s] = -w[s];  // w > 0
    const vfloat wc = w[s] + -2.5f;
    vfloat central = splat(0x1.e2cb10p-26f);
    central = central * wc + 0x1.70966cp-22f;
    central = central * wc + -0x1.d8e6aep-19f;
    central = central * wc + -0x1.26b582p-18f;
    central = central * wc + 0x1.ca65b6p-13f;
    central = central * wc + -0x1.48a810p-10f;
    central = central * wc + -0x1.11c9dep-8f;
    central = central * wc + 0x1.f91ec6p-3f;
    central = central * wc + 0x1.805c5ep+0f;
    const vfloat wt = vfloat(_mm256_sqrt_ps(__m256(w[s]))) + -3.0f;
    vfloat tail = splat(-0x1.a3e136p-13f);
    tail = tail * wt + 0x1.a76ad6p-14f;
    tail = tail * wt + 0x1.61b8e4p-10f;
    tail = tail * wt + -0x1.e17bcep-9f;
    tail = tail * wt + 0x1.7824f6p-8f;
    tail = tail * wt + -0x1.f38baep-8f;
    tail = tail * wt + 0x1.354afcp-7f;
    tail = tail * wt + 0x1.006db6p+0f;
    tail = tail * wt + 0x1.6a9efcp+1f;
    const vfloat p = w[s] < 5.0f ? central : tail;
    store_vector(out + kVector * s, 0x1.6a09e6p+0f * (p * x[s]));
  }
}

// fill_aligned for AVX2 machines without AVX-512 (Zen 3 and older): the Philox
// rounds on 2 x 8 blocks at a time in intrinsics, and the Gumbel transform on
// kChains vectors in step. GCC lowers the vector form of the 32 x 32 -> 64-bit
// products above to a full 64-bit multiply (three vpmuludq and shuffles per
// product); here each round is four vpmuludq and blends. Gumbel noise: 5.0 ->
// 2.1 ns per element on one Zen 3 core (the bits alone 2.1 -> 1.0). Same words,
// same operations, same bits.
template <typename Transform>
__attribute__((target("avx2"))) void fill_aligned_avx2(int64_t seed, int64_t offset, uint64_t stream,
                                                       uint64_t first_block, int64_t blocks, float* __restrict out) {
  constexpr int64_t kChunk = 64;  // blocks per transform pass (a multiple of 8 * kPhiloxGroups)
  constexpr int kPhiloxGroups = 2;
  const Transform transform;
  const uint64_t key = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
  const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  alignas(32) uint32_t words[4 * kChunk];
  alignas(32) uint32_t counter_lo[8], counter_hi[8];
  __m256i round_key0[10], round_key1[10];
  for (int round = 0; round < 10; ++round) {
    round_key0[round] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key) + round * 0x9E3779B9u));
    round_key1[round] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key >> 32) + round * 0xBB67AE85u));
  }
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j0 = 0; j0 < blocks; j0 += kChunk) {
    const int64_t count = std::min(kChunk, blocks - j0);
    // Two groups of 8 blocks per step: a round is a chain of dependent
    // multiplies, and one group alone leaves the pipes idle.
    for (int64_t v = 0; v < count; v += 8 * kPhiloxGroups) {  // the last groups may run past count: unused words
      __m256i c0[kPhiloxGroups], c1[kPhiloxGroups], c2[kPhiloxGroups], c3[kPhiloxGroups];
      for (int group = 0; group < kPhiloxGroups; ++group) {
        const uint64_t counter = first_block + static_cast<uint64_t>(j0 + v + 8 * group) + (stream << 62);
        if (static_cast<uint32_t>(counter) <= 0xFFFFFFFFu - 7) {  // no carry into the high word
          c0[group] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter))), lane_index);
          c1[group] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter >> 32)));
        } else {
          for (int j = 0; j < 8; ++j) {
            counter_lo[j] = static_cast<uint32_t>(counter + j);
            counter_hi[j] = static_cast<uint32_t>((counter + j) >> 32);
          }
          c0[group] = _mm256_load_si256(reinterpret_cast<const __m256i*>(counter_lo));
          c1[group] = _mm256_load_si256(reinterpret_cast<const __m256i*>(counter_hi));
        }
        c2[group] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(off)));
        c3[group] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(off >> 32)));
      }
      for (int round = 0; round < 10; ++round) {
        for (int group = 0; group < kPhiloxGroups; ++group) {
          // 64-bit products of the even lanes, and of the odd lanes shifted down;
          // blend 0xAA takes the odd 32-bit lanes from the second operand.
          const __m256i even0 = _mm256_mul_epu32(c0[group], mul0);
          const __m256i odd0 = _mm256_mul_epu32(_mm256_srli_epi64(c0[group], 32), mul0);
          const __m256i even1 = _mm256_mul_epu32(c2[group], mul1);
          const __m256i odd1 = _mm256_mul_epu32(_mm256_srli_epi64(c2[group], 32), mul1);
          const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(even0, 32), odd0, 0xAA);
          const __m256i lo0 = _mm256_blend_epi32(even0, _mm256_slli_epi64(odd0, 32), 0xAA);
          const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(even1, 32), odd1, 0xAA);
          const __m256i lo1 = _mm256_blend_epi32(even1, _mm256_slli_epi64(odd1, 32), 0xAA);
          c0[group] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[group]), round_key0[round]);
          c2[group] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[group]), round_key1[round]);
          c1[group] = lo1;
          c3[group] = lo0;
        }
      }
      for (int group = 0; group < kPhiloxGroups; ++group) {
        // 4 words x 8 blocks -> 8 blocks of 4 consecutive words.
        const __m256i w01_lo = _mm256_unpacklo_epi32(c0[group], c1[group]);
        const __m256i w01_hi = _mm256_unpackhi_epi32(c0[group], c1[group]);
        const __m256i w23_lo = _mm256_unpacklo_epi32(c2[group], c3[group]);
        const __m256i w23_hi = _mm256_unpackhi_epi32(c2[group], c3[group]);
        const __m256i b04 = _mm256_unpacklo_epi64(w01_lo, w23_lo), b15 = _mm256_unpackhi_epi64(w01_lo, w23_lo);
        const __m256i b26 = _mm256_unpacklo_epi64(w01_hi, w23_hi), b37 = _mm256_unpackhi_epi64(w01_hi, w23_hi);
        __m256i* dst = reinterpret_cast<__m256i*>(words + 4 * (v + 8 * group));
        _mm256_store_si256(dst + 0, _mm256_permute2x128_si256(b04, b15, 0x20));
        _mm256_store_si256(dst + 1, _mm256_permute2x128_si256(b26, b37, 0x20));
        _mm256_store_si256(dst + 2, _mm256_permute2x128_si256(b04, b15, 0x31));
        _mm256_store_si256(dst + 3, _mm256_permute2x128_si256(b26, b37, 0x31));
      }
    }
    float* o = out + 4 * j0;
    int64_t i = 0;
    if constexpr (std::is_same_v<Transform, GumbelWord>) {
      for (; i + kVector * kChains <= 4 * count; i += kVector * kChains) gumbel_chains(words + i, o + i);
    } else if constexpr (std::is_same_v<Transform, GaussianWord>) {
      for (; i + kVector * kChains <= 4 * count; i += kVector * kChains) gaussian_chains(words + i, o + i);
    }
    for (; i < 4 * count; ++i) o[i] = transform(words[i]);
  }
}

// AVX-512 machines keep the cloned loop (16 lanes); AVX2-only ones take the
// intrinsics. GMVQ_CPU_PORTABLE_NOISE=1 forces the cloned loop, so that the
// tests check both paths' bits on one machine.
inline bool avx2_philox() {
  static const bool use = __builtin_cpu_supports("avx2") && !__builtin_cpu_supports("avx512f") &&
                          std::getenv("GMVQ_CPU_PORTABLE_NOISE") == nullptr;
  return use;
}
#endif

// Elements [first, first + count) of `stream` through `transform`: the
// 4-aligned middle vectorised, the unaligned ends one word at a time.
template <typename Transform>
void fill_noise(int64_t seed, int64_t offset, uint64_t stream, uint64_t first, int64_t count, float* out) {
  const Transform transform;
  const int64_t head = std::min<int64_t>(count, static_cast<int64_t>((4 - (first & 3)) & 3));
  rng::fill_range(seed, offset, stream, first, head, out, transform);
  const int64_t blocks = (count - head) / 4;
#if GMVQ_X86_PATHS
  if (avx2_philox()) {
    fill_aligned_avx2<Transform>(seed, offset, stream, (first + head) / 4, blocks, out + head);
  } else {
    fill_aligned<Transform>(seed, offset, stream, (first + head) / 4, blocks, out + head);
  }
#else
  fill_aligned<Transform>(seed, offset, stream, (first + head) / 4, blocks, out + head);
#endif
  const int64_t done = head + 4 * blocks;
  rng::fill_range(seed, offset, stream, first + done, count - done, out + done, transform);
}

inline void fill_gumbel(int64_t seed, int64_t offset, uint64_t first, int64_t count, float* out) {
  fill_noise<GumbelWord>(seed, offset, rng::kGumbelStream, first, count, out);
}

inline void fill_gaussian(int64_t seed, int64_t offset, uint64_t first, int64_t count, float* out) {
  fill_noise<GaussianWord>(seed, offset, rng::kGaussianStream, first, count, out);
}

// A row's Gumbel noise is made kNoiseChunk values at a time and used while
// still in L1 (a whole row of it is 64 KiB at K = 16384).
constexpr int64_t kNoiseChunk = 1024;

// out[i] = l[i] + g[i], g the Gumbel noise of elements [first, first + n),
// made through `noise` (min(n, kNoiseChunk) floats); returns max_i out[i]
// (NaN if one is), as row_max(out) would (out may alias l).
GMVQ_CLONES static float perturb_row_max(int64_t seed, int64_t offset, uint64_t first, const float* l, float* noise,
                                         float* out, int64_t n) {
  static_assert(kNoiseChunk % kVector == 0, "only the last chunk may end in a partial vector");
  RunningMax running;
  int64_t i = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kNoiseChunk) {
    const int64_t count = std::min(kNoiseChunk, n - j0);
    fill_gumbel(seed, offset, first + static_cast<uint64_t>(j0), count, noise);
    for (i = j0; i + kVector <= j0 + count; i += kVector) {
      const vfloat v = load_vector(l + i) + load_vector(noise + (i - j0));
      store_vector(out + i, v);
      running.take(v);
    }
    for (int64_t j = i; j < j0 + count; ++j) out[j] = l[j] + noise[j - j0];
  }
  return running.finish(out + i, n - i);
}

// The same for double logits: float noise, one rounding in double (what the
// reference does).
inline double perturb_row_max(int64_t seed, int64_t offset, uint64_t first, const double* l, float* noise,
                              double* out, int64_t n) {
  for (int64_t j0 = 0; j0 < n; j0 += kNoiseChunk) {
    const int64_t count = std::min(kNoiseChunk, n - j0);
    fill_gumbel(seed, offset, first + static_cast<uint64_t>(j0), count, noise);
    for (int64_t j = 0; j < count; ++j) out[j0 + j] = l[j0 + j] + static_cast<double>(noise[j]);
  }
  return row_max(out, n);
}

// philox_noise's distributions.
inline void fill_noise(rng::NoiseDistribution kind, int64_t seed, int64_t offset, uint64_t first, int64_t count,
                       float* out) {
  switch (kind) {
    case rng::NoiseDistribution::kUniform:
      fill_noise<UniformWord>(seed, offset, rng::kGumbelStream, first, count, out);
      break;
    case rng::NoiseDistribution::kGumbel:
      fill_gumbel(seed, offset, first, count, out);
      break;
    case rng::NoiseDistribution::kGaussian:
      fill_gaussian(seed, offset, first, count, out);
      break;
  }
}

#undef GMVQ_EACH_CHAIN
#undef GMVQ_SINK
#pragma GCC diagnostic pop

}  // namespace gmvq::cpu::row
