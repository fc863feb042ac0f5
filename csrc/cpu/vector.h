// The CPU kernels' vector vocabulary: GMVQ_CLONES (AVX-512, AVX2 and baseline
// copies of a function, picked at load time), 8-float GCC vectors and their
// loads, chains of independent vectors, and a NaN-aware running maximum.
//
// Why hand-vectorised and not at::vec: these translation units are compiled
// for baseline x86-64, so at::vec would fall back to scalar code. The float
// paths are plain loops GCC vectorises, or GCC vector extensions where a
// select would not be if-converted under trapping math. Every clone does the
// same correctly rounded IEEE operations in the same order (no FMA
// contraction: -ffp-contract=off), so results are bitwise identical whichever
// copy runs. The exceptions are chosen per machine and named where they are
// (the exponentials' FMA copy, row_math.h).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "x86_paths.h"

#if GMVQ_X86_PATHS
#define GMVQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// Intrinsics paths, each behind a run-time check (philox_fill.h, row_math.h).
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

// --- 8-float vectors -------------------------------------------------------------
// Helpers on vector types are always inlined into the cloned callers, so the
// vector calling convention (-Wpsabi, silenced by the build) never matters.
#define GMVQ_VECTOR_INLINE inline __attribute__((always_inline))
// Lambdas handed to the row loops below, inlined like the helpers.
#define GMVQ_SINK __attribute__((always_inline))
typedef float vfloat __attribute__((vector_size(32)));
typedef int32_t vint __attribute__((vector_size(32)));
// 16 floats: native only inside AVX-512 code (target("avx512f")).
typedef float vfloat16 __attribute__((vector_size(64)));
typedef int32_t vint16 __attribute__((vector_size(64)));

// Loads and stores of any vector width V.
template <typename V>
GMVQ_VECTOR_INLINE V load_as(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
GMVQ_VECTOR_INLINE void store_vector(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// Up to one vector of values from p, the rest `fill`.
template <typename V>
GMVQ_VECTOR_INLINE V load_tail_as(const float* p, int64_t count, float fill) {
  constexpr int lanes = sizeof(V) / sizeof(float);
  float tail[lanes];
  for (int j = 0; j < lanes; ++j) tail[j] = j < count ? p[j] : fill;
  return load_as<V>(tail);
}

GMVQ_VECTOR_INLINE vfloat splat(float v) { return vfloat{} + v; }
GMVQ_VECTOR_INLINE vfloat load_vector(const float* p) { return load_as<vfloat>(p); }
GMVQ_VECTOR_INLINE vfloat load_tail(const float* p, int64_t count, float fill) {
  return load_tail_as<vfloat>(p, count, fill);
}

// Polynomials are long chains of dependent multiplies and adds: one vector at
// a time leaves the out-of-order window too few independent operations. The
// *_chains functions advance kChains vectors in step, operation by operation;
// each vector gets exactly the single-vector function's operations (same bits).
// 8 rather than 4: the spills that 8 chains cost were cheaper than the idle
// pipes of 4 (git log has the timings).
constexpr int kChains = 8;
#define GMVQ_EACH_CHAIN _Pragma("GCC unroll 8") for (int s = 0; s < kChains; ++s)

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

}  // namespace gmvq::cpu::row
