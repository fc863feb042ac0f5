// weighted_softmax: probs = softmax(-d / T) over the K codes and the row
// log-sum-exp lse, d the weighted codebook distance; and its backward op,
// which uses the saved probs instead of recomputing them.
#include <torch/library.h>

#include <limits>

#include "distance_math.h"
#include "gmvq/checks.h"
#include "subnormals.h"

namespace gmvq {
namespace {

std::tuple<at::Tensor, at::Tensor> weighted_softmax_cpu(const at::Tensor& z,
                                                        const std::optional<at::Tensor>& weight,
                                                        const at::Tensor& codebook,
                                                        const at::Tensor& temperature) {
  check_weighted_softmax_inputs(z, weight, codebook, temperature);
  const auto logits = cpu::distance_forward(z, weight, codebook).mul_(-1.0 / host_temperature(temperature));
  auto lse = at::logsumexp(logits, /*dim=*/1);
  auto probs = at::exp(logits - lse.unsqueeze(1));
  // ATen's vectorised exp builds its underflowing results from the exponent
  // bits, which flush-to-zero does not see: the same rule as the other ops by hand.
  const double smallest_normal = probs.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                                    : std::numeric_limits<float>::min();
  probs.masked_fill_(probs < smallest_normal, 0.0);
  return {probs, lse};
}

// G_l = p (G_p - sum_k p G_p) + G_lse p for the logits l = -d / T, then the
// distance backward with G_d = -G_l / T.
std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_softmax_backward_cpu(
    const at::Tensor& grad_probs, const at::Tensor& grad_lse, const at::Tensor& probs,
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    const at::Tensor& temperature) {
  check_weighted_softmax_backward_inputs(grad_probs, grad_lse, probs, z, weight, codebook, temperature);
  const auto acc = accumulation_type(z.scalar_type());
  const auto p = cpu::dense(probs, acc);
  const auto g_p = cpu::dense(grad_probs, acc);
  const auto g_lse = cpu::dense(grad_lse, acc).unsqueeze(1);
  const auto grad_logits = p * (g_p - (p * g_p).sum(1, /*keepdim=*/true)) + g_lse * p;
  return cpu::distance_backward(grad_logits.mul_(-1.0 / host_temperature(temperature)), z, weight, codebook);
}

}  // namespace

TORCH_LIBRARY_IMPL(gmvq, CPU, m) {
  m.impl("weighted_softmax", cpu::without_subnormals<&weighted_softmax_cpu>);
  m.impl("weighted_softmax_backward", cpu::without_subnormals<&weighted_softmax_backward_cpu>);
}

}  // namespace gmvq
