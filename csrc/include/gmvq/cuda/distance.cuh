// The (N, K) weighted squared distance on CUDA in the accumulation dtype, from
// shared-memory tiles of (w z) E^T (and w (E*E)^T for an (N, D) weight).
// Header-only: codebook_distance.cu and weighted_softmax.cu each instantiate it.
#pragma once

#include <optional>

#include "gmvq/cuda/codebook_terms.cuh"

namespace gmvq::cuda {

template <typename T, int NP>
__global__ void __launch_bounds__(kThreads) distance_kernel(DistanceView<T> v, T* out) {
  __shared__ TileStage<T, NP> stage;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  Operand<T> a[NP], b[NP];
  a[0] = v.wz;
  b[0] = v.codebook;
  if constexpr (NP == 2) {
    a[1] = v.w_full;
    b[1] = v.code_sq;
  }
  T c[NP][kMicro][kMicro];
  tile_products<T, NP>(stage, a, b, v.d, row0, col0, c);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t r = row0 + ty * kMicro + i;
    if (r >= v.n) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t k = col0 + tx * kMicro + j;
      if (k < v.k) out[r * v.k + k] = v.distance(r, k, c[0][i][j], NP == 2 ? c[NP - 1][i][j] : T(0));
    }
  }
}

inline at::Tensor distance_cuda(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                                const at::Tensor& codebook) {
  const CodebookTerms terms(z, weight, codebook);
  const int64_t n = z.size(0), k = codebook.size(0);
  auto out = at::empty({n, k}, terms.wz.options());
  if (n == 0) return out;
  const dim3 grid(ceil_div(n, kTile), ceil_div(k, kTile));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_acc(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto view = distance_view<T>(terms);
    const auto kernel = terms.full_weight ? distance_kernel<T, 2> : distance_kernel<T, 1>;
    GMVQ_LAUNCH(kernel, grid, kThreads, 0, stream, view, out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace gmvq::cuda
