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
// -ffp-contract=off), so results are bitwise identical whichever copy runs.
// Reductions use 16 fixed partial sums combined in a fixed order: vectorisable
// without -ffast-math, and independent of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "gmvq/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GMVQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GMVQ_CLONES
#endif

namespace gmvq::cpu::row {

constexpr int kLanes = 16;

// --- 16-lane vectors ------------------------------------------------------------
// Helpers on vector types are always inlined into the cloned callers, so the
// vector calling convention (-Wpsabi, silenced to the end of the file) never matters.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#define GMVQ_VECTOR_INLINE inline __attribute__((always_inline))
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

GMVQ_VECTOR_INLINE f32x16 splat(float v) { return f32x16{} + v; }

GMVQ_VECTOR_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

GMVQ_VECTOR_INLINE void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// Up to 16 values from p, the rest `fill`.
GMVQ_VECTOR_INLINE f32x16 load_tail(const float* p, int64_t count, float fill) {
  float tail[kLanes];
  for (int j = 0; j < kLanes; ++j) tail[j] = j < count ? p[j] : fill;
  return load16(tail);
}

// Cephes expf (relative error < 1e-7) on 16 lanes. Every select is a vector
// select, so nothing branches. Arguments below -87.3 (and -inf) give 0; NaN
// stays NaN.
GMVQ_VECTOR_INLINE f32x16 exp16(f32x16 x) {
  const i32x16 underflow = x < -87.33654f;
  const i32x16 nan = x != x;
  f32x16 c = underflow ? splat(-87.33654f) : x;
  c = c > 88.0f ? splat(88.0f) : c;
  c = nan ? splat(0.0f) : c;
  // fx = floor(c log2(e) + 1/2), from the truncation (c is in range for int32).
  const f32x16 t = c * 1.44269504088896341f + 0.5f;
  const i32x16 truncated = __builtin_convertvector(t, i32x16);
  const f32x16 tf = __builtin_convertvector(truncated, f32x16);
  const f32x16 fx = tf > t ? tf - 1.0f : tf;
  f32x16 r = c - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const f32x16 r2 = r * r;
  f32x16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const i32x16 exponent = (__builtin_convertvector(fx, i32x16) + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  const f32x16 result = p * scale;
  return nan ? x : (underflow ? splat(0.0f) : result);
}

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
  const float inf = std::numeric_limits<float>::infinity();
  f32x16 m = splat(-inf);
  f32x16 nan = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const f32x16 v = load16(x + i);
    m = v > m ? v : m;
    nan = v != v ? v : nan;
  }
  float best = -inf, any_nan = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    best = m[j] > best ? m[j] : best;
    any_nan = nan[j] != nan[j] ? nan[j] : any_nan;
  }
  for (; i < n; ++i) {
    best = x[i] > best ? x[i] : best;
    any_nan = x[i] != x[i] ? x[i] : any_nan;
  }
  return any_nan != any_nan ? any_nan : best;
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

// --- exponentials -------------------------------------------------------------------
// out[i] = exp(x[i] * scale - shift) (x and out may alias); returns sum_i out[i].
GMVQ_CLONES static float exp_affine_row(const float* x, float scale, float shift, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store16(out + i, exp16(load16(x + i) * scale - shift));
  if (i < n) {
    const f32x16 e = exp16(load_tail(x + i, n - i, 0.0f) * scale - shift);
    for (int64_t j = i; j < n; ++j) out[j] = e[j - i];
  }
  return row_sum(out, n);
}

inline double exp_affine_row(const double* x, double scale, double shift, double* out, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(x[i] * scale - shift);
    total += out[i];
  }
  return total;
}

// sum_i exp(x[i] * scale - shift), nothing stored.
GMVQ_CLONES static float exp_affine_sum(const float* x, float scale, float shift, int64_t n) {
  f32x16 total = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) total += exp16(load16(x + i) * scale - shift);
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += total[j];
  if (i < n) {
    const f32x16 e = exp16(load_tail(x + i, n - i, 0.0f) * scale - shift);
    for (int64_t j = 0; j < n - i; ++j) sum += e[j];
  }
  return sum;
}

inline double exp_affine_sum(const double* x, double scale, double shift, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += std::exp(x[i] * scale - shift);
  return total;
}

// logsumexp_i (x[i] * scale), scale > 0 (the max commutes with it).
template <typename T>
T log_sum_exp(const T* x, T scale, int64_t n) {
  const T m = row_max(x, n) * scale;
  if (!(std::abs(m) < std::numeric_limits<T>::infinity())) return m;  // NaN, +-inf: the row's verdict
  return m + std::log(exp_affine_sum(x, scale, m, n));
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
// rng::gumbel_from_bits with the uniform built through int32 (exact:
// r >> 9 < 2^23), because AVX2 has no uint32 -> float conversion.
inline float gumbel_from_word(uint32_t r) {
  const float bits23 = static_cast<float>(static_cast<int32_t>(r >> 9));
  const float u = rng::mul_rn(rng::add_rn(bits23, 0.5f), 0x1p-23f);
  return -rng::log_canonical(-rng::log_canonical(u));
}

// Gumbel noise for the 4 * blocks elements starting at element 4 * first_block,
// equal bit for bit to rng::fill_gumbel. The Philox words are produced into four
// lane arrays so that both loops vectorise.
GMVQ_CLONES static void gumbel_aligned(int64_t seed, int64_t offset, uint64_t first_block, int64_t blocks,
                                       float* __restrict out) {
  constexpr int64_t kChunk = 64;
  uint32_t w0[kChunk], w1[kChunk], w2[kChunk], w3[kChunk];
  for (int64_t j0 = 0; j0 < blocks; j0 += kChunk) {
    const int64_t count = std::min(kChunk, blocks - j0);
    for (int64_t j = 0; j < count; ++j) {
      const rng::Philox4 w = rng::philox_block(seed, offset, rng::kGumbelStream, first_block + j0 + j);
      w0[j] = w.word[0];
      w1[j] = w.word[1];
      w2[j] = w.word[2];
      w3[j] = w.word[3];
    }
    float* o = out + 4 * j0;
    for (int64_t j = 0; j < count; ++j) {
      o[4 * j] = gumbel_from_word(w0[j]);
      o[4 * j + 1] = gumbel_from_word(w1[j]);
      o[4 * j + 2] = gumbel_from_word(w2[j]);
      o[4 * j + 3] = gumbel_from_word(w3[j]);
    }
  }
}

// Gumbel noise of elements [first, first + count) of stream 0: rng::fill_gumbel's
// values, with the 4-aligned middle vectorised.
inline void fill_gumbel(int64_t seed, int64_t offset, uint64_t first, int64_t count, float* out) {
  const int64_t head = std::min<int64_t>(count, static_cast<int64_t>((4 - (first & 3)) & 3));
  rng::fill_gumbel(seed, offset, first, head, out);
  const int64_t blocks = (count - head) / 4;
  gumbel_aligned(seed, offset, (first + head) / 4, blocks, out + head);
  const int64_t done = head + 4 * blocks;
  rng::fill_gumbel(seed, offset, first + done, count - done, out + done);
}

#pragma GCC diagnostic pop

}  // namespace gmvq::cpu::row
