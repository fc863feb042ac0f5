// philox_noise on CUDA: one thread per block of four elements (one Philox
// call, the key read once per thread), the same transforms as the CPU
// (philox.h), so the bits match. The noise state may live on the device.
#include <torch/library.h>

#include "gmvq/checks.h"
#include "gmvq/cuda/common.cuh"
#include "gmvq/cuda/scalar_args.cuh"
#include "gmvq/philox.h"

namespace gmvq::cuda {
namespace {

using rng::NoiseDistribution;

__device__ __forceinline__ float transform(NoiseDistribution distribution, uint32_t word) {
  switch (distribution) {
    case NoiseDistribution::kUniform:
      return rng::uniform_from_bits(word);
    case NoiseDistribution::kGumbel:
      return rng::gumbel_from_bits(word);
    default:
      return rng::gaussian_from_bits(word);
  }
}

__global__ void philox_noise_kernel(float* out, int64_t numel, NoiseKey key_arg, NoiseDistribution distribution) {
  const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = block * 4;
  if (first >= numel) return;
  const NoiseKey key = key_arg.get();
  const uint64_t stream = distribution == NoiseDistribution::kGaussian ? rng::kGaussianStream : rng::kGumbelStream;
  const rng::Philox4 words = rng::philox_block(key.seed, key.offset, stream, static_cast<uint64_t>(block));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (first + i < numel) out[first + i] = transform(distribution, words.word[i]);
  }
}

at::Tensor philox_noise(const at::Tensor& like, const at::Tensor& noise_state, c10::string_view distribution) {
  const NoiseDistribution kind = check_philox_noise_inputs(like, noise_state, distribution);
  const c10::cuda::CUDAGuard guard(like.device());
  const NoiseArg noise(noise_state);
  auto out = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  constexpr int threads = 256;
  const int64_t blocks = ceil_div(ceil_div(numel, 4), threads);
  GMVQ_LAUNCH(philox_noise_kernel, blocks, threads, 0, c10::cuda::getCurrentCUDAStream(),
              out.data_ptr<float>(), numel, noise.key(), kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) { m.impl("philox_noise", &gmvq::cuda::philox_noise); }
