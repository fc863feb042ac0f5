// gumbel_argmax on CUDA: one warp per row adds the Gumbel noise (given, or
// regenerated from Philox in the kernel, never stored), takes the argmax and
// the tempered softmax. Backward regenerates the soft sample the same way and
// applies G_l = (1/T) y (G_y - sum_k y G_y) (straight-through for hard).
// The temperature and the noise state may live on the device: the kernel
// reads them there, nothing syncs.
#include <torch/library.h>

#include "gmvq/checks.h"
#include "gmvq/cuda/row_softmax.cuh"

namespace gmvq::cuda {
namespace {

// The soft sample y (or the one-hot) and the argmax, in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> sample(const at::Tensor& logits, const at::Tensor& temperature,
                                          bool one_hot, const at::Tensor& noise_state,
                                          const std::optional<at::Tensor>& noise) {
  const auto acc = accumulation_type(logits.scalar_type());
  const auto x = to_acc(logits, acc);
  const auto g = noise.has_value() ? to_acc(*noise, acc) : at::Tensor();
  const InverseTemperature inv_temperature(temperature, acc);
  const NoiseArg noise_arg(noise_state);
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
    args.key = noise_arg.key();
    args.inv_scale = inv_temperature.arg<T>();
    args.one_hot = one_hot;
    args.n = x.size(0);
    args.k = x.size(1);
    launch_row_softmax(args);
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor> gumbel_argmax(const at::Tensor& logits, const at::Tensor& temperature,
                                                 bool hard, const at::Tensor& noise_state,
                                                 const std::optional<at::Tensor>& noise) {
  check_gumbel_argmax_inputs(logits, temperature, noise_state, noise);
  const c10::cuda::CUDAGuard guard(logits.device());
  return sample(logits, temperature, hard, noise_state, noise);
}

at::Tensor gumbel_argmax_backward(const at::Tensor& grad_sample, const at::Tensor& logits,
                                  const at::Tensor& temperature, const at::Tensor& noise_state,
                                  const std::optional<at::Tensor>& noise) {
  check_gumbel_argmax_backward_inputs(grad_sample, logits, temperature, noise_state, noise);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto y = std::get<0>(sample(logits, temperature, /*one_hot=*/false, noise_state, noise));
  const auto g = grad_sample.to(y.scalar_type());
  // A 0-dim temperature on the CPU or the device: either divides without a sync.
  const auto grad = y * (g - (y * g).sum(1, /*keepdim=*/true)) / temperature.to(y.scalar_type());
  return grad.to(logits.scalar_type()).contiguous();
}

}  // namespace
}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) {
  m.impl("gumbel_argmax", &gmvq::cuda::gumbel_argmax);
  m.impl("gumbel_argmax_backward", &gmvq::cuda::gumbel_argmax_backward);
}
