// Philox noise tensors on CUDA, float32, bit-identical to the CPU and to
// gmvq_ext/reference.py (defined in csrc/cuda/philox_noise.cu).
#pragma once

#include <ATen/ATen.h>

namespace gmvq::cuda {

// Gumbel(0, 1), element n*K + k of stream 0: (N, K).
at::Tensor gumbel_noise_cuda(int64_t n, int64_t k, int64_t seed, int64_t offset,
                             const at::TensorOptions& options);
// N(0, 1), element n*D + d of stream 1: (N, D).
at::Tensor gaussian_noise_cuda(int64_t n, int64_t d, int64_t seed, int64_t offset,
                               const at::TensorOptions& options);

}  // namespace gmvq::cuda
