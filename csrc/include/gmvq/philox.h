// Counter-based noise shared by the CPU kernels, the CUDA kernels and (mirrored
// in int64/float32 tensor arithmetic) gmvq_ext/reference.py.
//
// Why counter-based: the fused quantize backward regenerates the Gumbel and
// Gaussian noise of the forward instead of storing N x K values, and the same
// (seed, offset) must give the same noise on every device.
//
// Counter layout (Philox4x32-10, Salmon et al. 2011):
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(block), hi32(block), lo32(offset), hi32(offset))
//   block   = element / 4 + stream * 2^62,  word = element % 4
// Streams: 0 = Gumbel noise, element n*K + k; 1 = Gaussian noise, element n*D + d.
// (philox_noise's "uniform" draws the words of stream 0; quantizers key it
// differently for their own discrete choices.)
//
// Bits to numbers, in float32 with only correctly rounded +, -, *, sqrt (no
// FMA contraction: the device path uses the _rn intrinsics, the host path is
// compiled with -ffp-contract=off), so every device and torch itself produce
// the same bits:
//   u        = ((r >> 9) + 0.5) * 2^-23        in (0, 1), never 0 or 1
//   gumbel   = -log(-log(u))                    log: Cephes logf polynomial
//   gaussian = sqrt(2) * erfinv(2u - 1)         erfinv: Giles (2010), single precision
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GMVQ_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host too: the CPU kernels vectorise loops over these
// transforms, which a call would stop.
#define GMVQ_HOST_DEVICE inline __attribute__((always_inline))
#else
#define GMVQ_HOST_DEVICE inline
#endif

namespace gmvq::rng {

constexpr uint64_t kGumbelStream = 0;
constexpr uint64_t kGaussianStream = 1;

// What philox_noise draws: the uniform itself, or a transform of it.
enum class NoiseDistribution { kUniform, kGumbel, kGaussian };

struct Philox4 {
  uint32_t word[4];
};

// Philox4x32's round multipliers and key increments (Weyl sequence), and its rounds.
constexpr uint32_t kPhiloxMul0 = 0xD2511F53u, kPhiloxMul1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u, kPhiloxWeyl1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

GMVQ_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                       uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxMul1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four 32-bit words of one block of a stream.
GMVQ_HOST_DEVICE Philox4 philox_block(int64_t seed, int64_t offset, uint64_t stream,
                                      uint64_t block) {
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint64_t off = static_cast<uint64_t>(offset);
  const uint64_t counter = block + (stream << 62);
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                       static_cast<uint32_t>(off), static_cast<uint32_t>(off >> 32),
                       static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

// --- correctly rounded float32 arithmetic, never contracted into an FMA ---
GMVQ_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GMVQ_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GMVQ_HOST_DEVICE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}
GMVQ_HOST_DEVICE int32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}
GMVQ_HOST_DEVICE float bits_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// Uniform in (0, 1) from 32 random bits: 23 bits of the word, centred in their
// interval, so the result is exact in float32 and never 0 or 1.
GMVQ_HOST_DEVICE float uniform_from_bits(uint32_t r) {
  return mul_rn(add_rn(static_cast<float>(r >> 9), 0.5f), 0x1p-23f);
}

// Natural log of a positive normal float (Cephes logf). Written out operation
// by operation because reference.py repeats exactly these steps on tensors.
GMVQ_HOST_DEVICE float log_canonical(float x) {
  const int32_t bits = float_bits(x);
  int32_t exponent = (bits >> 23) - 126;                       // x = m * 2^exponent
  const int32_t m_bits = (bits & 0x007fffff) | 0x3f000000;  // m in [0.5, 1)
  // Below sqrt(1/2), t = 2m - 1 and the exponent drops by one. 2m is formed
  // exactly on the bits (exponent + 1) and the branch is an integer select:
  // nothing that could trap sits under a condition, so compilers vectorise
  // loops over this function even without masked instructions (AVX2). The
  // bits are those of add_rn(add_rn(m, m), -1) (m + m is exact).
  const int32_t small = m_bits < 0x3f3504f3 ? 1 : 0;  // 0x3f3504f3: sqrt(1/2) = 0x1.6a09e6p-1f
  const float t = add_rn(bits_float(m_bits + (small << 23)), -1.0f);
  exponent -= small;
  const float e = static_cast<float>(exponent);
  const float t2 = mul_rn(t, t);
  float y = 0x1.204376p-4f;
  y = add_rn(mul_rn(y, t), -0x1.d7a370p-4f);
  y = add_rn(mul_rn(y, t), 0x1.de4a34p-4f);
  y = add_rn(mul_rn(y, t), -0x1.fcba9ep-4f);
  y = add_rn(mul_rn(y, t), 0x1.23d37ep-3f);
  y = add_rn(mul_rn(y, t), -0x1.555ca0p-3f);
  y = add_rn(mul_rn(y, t), 0x1.999d58p-3f);
  y = add_rn(mul_rn(y, t), -0x1.fffff8p-3f);
  y = add_rn(mul_rn(y, t), 0x1.555554p-2f);
  y = mul_rn(mul_rn(y, t), t2);
  y = add_rn(y, mul_rn(-0x1.bd0106p-13f, e));
  y = add_rn(y, mul_rn(-0.5f, t2));
  float result = add_rn(t, y);
  result = add_rn(result, mul_rn(0x1.63p-1f, e));
  return result;
}

// erfinv on (-1, 1) (Giles 2010, single precision); |x| <= 1 - 2^-23 here.
GMVQ_HOST_DEVICE float erfinv_canonical(float x) {
  const float w = -log_canonical(mul_rn(add_rn(1.0f, -x), add_rn(1.0f, x)));  // w > 0
  // Both of Giles' polynomials, then an integer select (as in log_canonical:
  // no branch, so loops over this function vectorise).
  const float wc = add_rn(w, -2.5f);
  float central = 0x1.e2cb10p-26f;
  central = add_rn(mul_rn(central, wc), 0x1.70966cp-22f);
  central = add_rn(mul_rn(central, wc), -0x1.d8e6aep-19f);
  central = add_rn(mul_rn(central, wc), -0x1.26b582p-18f);
  central = add_rn(mul_rn(central, wc), 0x1.ca65b6p-13f);
  central = add_rn(mul_rn(central, wc), -0x1.48a810p-10f);
  central = add_rn(mul_rn(central, wc), -0x1.11c9dep-8f);
  central = add_rn(mul_rn(central, wc), 0x1.f91ec6p-3f);
  central = add_rn(mul_rn(central, wc), 0x1.805c5ep+0f);
  const float wt = add_rn(sqrt_rn(w), -3.0f);
  float tail = -0x1.a3e136p-13f;
  tail = add_rn(mul_rn(tail, wt), 0x1.a76ad6p-14f);
  tail = add_rn(mul_rn(tail, wt), 0x1.61b8e4p-10f);
  tail = add_rn(mul_rn(tail, wt), -0x1.e17bcep-9f);
  tail = add_rn(mul_rn(tail, wt), 0x1.7824f6p-8f);
  tail = add_rn(mul_rn(tail, wt), -0x1.f38baep-8f);
  tail = add_rn(mul_rn(tail, wt), 0x1.354afcp-7f);
  tail = add_rn(mul_rn(tail, wt), 0x1.006db6p+0f);
  tail = add_rn(mul_rn(tail, wt), 0x1.6a9efcp+1f);
  const int32_t use_central = w < 5.0f ? -1 : 0;
  const float p = bits_float((float_bits(central) & use_central) | (float_bits(tail) & ~use_central));
  return mul_rn(p, x);
}

GMVQ_HOST_DEVICE float gumbel_from_bits(uint32_t r) {
  return -log_canonical(-log_canonical(uniform_from_bits(r)));
}

GMVQ_HOST_DEVICE float gaussian_from_bits(uint32_t r) {
  const float u = uniform_from_bits(r);
  return mul_rn(0x1.6a09e6p+0f, erfinv_canonical(add_rn(add_rn(u, u), -1.0f)));
}

// One element of a stream (convenient, but recomputes the whole block: loops
// over consecutive elements should use fill_* below).
GMVQ_HOST_DEVICE uint32_t random_word(int64_t seed, int64_t offset, uint64_t stream,
                                      uint64_t element) {
  return philox_block(seed, offset, stream, element >> 2).word[element & 3];
}

GMVQ_HOST_DEVICE float gumbel(int64_t seed, int64_t offset, uint64_t element) {
  return gumbel_from_bits(random_word(seed, offset, kGumbelStream, element));
}

GMVQ_HOST_DEVICE float gaussian(int64_t seed, int64_t offset, uint64_t element) {
  return gaussian_from_bits(random_word(seed, offset, kGaussianStream, element));
}

// The words of the four consecutive elements [first, first + 4) of a stream,
// for kernels that keep noise in registers: one Philox call when first is a
// multiple of 4 (the common case), else two, with the words picked by
// selects. No array is indexed at run time, so nothing goes to local memory.
GMVQ_HOST_DEVICE uint32_t pick_word(const Philox4& low, const Philox4& high, uint32_t i) {  // i < 8
  const uint32_t a = i == 0 ? low.word[0] : i == 1 ? low.word[1] : i == 2 ? low.word[2] : low.word[3];
  const uint32_t b = i == 4 ? high.word[0] : i == 5 ? high.word[1] : i == 6 ? high.word[2] : high.word[3];
  return i < 4 ? a : b;
}

GMVQ_HOST_DEVICE Philox4 words4(int64_t seed, int64_t offset, uint64_t stream, uint64_t first) {
  const Philox4 low = philox_block(seed, offset, stream, first >> 2);
  const uint32_t shift = static_cast<uint32_t>(first & 3);
  if (shift == 0) return low;
  const Philox4 high = philox_block(seed, offset, stream, (first >> 2) + 1);
  return Philox4{{pick_word(low, high, shift), pick_word(low, high, shift + 1),
                  pick_word(low, high, shift + 2), pick_word(low, high, shift + 3)}};
}

// Noise for the consecutive elements [first, first + count) of a stream,
// one Philox call per four elements.
template <typename Transform>
GMVQ_HOST_DEVICE void fill_range(int64_t seed, int64_t offset, uint64_t stream, uint64_t first,
                                 int64_t count, float* out, Transform transform) {
  int64_t i = 0;
  while (i < count) {
    const uint64_t element = first + static_cast<uint64_t>(i);
    const Philox4 block = philox_block(seed, offset, stream, element >> 2);
    for (uint64_t word = element & 3; word < 4 && i < count; ++word, ++i) {
      out[i] = transform(block.word[word]);
    }
  }
}

GMVQ_HOST_DEVICE void fill_gumbel(int64_t seed, int64_t offset, uint64_t first, int64_t count,
                                  float* out) {
  fill_range(seed, offset, kGumbelStream, first, count, out,
             [](uint32_t r) { return gumbel_from_bits(r); });
}

GMVQ_HOST_DEVICE void fill_uniform(int64_t seed, int64_t offset, uint64_t first, int64_t count,
                                   float* out) {
  fill_range(seed, offset, kGumbelStream, first, count, out,
             [](uint32_t r) { return uniform_from_bits(r); });
}

GMVQ_HOST_DEVICE void fill_gaussian(int64_t seed, int64_t offset, uint64_t first, int64_t count,
                                    float* out) {
  fill_range(seed, offset, kGaussianStream, first, count, out,
             [](uint32_t r) { return gaussian_from_bits(r); });
}

// Any distribution of philox_noise.
GMVQ_HOST_DEVICE void fill_noise(NoiseDistribution kind, int64_t seed, int64_t offset, uint64_t first,
                                 int64_t count, float* out) {
  switch (kind) {
    case NoiseDistribution::kUniform:
      fill_uniform(seed, offset, first, count, out);
      break;
    case NoiseDistribution::kGumbel:
      fill_gumbel(seed, offset, first, count, out);
      break;
    case NoiseDistribution::kGaussian:
      fill_gaussian(seed, offset, first, count, out);
      break;
  }
}

}  // namespace gmvq::rng
