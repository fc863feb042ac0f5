// Row kernels shared by the CPU ops: reductions, argmax, exponentials and
// softmax over one row of K (or D) values.
//
// One NaN rule for every op, torch's: a NaN anywhere in a row makes it the
// row's maximum (row_argmax returns the first NaN's index, like torch.argmax)
// and propagates through every softmax and sum of that row.
// Reductions use 16 fixed partial sums combined in a fixed order: vectorisable
// without -ffast-math, and independent of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string_view>

#include <c10/util/Exception.h>

#include "vector.h"

namespace gmvq::cpu::row {

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
// above reads half the row on average, one element at a time.
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

// --- exponentials -------------------------------------------------------------------
// The float kernels, three times (exp_rows.inc): portable (GMVQ_CLONES:
// AVX-512, AVX2 and baseline copies of the same IEEE operations, hence the
// same bits), and with fused multiply-adds on 8 floats (AVX2 + FMA) or on 16
// (AVX-512). The FMA copies give other bits than the portable one (FMA rounds
// once), and their sums other orders, like the BLAS does from one CPU to
// another; each is deterministic. The widest the CPU has runs, unless
// GMVQ_CPU_EXP_PATH=portable, avx2 or avx512 names another it supports (the
// tests check every path of their machine).
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

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
// exp_rows.inc's vocabulary, 16 floats wide.
typedef vfloat16 vfloat;
typedef vint16 vint;
constexpr int kVector = 16;
GMVQ_VECTOR_INLINE vfloat splat(float v) { return vfloat{} + v; }
GMVQ_VECTOR_INLINE vfloat load_vector(const float* p) { return load_as<vfloat>(p); }
GMVQ_VECTOR_INLINE vfloat load_tail(const float* p, int64_t count, float fill) {
  return load_tail_as<vfloat>(p, count, fill);
}
#define GMVQ_EXP_MADD(a, b, c) vfloat(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(c)))
#define GMVQ_EXP_ROW static
#include "exp_rows.inc"
#undef GMVQ_EXP_MADD
#undef GMVQ_EXP_ROW
}  // namespace avx512
#pragma GCC pop_options
#endif

// The float exponential kernels of one path.
struct ExpKernels {
  float (*row)(const float*, float, float, float*, int64_t);
  float (*dot)(const float*, float, float, const float*, float*, int64_t);
  float (*sum)(const float*, float, float, int64_t);
};

inline const ExpKernels& exp_kernels() {
  static const ExpKernels kernels = [] {
    const ExpKernels portable_kernels{portable::exp_affine_row, portable::exp_affine_dot, portable::exp_affine_sum};
#if GMVQ_X86_PATHS
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = __builtin_cpu_supports("avx512f");
    const ExpKernels avx2_kernels{avx2_fma::exp_affine_row, avx2_fma::exp_affine_dot, avx2_fma::exp_affine_sum};
    const ExpKernels avx512_kernels{avx512::exp_affine_row, avx512::exp_affine_dot, avx512::exp_affine_sum};
#else
    const bool avx2 = false, avx512 = false;
    const ExpKernels avx2_kernels = portable_kernels, avx512_kernels = portable_kernels;
#endif
    const char* forced = std::getenv("GMVQ_CPU_EXP_PATH");
    if (forced == nullptr) return avx512 ? avx512_kernels : avx2 ? avx2_kernels : portable_kernels;
    const std::string_view name(forced);
    if (name == "portable") return portable_kernels;
    if (name == "avx2" && avx2) return avx2_kernels;
    if (name == "avx512" && avx512) return avx512_kernels;
    TORCH_CHECK(false, "GMVQ_CPU_EXP_PATH=", name, ": this CPU's exponential paths are portable",
                avx2 ? ", avx2" : "", avx512 ? ", avx512" : "");
  }();
  return kernels;
}

// out[i] = exp(x[i] * scale - shift) (x and out may alias); returns sum_i out[i].
inline float exp_affine_row(const float* x, float scale, float shift, float* out, int64_t n) {
  return exp_kernels().row(x, scale, shift, out, n);
}

// out[i] = exp(x[i] * scale - shift) (x and out may alias); returns sum_i out[i] * w[i].
inline float exp_affine_dot(const float* x, float scale, float shift, const float* w, float* out, int64_t n) {
  return exp_kernels().dot(x, scale, shift, w, out, n);
}

// sum_i exp(x[i] * scale - shift), nothing stored.
inline float exp_affine_sum(const float* x, float scale, float shift, int64_t n) {
  return exp_kernels().sum(x, scale, shift, n);
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

}  // namespace gmvq::cpu::row
