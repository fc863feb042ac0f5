// aggregated_posterior_entropy on CUDA: the row softmax kernel writes the
// (N, K) posterior, its column mean is a fixed-order reduction (deterministic),
// and the entropy and backward are O(N K) elementwise formulas:
//   dH/dq_bar = -(log max(q_bar, 1e-30) + [q_bar >= 1e-30]),
//   G_pi[n, k] = (G_q_bar[k] + G_H dH/dq_bar[k]) / N,  G_l = pi (G_pi - sum_k pi G_pi).
#include <torch/library.h>

#include "gmvq/checks.h"
#include "gmvq/cuda/row_softmax.cuh"

namespace gmvq::cuda {
namespace {

constexpr double kLogClamp = 1e-30;  // reference.LOG_CLAMP

at::Tensor posterior(const at::Tensor& logits) {
  const auto x = to_acc(logits, accumulation_type(logits.scalar_type()));
  auto out = at::empty_like(x);
  dispatch_acc(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    RowSoftmaxArgs<T> args;
    args.input = x.data_ptr<T>();
    args.out = out.data_ptr<T>();
    args.n = x.size(0);
    args.k = x.size(1);
    launch_row_softmax(args);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> aggregated_posterior_entropy(const at::Tensor& logits) {
  check_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const auto q_bar = posterior(logits).sum(0) / static_cast<double>(std::max<int64_t>(n, 1));
  const auto entropy = -(q_bar * q_bar.clamp_min(kLogClamp).log()).sum();
  return {entropy, q_bar};
}

at::Tensor aggregated_posterior_entropy_backward(const at::Tensor& grad_entropy,
                                                 const at::Tensor& grad_q_bar,
                                                 const at::Tensor& logits, const at::Tensor& q_bar) {
  check_entropy_backward_inputs(grad_entropy, grad_q_bar, logits, q_bar);
  const int64_t n = logits.size(0);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = accumulation_type(logits.scalar_type());
  const auto q = q_bar.to(acc);
  const auto dh_dq = -(q.clamp_min(kLogClamp).log() + (q >= kLogClamp).to(acc));
  const auto g_q = grad_q_bar.to(acc) + grad_entropy.to(acc) * dh_dq;
  const auto g_pi = (g_q / static_cast<double>(std::max<int64_t>(n, 1))).unsqueeze(0);
  const auto pi = posterior(logits);
  const auto grad = pi * (g_pi - (pi * g_pi).sum(1, /*keepdim=*/true));
  return grad.to(logits.scalar_type()).contiguous();
}

}  // namespace
}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) {
  m.impl("aggregated_posterior_entropy", &gmvq::cuda::aggregated_posterior_entropy);
  m.impl("aggregated_posterior_entropy_backward", &gmvq::cuda::aggregated_posterior_entropy_backward);
}
