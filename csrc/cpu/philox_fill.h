// The Philox noise of csrc/include/gmvq/philox.h, vectorised for the CPU:
// many consecutive elements of a stream at a time, bit for bit what
// rng::fill_range gives (so the reference's bits too). Three paths, the best
// the CPU has picked at run time: AVX-512 intrinsics, AVX2 intrinsics, and a
// portable loop GCC vectorises (GMVQ_CLONES). GMVQ_CPU_NOISE_PATH=portable,
// avx2 or avx512 forces one the CPU supports, so that the tests check every
// path on one machine. The transforms never use FMA: their bits are the reference's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

#include <c10/util/Exception.h>

#include "gmvq/philox.h"
#include "row_math.h"
#include "vector.h"

namespace gmvq::cpu::row {

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
    for (int round = 0; round < rng::kPhiloxRounds; ++round) {
      for (int64_t j = 0; j < count; ++j) {
        const uint64_t p0 = static_cast<uint64_t>(rng::kPhiloxMul0) * w0[j];
        const uint64_t p1 = static_cast<uint64_t>(rng::kPhiloxMul1) * w2[j];
        const uint32_t c0 = static_cast<uint32_t>(p1 >> 32) ^ w1[j] ^ k0;
        const uint32_t c2 = static_cast<uint32_t>(p0 >> 32) ^ w3[j] ^ k1;
        w1[j] = static_cast<uint32_t>(p1);
        w3[j] = static_cast<uint32_t>(p0);
        w0[j] = c0;
        w2[j] = c2;
      }
      k0 += rng::kPhiloxWeyl0;
      k1 += rng::kPhiloxWeyl1;
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
// rng::log_canonical on kChains vectors in step (see exp_chains): one vector
// at a time, the Gumbel transform's dependent chain left the pipes idle. VF,
// VI: float and int32 vectors of one width (8 or 16 lanes).
template <typename VF, typename VI>
GMVQ_VECTOR_INLINE void log_canonical_chains(VF (&x)[kChains]) {
  VF t[kChains], t2[kChains], e[kChains], y[kChains];
  GMVQ_EACH_CHAIN {
    VI bits;
    std::memcpy(&bits, &x[s], sizeof bits);
    const VI m_bits = (bits & 0x007fffff) | 0x3f000000;
    const VI small = (m_bits < 0x3f3504f3) & 1;  // the comparison gives -1 (true) or 0
    const VI t_bits = m_bits + (small << 23);
    std::memcpy(&t[s], &t_bits, sizeof t_bits);
    t[s] = t[s] + -1.0f;
    e[s] = __builtin_convertvector((bits >> 23) - 126 - small, VF);
    t2[s] = t[s] * t[s];
    y[s] = VF{} + 0x1.204376p-4f;
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
    VF r = (y[s] * t[s]) * t2[s];
    r = r + -0x1.bd0106p-13f * e[s];
    r = r + -0.5f * t2[s];
    x[s] = (t[s] + r) + 0x1.63p-1f * e[s];
  }
}

// u from uniform_from_word on kChains vectors of words.
template <typename VF, typename VI>
GMVQ_VECTOR_INLINE void uniform_chains(const uint32_t* words, VF (&u)[kChains]) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  GMVQ_EACH_CHAIN {
    VI r;
    std::memcpy(&r, words + lanes * s, sizeof r);
    // r >> 9 as int32 (the logical shift of uniform_from_word: the top 9 bits masked off).
    u[s] = (__builtin_convertvector((r >> 9) & 0x7fffff, VF) + 0.5f) * 0x1p-23f;
  }
}

// GumbelWord on kChains vectors of words: -log(-log(u)).
template <typename VF, typename VI>
GMVQ_VECTOR_INLINE void gumbel_chains(const uint32_t* words, float* out) {
  constexpr int lanes = sizeof(VF) / sizeof(float);
  VF x[kChains];
  uniform_chains<VF, VI>(words, x);
  log_canonical_chains<VF, VI>(x);
  GMVQ_EACH_CHAIN x[s] = -x[s];
  log_canonical_chains<VF, VI>(x);
  GMVQ_EACH_CHAIN {
    const VF g = -x[s];
    std::memcpy(out + lanes * s, &g, sizeof g);
  }
}

// GaussianWord on 8 * kChains words: sqrt(2) erfinv(2u - 1), the operations of
// rng::erfinv_canonical. Only the AVX2 width: the Gaussian noise is D values a
// row, the Gumbel noise K.
// target("avx2"): the square root is an AVX intrinsic (correctly rounded, like sqrtf).
__attribute__((target("avx2"))) GMVQ_VECTOR_INLINE void gaussian_chains(const uint32_t* words, float* out) {
  vfloat x[kChains], w[kChains];
  uniform_chains<vfloat, vint>(words, x);
  GMVQ_EACH_CHAIN {
    x[s] = (x[s] + x[s]) + -1.0f;
    w[s] = (1.0f + -x[s]) * (1.0f + x[s]);
  }
  log_canonical_chains<vfloat, vint>(w);
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

// The fills in intrinsics (philox_simd.inc), for AVX2 machines without
// AVX-512 (Zen 3 and older) and for AVX-512 ones. The portable loop's clones
// get the Philox products as full 64-bit multiplies (three vpmuludq and
// shuffles each); here each product is two vpmuludq (even and odd lanes)
// recombined by blends, and the Gumbel transform runs on kChains vectors in
// step (git log has the timings). Same words, same operations, same bits.
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
using Words = __m256i;
constexpr int kBlocks = 8;
GMVQ_VECTOR_INLINE Words splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
GMVQ_VECTOR_INLINE Words add(Words a, Words b) { return _mm256_add_epi32(a, b); }
GMVQ_VECTOR_INLINE Words load(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const Words*>(p)); }
GMVQ_VECTOR_INLINE Words bitwise_xor(Words a, Words b) { return _mm256_xor_si256(a, b); }

// The 64-bit products of the even lanes, and of the odd lanes shifted down;
// blend 0xAA takes the odd 32-bit lanes from the second operand.
GMVQ_VECTOR_INLINE void products(Words c, Words mul, Words& hi, Words& lo) {
  const Words even = _mm256_mul_epu32(c, mul), odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), mul);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// 4 words x 8 blocks -> 8 blocks of 4 consecutive words.
GMVQ_VECTOR_INLINE void store_blocks(uint32_t* dst, Words c0, Words c1, Words c2, Words c3) {
  const Words w01_lo = _mm256_unpacklo_epi32(c0, c1), w01_hi = _mm256_unpackhi_epi32(c0, c1);
  const Words w23_lo = _mm256_unpacklo_epi32(c2, c3), w23_hi = _mm256_unpackhi_epi32(c2, c3);
  const Words b04 = _mm256_unpacklo_epi64(w01_lo, w23_lo), b15 = _mm256_unpackhi_epi64(w01_lo, w23_lo);
  const Words b26 = _mm256_unpacklo_epi64(w01_hi, w23_hi), b37 = _mm256_unpackhi_epi64(w01_hi, w23_hi);
  Words* out = reinterpret_cast<Words*>(dst);
  _mm256_store_si256(out + 0, _mm256_permute2x128_si256(b04, b15, 0x20));
  _mm256_store_si256(out + 1, _mm256_permute2x128_si256(b26, b37, 0x20));
  _mm256_store_si256(out + 2, _mm256_permute2x128_si256(b04, b15, 0x31));
  _mm256_store_si256(out + 3, _mm256_permute2x128_si256(b26, b37, 0x31));
}

// The Gumbel and Gaussian transforms on 8-float chains, the rest one word at a time.
template <typename Transform>
GMVQ_VECTOR_INLINE void transform_words(const uint32_t* words, float* out, int64_t n) {
  const Transform transform;
  int64_t i = 0;
  if constexpr (std::is_same_v<Transform, GumbelWord>) {
    for (; i + kVector * kChains <= n; i += kVector * kChains) gumbel_chains<vfloat, vint>(words + i, out + i);
  } else if constexpr (std::is_same_v<Transform, GaussianWord>) {
    for (; i + kVector * kChains <= n; i += kVector * kChains) gaussian_chains(words + i, out + i);
  }
  for (; i < n; ++i) out[i] = transform(words[i]);
}

#include "philox_simd.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
using Words = __m512i;
constexpr int kBlocks = 16;
GMVQ_VECTOR_INLINE Words splat(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
GMVQ_VECTOR_INLINE Words add(Words a, Words b) { return _mm512_add_epi32(a, b); }
GMVQ_VECTOR_INLINE Words load(const uint32_t* p) { return _mm512_load_si512(p); }
GMVQ_VECTOR_INLINE Words bitwise_xor(Words a, Words b) { return _mm512_xor_si512(a, b); }

// As avx2::products, with a mask for the odd 32-bit lanes.
GMVQ_VECTOR_INLINE void products(Words c, Words mul, Words& hi, Words& lo) {
  const Words even = _mm512_mul_epu32(c, mul), odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), mul);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// 4 words x 16 blocks -> 16 blocks of 4 consecutive words. Within each 128-bit
// lane l, as in AVX2, b_j holds block 4 l + j's four words; then a 4 x 4
// transpose of 128-bit lanes: output register q holds blocks 4 q .. 4 q + 3.
GMVQ_VECTOR_INLINE void store_blocks(uint32_t* dst, Words c0, Words c1, Words c2, Words c3) {
  const Words w01_lo = _mm512_unpacklo_epi32(c0, c1), w01_hi = _mm512_unpackhi_epi32(c0, c1);
  const Words w23_lo = _mm512_unpacklo_epi32(c2, c3), w23_hi = _mm512_unpackhi_epi32(c2, c3);
  const Words b0 = _mm512_unpacklo_epi64(w01_lo, w23_lo), b1 = _mm512_unpackhi_epi64(w01_lo, w23_lo);
  const Words b2 = _mm512_unpacklo_epi64(w01_hi, w23_hi), b3 = _mm512_unpackhi_epi64(w01_hi, w23_hi);
  const Words t0 = _mm512_shuffle_i32x4(b0, b1, 0x44), t1 = _mm512_shuffle_i32x4(b2, b3, 0x44);
  const Words t2 = _mm512_shuffle_i32x4(b0, b1, 0xEE), t3 = _mm512_shuffle_i32x4(b2, b3, 0xEE);
  _mm512_store_si512(dst, _mm512_shuffle_i32x4(t0, t1, 0x88));
  _mm512_store_si512(dst + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
  _mm512_store_si512(dst + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
  _mm512_store_si512(dst + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
}

// The Gumbel transform on 16-float chains first; the rest as avx2's.
template <typename Transform>
GMVQ_VECTOR_INLINE void transform_words(const uint32_t* words, float* out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<Transform, GumbelWord>) {
    for (; i + 16 * kChains <= n; i += 16 * kChains) gumbel_chains<vfloat16, vint16>(words + i, out + i);
  }
  avx2::transform_words<Transform>(words + i, out + i, n - i);
}

#include "philox_simd.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

// Which fill the CPU takes: the widest it has, unless GMVQ_CPU_NOISE_PATH
// names another it supports (the tests run every path of their machine).
enum class NoisePath { kPortable, kAvx2, kAvx512 };

inline NoisePath noise_path() {
  static const NoisePath path = [] {
#if GMVQ_X86_PATHS
    const bool avx2 = __builtin_cpu_supports("avx2"), avx512 = __builtin_cpu_supports("avx512f");
#else
    const bool avx2 = false, avx512 = false;
#endif
    const char* forced = std::getenv("GMVQ_CPU_NOISE_PATH");
    if (forced == nullptr) return avx512 ? NoisePath::kAvx512 : avx2 ? NoisePath::kAvx2 : NoisePath::kPortable;
    const std::string_view name(forced);
    if (name == "portable") return NoisePath::kPortable;
    if (name == "avx2" && avx2) return NoisePath::kAvx2;
    if (name == "avx512" && avx512) return NoisePath::kAvx512;
    TORCH_CHECK(false, "GMVQ_CPU_NOISE_PATH=", name, ": this CPU's noise paths are portable",
                avx2 ? ", avx2" : "", avx512 ? ", avx512" : "");
  }();
  return path;
}

// Elements [first, first + count) of `stream` through `transform`: the
// 4-aligned middle vectorised, the unaligned ends one word at a time.
template <typename Transform>
void fill_noise(int64_t seed, int64_t offset, uint64_t stream, uint64_t first, int64_t count, float* out) {
  const Transform transform;
  const int64_t head = std::min<int64_t>(count, static_cast<int64_t>((4 - (first & 3)) & 3));
  rng::fill_range(seed, offset, stream, first, head, out, transform);
  const int64_t blocks = (count - head) / 4;
  const uint64_t first_block = (first + head) / 4;
  switch (noise_path()) {
#if GMVQ_X86_PATHS
    case NoisePath::kAvx512:
      avx512::fill_aligned<Transform>(seed, offset, stream, first_block, blocks, out + head);
      break;
    case NoisePath::kAvx2:
      avx2::fill_aligned<Transform>(seed, offset, stream, first_block, blocks, out + head);
      break;
#endif
    default:
      fill_aligned<Transform>(seed, offset, stream, first_block, blocks, out + head);
  }
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

}  // namespace gmvq::cpu::row
