// philox_noise on CUDA: one thread per block of four elements (one Philox
// call), the same transforms as the CPU (philox.h), so the bits match.
#include <torch/library.h>

#include "gmvq/cuda/common.cuh"
#include "gmvq/cuda/noise.cuh"
#include "gmvq/philox.h"

namespace gmvq::cuda {
namespace {

__global__ void philox_noise_kernel(float* out, int64_t numel, int64_t seed, int64_t offset,
                                    bool gaussian) {
  const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = block * 4;
  if (first >= numel) return;
  const uint64_t stream = gaussian ? rng::kGaussianStream : rng::kGumbelStream;
  const rng::Philox4 words = rng::philox_block(seed, offset, stream, static_cast<uint64_t>(block));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (first + i < numel) {
      out[first + i] = gaussian ? rng::gaussian_from_bits(words.word[i]) : rng::gumbel_from_bits(words.word[i]);
    }
  }
}

at::Tensor philox_noise(const at::Tensor& like, int64_t seed, int64_t offset, bool gaussian) {
  TORCH_CHECK(like.dim() == 2, "like must be a 2-D tensor (R, C), got ", like.dim(), "-D");
  const c10::cuda::CUDAGuard guard(like.device());
  auto out = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  constexpr int threads = 256;
  const int64_t blocks = ceil_div(ceil_div(numel, 4), threads);
  GMVQ_LAUNCH(philox_noise_kernel, blocks, threads, 0, c10::cuda::getCurrentCUDAStream(),
              out.data_ptr<float>(), numel, seed, offset, gaussian);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// Gumbel noise (N, K) for logits on the current device (gumbel_argmax, quantize).
at::Tensor gumbel_noise_cuda(int64_t n, int64_t k, int64_t seed, int64_t offset,
                             const at::TensorOptions& options) {
  return philox_noise(at::empty({n, k}, options), seed, offset, /*gaussian=*/false);
}

// Gaussian noise (N, D) (quantize's eps).
at::Tensor gaussian_noise_cuda(int64_t n, int64_t d, int64_t seed, int64_t offset,
                               const at::TensorOptions& options) {
  return philox_noise(at::empty({n, d}, options), seed, offset, /*gaussian=*/true);
}

}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) { m.impl("philox_noise", &gmvq::cuda::philox_noise); }
