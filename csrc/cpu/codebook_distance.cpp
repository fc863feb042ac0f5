// codebook_distance: d[n, k] = sum_d w[n, d] (z[n, d] - codebook[k, d])^2,
// (N, K) in the accumulation dtype, and its backward op.
#include <torch/library.h>

#include "distance_math.h"
#include "gmvq/checks.h"
#include "subnormals.h"

namespace gmvq {
namespace {

at::Tensor codebook_distance_cpu(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                                 const at::Tensor& codebook) {
  check_codebook_inputs(z, weight, codebook);
  return cpu::distance_forward(z, weight, codebook);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> codebook_distance_backward_cpu(
    const at::Tensor& grad_distance, const at::Tensor& z, const std::optional<at::Tensor>& weight,
    const at::Tensor& codebook) {
  check_codebook_distance_backward_inputs(grad_distance, z, weight, codebook);
  return cpu::distance_backward(grad_distance, z, weight, codebook);
}

}  // namespace

TORCH_LIBRARY_IMPL(gmvq, CPU, m) {
  m.impl("codebook_distance", cpu::without_subnormals<&codebook_distance_cpu>);
  m.impl("codebook_distance_backward", cpu::without_subnormals<&codebook_distance_backward_cpu>);
}

}  // namespace gmvq
