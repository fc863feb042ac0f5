// gumbel_argmax on CUDA: one warp per row adds the Gumbel noise (given, or
// regenerated from Philox in the kernel, never stored), takes the argmax and
// the tempered softmax. Backward regenerates the soft sample the same way and
// applies G_l = (1/T) y (G_y - sum_k y G_y) (straight-through for hard).
#include <torch/library.h>

#include "gmvq/checks.h"
#include "gmvq/cuda/row_softmax.cuh"

namespace gmvq::cuda {
namespace {

// The soft sample y (or the one-hot) and the argmax, in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> sample(const at::Tensor& logits, double temperature, bool one_hot,
                                          int64_t seed, int64_t offset,
                                          const std::optional<at::Tensor>& noise) {
  const auto acc = accumulation_type(logits.scalar_type());
  const auto x = to_acc(logits, acc);
  const auto g = noise.has_value() ? to_acc(*noise, acc) : at::Tensor();
  auto out = at::empty_like(x);
  auto index = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  dispatch_acc(acc, [&](auto tag) {
    using T = decltype(tag);
    RowSoftmaxArgs<T> args;
    args.input = x.data_ptr<T>();
    args.out = out.data_ptr<T>();
    args.index = index.data_ptr<int64_t>();
    args.noise = g.defined() ? g.data_ptr<T>() : nullptr;
    args.philox = !g.defined();
    args.seed = seed;
    args.offset = offset;
    args.divisor = static_cast<T>(temperature);
    args.one_hot = one_hot;
    args.n = x.size(0);
    args.k = x.size(1);
    launch_row_softmax(args);
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor> gumbel_argmax(const at::Tensor& logits, double temperature,
                                                 bool hard, int64_t seed, int64_t offset,
                                                 const std::optional<at::Tensor>& noise) {
  check_logits(logits);
  check_positive_finite(temperature, "temperature");
  check_noise(noise, "noise", logits.size(0), logits.size(1), logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  return sample(logits, temperature, hard, seed, offset, noise);
}

at::Tensor gumbel_argmax_backward(const at::Tensor& grad_sample, const at::Tensor& logits,
                                  double temperature, int64_t seed, int64_t offset,
                                  const std::optional<at::Tensor>& noise) {
  check_logits(logits);
  check_grad(grad_sample, "grad_sample", logits.sizes(), logits);
  check_positive_finite(temperature, "temperature");
  check_noise(noise, "noise", logits.size(0), logits.size(1), logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto y = std::get<0>(sample(logits, temperature, /*one_hot=*/false, seed, offset, noise));
  const auto g = grad_sample.to(y.scalar_type());
  const auto grad = y * (g - (y * g).sum(1, /*keepdim=*/true)) / temperature;
  return grad.to(logits.scalar_type()).contiguous();
}

}  // namespace
}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) {
  m.impl("gumbel_argmax", &gmvq::cuda::gumbel_argmax);
  m.impl("gumbel_argmax_backward", &gmvq::cuda::gumbel_argmax_backward);
}
