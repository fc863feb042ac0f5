// codebook_distance on CUDA: the (N, K) weighted squared distance
// (distance.cuh) and its backward from the (N, K) upstream gradient
// (distance_backward.cuh).
#include <torch/library.h>

#include "gmvq/checks.h"
#include "gmvq/cuda/distance.cuh"
#include "gmvq/cuda/distance_backward.cuh"

namespace gmvq::cuda {
namespace {

at::Tensor codebook_distance(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                             const at::Tensor& codebook) {
  check_codebook_inputs(z, weight, codebook);
  const c10::cuda::CUDAGuard guard(z.device());
  return distance_cuda(z, weight, codebook);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> codebook_distance_backward(
    const at::Tensor& grad_distance, const at::Tensor& z, const std::optional<at::Tensor>& weight,
    const at::Tensor& codebook) {
  check_codebook_distance_backward_inputs(grad_distance, z, weight, codebook);
  const c10::cuda::CUDAGuard guard(z.device());
  const auto acc = accumulation_type(z.scalar_type());
  // logits = -distance: the shared backward takes dL/dlogits.
  auto [grad_z, grad_w, grad_e] =
      distance_backward_from_logit_grad(-grad_distance.to(acc), z, weight, codebook);
  return {grad_z.to(z.scalar_type()).contiguous(),
          weight.has_value() ? grad_w.to(weight->scalar_type()).contiguous() : absent_grad(z),
          grad_e.to(codebook.scalar_type()).contiguous()};
}

}  // namespace
}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) {
  m.impl("codebook_distance", &gmvq::cuda::codebook_distance);
  m.impl("codebook_distance_backward", &gmvq::cuda::codebook_distance_backward);
}
