// C = A B^T for strided acc_t operands (tile_products), split over the
// reduction dimension into a fixed number of partial products that are then
// summed in a fixed order: deterministic, and enough blocks for long
// reductions with small outputs (G^T z: N-long sums into K x D).
#pragma once

#include "gmvq/cuda/tile_products.cuh"

namespace gmvq::cuda {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gemm_abt_kernel(Operand<T> a, Operand<T> b, int64_t red_len, int64_t red_per_split, T* out,
                    int64_t m, int64_t n) {
  __shared__ TileStage<T, 1> stage;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t split = blockIdx.z;
  const int64_t red_begin = split * red_per_split;
  const int64_t red_end = red_begin + red_per_split < red_len ? red_begin + red_per_split : red_len;
  // Shift the operands so that this split's range starts at 0.
  Operand<T> as[1] = {a}, bs[1] = {b};
  as[0].ptr += red_begin * a.red_stride;
  bs[0].ptr += red_begin * b.red_stride;
  T c[1][kMicro][kMicro];
  tile_products<T, 1>(stage, as, bs, red_end - red_begin, row0, col0, c);
  T* dst = out + split * m * n;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t r = row0 + ty * kMicro + i;
    if (r >= m) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = col0 + tx * kMicro + j;
      if (col < n) dst[r * n + col] = c[0][i][j];
    }
  }
}

// (m, n) = sum over red of a[row, red] * b[col, red]; a.rows = m, b.rows = n.
template <typename T>
at::Tensor gemm_abt(const Operand<T>& a, const Operand<T>& b, int64_t red_len,
                    const at::TensorOptions& options) {
  const int64_t m = a.rows, n = b.rows;
  if (m == 0 || n == 0) return at::zeros({m, n}, options);
  const int64_t tiles = ceil_div(m, kTile) * ceil_div(n, kTile);
  // About 2 waves of blocks on a large GPU; a function of the shape only, so
  // the summation order (and so every bit) is the same on every device.
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(512, tiles), ceil_div(red_len, 512)));
  const int64_t per_split = ceil_div(std::max<int64_t>(red_len, 1), splits);
  auto partial = at::empty({splits, m, n}, options);
  const dim3 grid(ceil_div(m, kTile), ceil_div(n, kTile), splits);
  GMVQ_LAUNCH(gemm_abt_kernel<T>, grid, kThreads, 0, c10::cuda::getCurrentCUDAStream(), a, b, red_len,
              per_split, partial.data_ptr<T>(), m, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return splits == 1 ? partial.squeeze(0) : partial.sum(0);
}

}  // namespace gmvq::cuda
