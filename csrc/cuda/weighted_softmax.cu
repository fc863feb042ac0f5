// weighted_softmax on CUDA: the distance tile kernel writes (N, K) distances,
// then one warp per row turns them in place into softmax(-d / T) (as
// -d * (1/T)) and the row log-sum-exp. Backward: the softmax gradient
// (elementwise, O(N K)) and the distance backward (distance_backward.cuh).
// The temperature may live on the device; nothing syncs.
#include <torch/library.h>

#include "gmvq/checks.h"
#include "gmvq/cuda/distance.cuh"
#include "gmvq/cuda/distance_backward.cuh"
#include "gmvq/cuda/row_softmax.cuh"

namespace gmvq::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> weighted_softmax(const at::Tensor& z,
                                                    const std::optional<at::Tensor>& weight,
                                                    const at::Tensor& codebook, const at::Tensor& temperature) {
  check_weighted_softmax_inputs(z, weight, codebook, temperature);
  const c10::cuda::CUDAGuard guard(z.device());
  auto probs = distance_cuda(z, weight, codebook);
  const InverseTemperature inv_temperature(temperature, probs.scalar_type());
  auto lse = at::empty({z.size(0)}, probs.options());
  dispatch_acc(probs.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    RowSoftmaxArgs<T> args;
    args.input = probs.data_ptr<T>();
    args.out = probs.data_ptr<T>();
    args.lse = lse.data_ptr<T>();
    args.sign = T(-1);
    args.inv_scale = inv_temperature.arg<T>();
    args.n = probs.size(0);
    args.k = probs.size(1);
    launch_row_softmax(args);
  });
  return {probs, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_softmax_backward(
    const at::Tensor& grad_probs, const at::Tensor& grad_lse, const at::Tensor& probs,
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    const at::Tensor& temperature) {
  check_weighted_softmax_backward_inputs(grad_probs, grad_lse, probs, z, weight, codebook, temperature);
  const c10::cuda::CUDAGuard guard(z.device());
  const auto acc = accumulation_type(z.scalar_type());
  const auto p = probs.to(acc);
  const auto gp = grad_probs.to(acc);
  // d softmax: p (G_p - sum_k p G_p); d lse / d logits = p.
  auto grad_logits = p * (gp - (p * gp).sum(1, /*keepdim=*/true)) + grad_lse.to(acc).unsqueeze(1) * p;
  // logits = (-d) / T, so dL/d(-d) = grad_logits / T.
  grad_logits.div_(temperature.to(acc));
  auto [grad_z, grad_w, grad_e] = distance_backward_from_logit_grad(grad_logits, z, weight, codebook);
  return {grad_z.to(z.scalar_type()).contiguous(),
          weight.has_value() ? grad_w.to(weight->scalar_type()).contiguous() : absent_grad(z),
          grad_e.to(codebook.scalar_type()).contiguous()};
}

}  // namespace
}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) {
  m.impl("weighted_softmax", &gmvq::cuda::weighted_softmax);
  m.impl("weighted_softmax_backward", &gmvq::cuda::weighted_softmax_backward);
}
