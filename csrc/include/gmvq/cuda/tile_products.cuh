// The GEMM-like core of every kernel: for a 64 x 64 tile of (row, column)
// pairs, up to three dot products over a shared reduction dimension,
//   c[p][i][j] = sum_d A_p[row_i, d] * B_p[col_j, d],
// staged through shared memory in chunks of the reduction dimension. Each of
// the 256 threads owns a 4 x 4 micro-tile (rows ty*4.., columns tx*4..), so
// the 16 threads sharing a row are the lanes of one half-warp (tx = lane % 16)
// and row reductions are shuffles within it.
//
// Operands are strided views (row stride, reduction stride) of acc_t data, so
// the same code reads z @ E^T, G @ E (E viewed transposed) and G^T @ z.
// Arithmetic is plain FFMA/DFMA in a fixed order: results are bitwise
// reproducible; tensor cores are not used.
#pragma once

#include "gmvq/cuda/common.cuh"

namespace gmvq::cuda {

constexpr int kThreads = 256;
constexpr int kMicro = 4;           // micro-tile edge per thread
constexpr int kTile = 16 * kMicro;  // rows and columns per CTA tile
constexpr int kTilePad = kTile + 4;  // keeps 16-byte alignment of each staged row

template <typename T>
struct Operand {
  const T* ptr = nullptr;
  int64_t rows = 0;        // valid rows (row index >= rows reads as 0)
  int64_t row_stride = 0;  // elements between consecutive rows
  int64_t red_stride = 1;  // elements between consecutive reduction indices
  __host__ __device__ T at(int64_t row, int64_t red) const { return ptr[row * row_stride + red * red_stride]; }
};

// Reduction indices staged per step: 64 bytes of each staged row.
template <typename T>
constexpr int chunk_of() {
  return 64 / static_cast<int>(sizeof(T));
}

// 16-byte aligned: the micro-tiles are read as float4.
template <typename T, int NP>
struct alignas(16) TileStage {
  T a[NP][chunk_of<T>()][kTilePad];
  T b[NP][chunk_of<T>()][kTilePad];
};

// Copies rows [row0, row0 + 64) x reduction [red0, red0 + chunk) of op,
// transposed, into dst[red][row]; out-of-range entries become 0.
template <typename T>
__device__ __forceinline__ void stage_operand(T (*dst)[kTilePad], const Operand<T>& op, int64_t row0,
                                              int64_t red0, int64_t red_len) {
  constexpr int C = chunk_of<T>();
  const int tid = threadIdx.x;
  const bool red_contiguous = op.red_stride == 1;
#pragma unroll
  for (int step = 0; step < (kTile * C) / kThreads; ++step) {
    const int idx = tid + step * kThreads;
    // Walk the contiguous direction with consecutive threads (coalesced reads).
    const int r = red_contiguous ? idx / C : idx % kTile;
    const int c = red_contiguous ? idx % C : idx / kTile;
    const int64_t row = row0 + r, red = red0 + c;
    dst[c][r] = (row < op.rows && red < red_len) ? op.at(row, red) : T(0);
  }
}

template <typename T>
__device__ __forceinline__ void load4(const T* p, T (&v)[kMicro]) {
#pragma unroll
  for (int i = 0; i < kMicro; ++i) v[i] = p[i];
}
template <>
__device__ __forceinline__ void load4<float>(const float* p, float (&v)[kMicro]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}

// c[p][i][j] for rows row0 + ty*4 + i and columns col0 + tx*4 + j.
// Every thread of the block must call it (it synchronises).
template <typename T, int NP>
__device__ __forceinline__ void tile_products(TileStage<T, NP>& stage, const Operand<T> (&a)[NP],
                                              const Operand<T> (&b)[NP], int64_t red_len,
                                              int64_t row0, int64_t col0,
                                              T (&c)[NP][kMicro][kMicro]) {
  constexpr int C = chunk_of<T>();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) c[p][i][j] = T(0);

  for (int64_t red0 = 0; red0 < red_len; red0 += C) {
    __syncthreads();  // the previous chunk (or the caller's use of shared memory) is done
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      stage_operand(stage.a[p], a[p], row0, red0, red_len);
      stage_operand(stage.b[p], b[p], col0, red0, red_len);
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < NP; ++p) {
#pragma unroll 4
      for (int k = 0; k < C; ++k) {
        T av[kMicro], bv[kMicro];
        load4(&stage.a[p][k][ty * kMicro], av);
        load4(&stage.b[p][k][tx * kMicro], bv);
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) c[p][i][j] = fma(av[i], bv[j], c[p][i][j]);
      }
    }
  }
  __syncthreads();  // callers may reuse shared memory right away
}

}  // namespace gmvq::cuda

namespace gmvq::cuda {

// The second GEMM of the fused kernels (P @ E in flash-attention terms): for
// m < 64 and every column dd < D of a row-major (64, D) accumulator in
// shared memory,
//   acc[m][dd] = acc[m][dd] * (scale ? scale[m] : 1) + combine(m, dd, c),
//   c[p] = sum_{t < count} a_p[t][m] * b_p[t * D + dd],
// where a_p is a (64, kTilePad) tile in shared memory indexed [t][m] and b_p
// a row-major (count, D) block in global memory (read through L1). Each
// thread owns 4 x 4 outputs per 64 columns: per t, one 16-byte shared load
// and four global loads feed 16 FMAs per product.
template <typename T, int NP, typename Combine>
__device__ __forceinline__ void accumulate_products(T* acc, const T* const (&a)[NP],
                                                    const T* const (&b)[NP], int64_t count,
                                                    int64_t d, const T* scale, Combine combine) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t d0 = 0; d0 < d; d0 += kTile) {
    T c[NP][kMicro][kMicro];
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) c[p][i][j] = T(0);
    const int64_t col = d0 + tx * kMicro;
    for (int64_t t = 0; t < count; ++t) {
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        T av[kMicro], bv[kMicro];
        load4(a[p] + t * kTilePad + ty * kMicro, av);
#pragma unroll
        for (int j = 0; j < kMicro; ++j) bv[j] = col + j < d ? b[p][t * d + col + j] : T(0);
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) c[p][i][j] = fma(av[i], bv[j], c[p][i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int m = ty * kMicro + i;
      const T s = scale != nullptr ? scale[m] : T(1);
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        if (col + j >= d) continue;
        T parts[NP];
#pragma unroll
        for (int p = 0; p < NP; ++p) parts[p] = c[p][i][j];
        T& out = acc[m * d + col + j];
        out = out * s + combine(m, col + j, parts);
      }
    }
  }
}

}  // namespace gmvq::cuda
