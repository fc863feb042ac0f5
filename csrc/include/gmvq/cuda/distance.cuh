// The (N, K) weighted squared distance on CUDA in the accumulation dtype
// (defined in csrc/cuda/codebook_distance.cu, used by weighted_softmax.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace gmvq::cuda {

at::Tensor distance_cuda(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                         const at::Tensor& codebook);

}  // namespace gmvq::cuda
