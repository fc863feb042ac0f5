// Row kernels of the fused CPU quantize (csrc/cpu/quantize.cpp): noise fills,
// exponentials, softmax and reductions over one row of K (or D) values.
//
// Why here and not at::vec: this translation unit is compiled for baseline
// x86-64, so at::vec would fall back to scalar code. The float loops below are
// written so that GCC vectorises them, and GCC_CLONES builds AVX-512 and AVX2
// copies picked at load time. All copies do the same correctly rounded IEEE
// operations in the same order (no FMA contraction: -ffp-contract=off), so
// results are bitwise identical whichever copy runs.
//
// Reductions use 16 fixed partial sums combined in a fixed order: vectorisable
// without -ffast-math, and independent of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "gmvq/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GMVQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GMVQ_CLONES
#endif

namespace gmvq::quantize_rowmath {

constexpr int kLanes = 16;

// --- exponential -----------------------------------------------------------
// Cephes expf (relative error ~1e-7), branch-free so that it vectorises.
// Arguments below -87.3 give 0, like expf's underflow.
inline float exp_poly(float x) {
  const bool underflow = x < -87.33654f;
  float c = underflow ? -87.33654f : x;
  c = c > 88.0f ? 88.0f : c;
  const float fx = std::floor(c * 1.44269504088896341f + 0.5f);
  float r = c - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const float scale = rng::bits_float((static_cast<int32_t>(fx) + 127) << 23);
  return underflow ? 0.0f : p * scale;
}

// --- reductions ---------------------------------------------------------------
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

template <typename T>
T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// First index of the maximum (ties to the lowest index; a NaN wins, like torch.argmax).
template <typename T>
int64_t row_argmax(const T* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (std::isnan(x[best])) break;
    if (x[i] > x[best] || std::isnan(x[i])) best = i;
  }
  return best;
}

// --- softmax ------------------------------------------------------------------
// out = softmax(x / temperature) over the row (x and out may alias);
// temperature 1 gives pi, the Gumbel-softmax divides like reference.py does.
GMVQ_CLONES static void softmax_row(const float* x, float temperature, float* out, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] / temperature;
    m = v > m ? v : m;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = exp_poly(x[i] / temperature - m);
  const float inv = 1.0f / row_sum(out, n);
  for (int64_t i = 0; i < n; ++i) out[i] *= inv;
}

inline void softmax_row(const double* x, double temperature, double* out, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i] / temperature);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(x[i] / temperature - m);
    total += out[i];
  }
  for (int64_t i = 0; i < n; ++i) out[i] /= total;
}

// --- noise -----------------------------------------------------------------------
// Gumbel noise for the 4 * blocks elements starting at element 4 * first_block,
// equal bit for bit to rng::fill_gumbel. The Philox words are produced into four
// lane arrays so that both loops vectorise; the uniform is built through int32
// (exact: r >> 9 < 2^23) because AVX2 has no uint32 -> float conversion.
GMVQ_CLONES static void gumbel_aligned(int64_t seed, int64_t offset, uint64_t first_block,
                                       int64_t blocks, float* __restrict out) {
  constexpr int64_t kChunk = 64;
  uint32_t words[4][kChunk];
  for (int64_t j0 = 0; j0 < blocks; j0 += kChunk) {
    const int64_t count = std::min(kChunk, blocks - j0);
    for (int64_t j = 0; j < count; ++j) {
      const rng::Philox4 w = rng::philox_block(seed, offset, rng::kGumbelStream, first_block + j0 + j);
      words[0][j] = w.word[0];
      words[1][j] = w.word[1];
      words[2][j] = w.word[2];
      words[3][j] = w.word[3];
    }
    float* o = out + 4 * j0;
    for (int64_t j = 0; j < count; ++j) {
      for (int q = 0; q < 4; ++q) {
        const float bits23 = static_cast<float>(static_cast<int32_t>(words[q][j] >> 9));
        const float u = rng::mul_rn(rng::add_rn(bits23, 0.5f), 0x1p-23f);
        o[4 * j + q] = -rng::log_canonical(-rng::log_canonical(u));
      }
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

}  // namespace gmvq::quantize_rowmath
