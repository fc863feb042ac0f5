// Warp-level tile products for the quantize kernels, in the register layout
// of mma.m16n8k8 (PTX ISA, "Matrix fragments for mma.m16n8k8", .tf32):
// a warp computes C (16 x 8) += A (16 x 8) B (8 x 8), lane = 4 * group + tig
// (group = lane / 4, tig = lane % 4) holding
//   C: c0 = (group, 2 tig), c1 = (group, 2 tig + 1), c2, c3 = the same at row group + 8,
//   A: a0 = (group, tig), a1 = (group + 8, tig), a2 = (group, tig + 4), a3 = (group + 8, tig + 4),
//   B: b0 = (tig, group), b1 = (tig + 4, group).
// Two policies with one interface (load_a, load_b from element accessors,
// then mma), so every kernel is written once and the policy is one template
// argument (quantize.cu picks it, GMVQ_CUDA_TILES):
//
//   TensorMath: tensor cores with the 3xTF32 split (float only). Each operand
//     x = hi + lo with hi = cvt.rna.tf32(x), lo = cvt.rna.tf32(x - hi), and
//     a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi (the dropped a_lo b_lo is
//     ~2^-22 |a b|): FP32-class accuracy, which the distance needs (it cancels
//     |z|^2 + |e|^2 - 2 z.e) and so does an argmax near a tie. Plain TF32
//     (1e-3 relative) is not enough. The small products go first so the big
//     one adds to an accumulator that already holds them.
//   SimtMath: the same C elements by FFMA/DFMA in k order (float or double).
//
// Both are deterministic: a fixed instruction sequence per lane, no atomics.
#pragma once

#include "gmvq/cuda/common.cuh"

namespace gmvq::cuda {

constexpr int kMmaK = 8;  // reduction depth of one tile product

__device__ __forceinline__ int lane_group() { return (threadIdx.x % 32) / 4; }
__device__ __forceinline__ int lane_tig() { return threadIdx.x % 4; }

// cvt.rna.tf32.f32 (sm_80+). The host selects TensorMath only on such a GPU;
// device code built for an older architecture traps instead of computing zeros.
__device__ __forceinline__ uint32_t tf32_round(float x) {
#if defined(GMVQ_CUDA_EMULATION)
  return emulation::cvt_rna_tf32(x);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
  return bits;
#else
#if defined(__CUDA_ARCH__)
  __trap();
#endif
  return 0;
#endif
}

// Bits below the tf32 mantissa that mma ignores in an operand register.
constexpr uint32_t kTf32DontCare = 0x1fffu;

// The float value of a cvt.rna.tf32 result. The instruction's result is a
// .tf32 in a 32-bit register whose low 13 bits the tensor cores ignore and
// nothing promises to be zero, so they are cleared before the register is read
// as a float (as CUTLASS's tfloat32_t does): hi = x rounded to tf32 exactly,
// which makes x - hi exact in split().
__device__ __forceinline__ float tf32_value(uint32_t bits) {
  bits &= ~kTf32DontCare;
#if defined(GMVQ_CUDA_EMULATION)
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#else
  return __uint_as_float(bits);
#endif
}

// d += a b for one m16n8k8 tf32 product (operands in the layout above).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(GMVQ_CUDA_EMULATION)
  emulation::mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

struct TensorMath {
  using Value = float;
  struct A {
    uint32_t hi[4], lo[4];
  };
  struct B {
    uint32_t hi[2], lo[2];
  };

  __device__ __forceinline__ static void split(float x, uint32_t& hi, uint32_t& lo) {
    hi = tf32_round(x);
    lo = tf32_round(x - tf32_value(hi));  // exact: hi is x rounded to 11 significant bits
  }
  // a(row, k) for row < 16, k < 8.
  template <typename F>
  __device__ __forceinline__ static A load_a(F a) {
    const int g = lane_group(), t = lane_tig();
    A f;
    split(a(g, t), f.hi[0], f.lo[0]);
    split(a(g + 8, t), f.hi[1], f.lo[1]);
    split(a(g, t + 4), f.hi[2], f.lo[2]);
    split(a(g + 8, t + 4), f.hi[3], f.lo[3]);
    return f;
  }
  // b(k, col) for k < 8, col < 8.
  template <typename F>
  __device__ __forceinline__ static B load_b(F b) {
    const int g = lane_group(), t = lane_tig();
    B f;
    split(b(t, g), f.hi[0], f.lo[0]);
    split(b(t + 4, g), f.hi[1], f.lo[1]);
    return f;
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const A& a, const B& b) {
    mma_tf32(c, a.lo, b.hi);
    mma_tf32(c, a.hi, b.lo);
    mma_tf32(c, a.hi, b.hi);
  }
};

template <typename T>
struct SimtMath {
  using Value = T;
  struct A {
    T v[2][kMmaK];  // rows group, group + 8
  };
  struct B {
    T v[2][kMmaK];  // columns 2 tig, 2 tig + 1
  };
  template <typename F>
  __device__ __forceinline__ static A load_a(F a) {
    const int g = lane_group();
    A f;
#pragma unroll
    for (int k = 0; k < kMmaK; ++k) {
      f.v[0][k] = a(g, k);
      f.v[1][k] = a(g + 8, k);
    }
    return f;
  }
  template <typename F>
  __device__ __forceinline__ static B load_b(F b) {
    const int t = lane_tig();
    B f;
#pragma unroll
    for (int k = 0; k < kMmaK; ++k) {
      f.v[0][k] = b(k, 2 * t);
      f.v[1][k] = b(k, 2 * t + 1);
    }
    return f;
  }
  __device__ __forceinline__ static void mma(T (&c)[4], const A& a, const B& b) {
#pragma unroll
    for (int k = 0; k < kMmaK; ++k) {
      c[0] = fma(a.v[0][k], b.v[0][k], c[0]);
      c[1] = fma(a.v[0][k], b.v[1][k], c[1]);
      c[2] = fma(a.v[1][k], b.v[0][k], c[2]);
      c[3] = fma(a.v[1][k], b.v[1][k], c[3]);
    }
  }
};

// Row and column of C element i (0..3) of this lane, within the 16 x 8 tile.
__device__ __forceinline__ int c_row(int i) { return lane_group() + 8 * (i >> 1); }
__device__ __forceinline__ int c_col(int i) { return 2 * lane_tig() + (i & 1); }

}  // namespace gmvq::cuda
