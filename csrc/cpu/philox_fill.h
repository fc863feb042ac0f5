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

// fill_aligned for AVX2 machines without AVX-512 (Zen 3 and older): the Philox
// rounds on 2 x 8 blocks at a time in intrinsics, and the Gumbel transform on
// kChains vectors in step. GCC lowers the vector form of the 32 x 32 -> 64-bit
// products above to a full 64-bit multiply (three vpmuludq and shuffles per
// product); here each round is four vpmuludq and blends (git log has the
// timings). Same words, same operations, same bits.
template <typename Transform>
__attribute__((target("avx2"))) void fill_aligned_avx2(int64_t seed, int64_t offset, uint64_t stream,
                                                       uint64_t first_block, int64_t blocks, float* __restrict out) {
  constexpr int64_t kChunk = 64;  // blocks per transform pass (a multiple of 8 * kPhiloxGroups)
  constexpr int kPhiloxGroups = 2;
  const Transform transform;
  const uint64_t key = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
  const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(rng::kPhiloxMul0));
  const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(rng::kPhiloxMul1));
  alignas(32) uint32_t words[4 * kChunk];
  alignas(32) uint32_t counter_lo[8], counter_hi[8];
  __m256i round_key0[rng::kPhiloxRounds], round_key1[rng::kPhiloxRounds];
  for (int round = 0; round < rng::kPhiloxRounds; ++round) {
    round_key0[round] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key) + round * rng::kPhiloxWeyl0));
    round_key1[round] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key >> 32) + round * rng::kPhiloxWeyl1));
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
      for (int round = 0; round < rng::kPhiloxRounds; ++round) {
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
      for (; i + kVector * kChains <= 4 * count; i += kVector * kChains) gumbel_chains<vfloat, vint>(words + i, o + i);
    } else if constexpr (std::is_same_v<Transform, GaussianWord>) {
      for (; i + kVector * kChains <= 4 * count; i += kVector * kChains) gaussian_chains(words + i, o + i);
    }
    for (; i < 4 * count; ++i) o[i] = transform(words[i]);
  }
}

// fill_aligned on AVX-512 machines: the rounds of fill_aligned_avx2 on 2 x 16
// blocks at a time, and the Gumbel transform on 16-float vectors. The cloned
// loop's AVX-512 copy ran the Philox products as full 64-bit multiplies; git
// log has both paths' timings. Same words, same operations, same bits.
template <typename Transform>
__attribute__((target("avx512f"))) void fill_aligned_avx512(int64_t seed, int64_t offset, uint64_t stream,
                                                           uint64_t first_block, int64_t blocks,
                                                           float* __restrict out) {
  constexpr int64_t kChunk = 128;  // blocks per transform pass (a multiple of 16 * kPhiloxGroups): 2 KiB of words
  constexpr int kPhiloxGroups = 2;
  constexpr int kLanes16 = 16;
  const Transform transform;
  const uint64_t key = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
  const __m512i mul0 = _mm512_set1_epi32(static_cast<int>(rng::kPhiloxMul0));
  const __m512i mul1 = _mm512_set1_epi32(static_cast<int>(rng::kPhiloxMul1));
  alignas(64) uint32_t words[4 * kChunk];
  alignas(64) uint32_t counter_lo[kLanes16], counter_hi[kLanes16];
  __m512i round_key0[rng::kPhiloxRounds], round_key1[rng::kPhiloxRounds];
  for (int round = 0; round < rng::kPhiloxRounds; ++round) {
    round_key0[round] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(key) + round * rng::kPhiloxWeyl0));
    round_key1[round] =
        _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(key >> 32) + round * rng::kPhiloxWeyl1));
  }
  const __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j0 = 0; j0 < blocks; j0 += kChunk) {
    const int64_t count = std::min(kChunk, blocks - j0);
    for (int64_t v = 0; v < count; v += kLanes16 * kPhiloxGroups) {  // the last groups may run past count
      __m512i c0[kPhiloxGroups], c1[kPhiloxGroups], c2[kPhiloxGroups], c3[kPhiloxGroups];
      for (int group = 0; group < kPhiloxGroups; ++group) {
        const uint64_t counter = first_block + static_cast<uint64_t>(j0 + v + kLanes16 * group) + (stream << 62);
        if (static_cast<uint32_t>(counter) <= 0xFFFFFFFFu - (kLanes16 - 1)) {  // no carry into the high word
          c0[group] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter))),
                                       lane_index);
          c1[group] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter >> 32)));
        } else {
          for (int j = 0; j < kLanes16; ++j) {
            counter_lo[j] = static_cast<uint32_t>(counter + j);
            counter_hi[j] = static_cast<uint32_t>((counter + j) >> 32);
          }
          c0[group] = _mm512_load_si512(counter_lo);
          c1[group] = _mm512_load_si512(counter_hi);
        }
        c2[group] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(off)));
        c3[group] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(off >> 32)));
      }
      for (int round = 0; round < rng::kPhiloxRounds; ++round) {
        for (int group = 0; group < kPhiloxGroups; ++group) {
          // As fill_aligned_avx2: even and odd lanes' 64-bit products, recombined by blends.
          const __m512i even0 = _mm512_mul_epu32(c0[group], mul0);
          const __m512i odd0 = _mm512_mul_epu32(_mm512_srli_epi64(c0[group], 32), mul0);
          const __m512i even1 = _mm512_mul_epu32(c2[group], mul1);
          const __m512i odd1 = _mm512_mul_epu32(_mm512_srli_epi64(c2[group], 32), mul1);
          const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even0, 32), odd0);
          const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, even0, _mm512_slli_epi64(odd0, 32));
          const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even1, 32), odd1);
          const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, even1, _mm512_slli_epi64(odd1, 32));
          c0[group] = _mm512_xor_si512(_mm512_xor_si512(hi1, c1[group]), round_key0[round]);
          c2[group] = _mm512_xor_si512(_mm512_xor_si512(hi0, c3[group]), round_key1[round]);
          c1[group] = lo1;
          c3[group] = lo0;
        }
      }
      for (int group = 0; group < kPhiloxGroups; ++group) {
        // 4 words x 16 blocks -> 16 blocks of 4 consecutive words. Within each
        // 128-bit lane l, as in AVX2: b_j holds block 4 l + j's four words.
        const __m512i w01_lo = _mm512_unpacklo_epi32(c0[group], c1[group]);
        const __m512i w01_hi = _mm512_unpackhi_epi32(c0[group], c1[group]);
        const __m512i w23_lo = _mm512_unpacklo_epi32(c2[group], c3[group]);
        const __m512i w23_hi = _mm512_unpackhi_epi32(c2[group], c3[group]);
        const __m512i b0 = _mm512_unpacklo_epi64(w01_lo, w23_lo), b1 = _mm512_unpackhi_epi64(w01_lo, w23_lo);
        const __m512i b2 = _mm512_unpacklo_epi64(w01_hi, w23_hi), b3 = _mm512_unpackhi_epi64(w01_hi, w23_hi);
        // Then a 4 x 4 transpose of 128-bit lanes: output register q holds blocks 4 q .. 4 q + 3.
        const __m512i t0 = _mm512_shuffle_i32x4(b0, b1, 0x44), t1 = _mm512_shuffle_i32x4(b2, b3, 0x44);
        const __m512i t2 = _mm512_shuffle_i32x4(b0, b1, 0xEE), t3 = _mm512_shuffle_i32x4(b2, b3, 0xEE);
        uint32_t* dst = words + 4 * (v + kLanes16 * group);
        _mm512_store_si512(dst, _mm512_shuffle_i32x4(t0, t1, 0x88));
        _mm512_store_si512(dst + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
        _mm512_store_si512(dst + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
        _mm512_store_si512(dst + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
      }
    }
    float* o = out + 4 * j0;
    int64_t i = 0;
    if constexpr (std::is_same_v<Transform, GumbelWord>) {
      for (; i + kLanes16 * kChains <= 4 * count; i += kLanes16 * kChains) {
        gumbel_chains<vfloat16, vint16>(words + i, o + i);
      }
      for (; i + kVector * kChains <= 4 * count; i += kVector * kChains) gumbel_chains<vfloat, vint>(words + i, o + i);
    } else if constexpr (std::is_same_v<Transform, GaussianWord>) {
      for (; i + kVector * kChains <= 4 * count; i += kVector * kChains) gaussian_chains(words + i, o + i);
    }
    for (; i < 4 * count; ++i) o[i] = transform(words[i]);
  }
}
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
      fill_aligned_avx512<Transform>(seed, offset, stream, first_block, blocks, out + head);
      break;
    case NoisePath::kAvx2:
      fill_aligned_avx2<Transform>(seed, offset, stream, first_block, blocks, out + head);
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
