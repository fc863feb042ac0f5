// gumbel_argmax: y = softmax((l + g) / T) with Gumbel noise g (given, or
// Philox element n*K + k), indices = argmax_k (l + g) (ties to the lowest k);
// hard returns the exact one-hot of the indices (straight-through gradient).
// The backward op regenerates g and recomputes y row by row: it needs no
// N x K tensor besides its inputs. Formulas: docs/math.md (Gumbel-softmax).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gmvq/checks.h"
#include "gmvq/philox.h"
#include "philox_fill.h"
#include "row_math.h"
#include "subnormals.h"

namespace gmvq {
namespace {

// Rows per parallel task (each row is K exps and, without given noise, K/4 Philox calls).
constexpr int64_t kRowGrain = 16;

// The perturbed logits l + g of a row, in the accumulation type.
template <typename acc_t>
struct PerturbedRows {
  const acc_t* logits;  // (N, K), contiguous
  const acc_t* noise;   // (N, K), contiguous, or nullptr for the Philox Gumbel noise
  int64_t k;
  NoiseState key;

  void row(int64_t n, float* philox_buffer, acc_t* out) const {
    const acc_t* l = logits + n * k;
    if (noise != nullptr) {
      const acc_t* g = noise + n * k;
      for (int64_t j = 0; j < k; ++j) out[j] = l[j] + g[j];
    } else {
      cpu::row::perturb_row_max(key.seed, key.offset, static_cast<uint64_t>(n * k), l, philox_buffer, out, k);
    }
  }
};

// Logits (and given noise) in the accumulation dtype, contiguous.
struct DenseInputs {
  at::Tensor logits, noise;
};

DenseInputs dense_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& noise) {
  const auto acc = accumulation_type(logits.scalar_type());
  return {logits.to(acc).contiguous(), noise.has_value() ? noise->to(acc).contiguous() : at::Tensor()};
}

template <typename acc_t>
PerturbedRows<acc_t> perturbed_rows(const DenseInputs& in, const at::Tensor& noise_state) {
  return {in.logits.data_ptr<acc_t>(), in.noise.defined() ? in.noise.data_ptr<acc_t>() : nullptr,
          in.logits.size(1), host_noise_state(noise_state)};
}

std::tuple<at::Tensor, at::Tensor> gumbel_argmax_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                     bool hard, const at::Tensor& noise_state,
                                                     const std::optional<at::Tensor>& noise) {
  check_gumbel_argmax_inputs(logits, temperature, noise_state, noise);
  const int64_t n = logits.size(0), k = logits.size(1);
  const auto in = dense_inputs(logits, noise);
  auto sample = at::empty({n, k}, in.logits.options());
  auto indices = at::empty({n}, in.logits.options().dtype(at::kLong));
  int64_t* index_data = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "gumbel_argmax_cpu", [&] {
    const auto rows = perturbed_rows<scalar_t>(in, noise_state);
    scalar_t* out = sample.data_ptr<scalar_t>();
    const auto inverse_temperature = static_cast<scalar_t>(1.0 / host_temperature(temperature));
    at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> philox_buffer(std::min(k, cpu::row::kNoiseChunk));
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* y = out + row * k;
        rows.row(row, philox_buffer.data(), y);
        const int64_t best = cpu::row::row_argmax(y, k);
        index_data[row] = best;
        if (hard) {
          std::fill(y, y + k, scalar_t(0));
          y[best] = scalar_t(1);
        } else {
          cpu::row::softmax_row(y, inverse_temperature, y, k);
        }
      }
    });
  });
  return {sample, indices};
}

// G_l = (1/T) y (G_y - sum_k y G_y), for the soft and the straight-through
// hard sample alike.
at::Tensor gumbel_argmax_backward_cpu(const at::Tensor& grad_sample, const at::Tensor& logits,
                                      const at::Tensor& temperature, const at::Tensor& noise_state,
                                      const std::optional<at::Tensor>& noise) {
  check_gumbel_argmax_backward_inputs(grad_sample, logits, temperature, noise_state, noise);
  const int64_t n = logits.size(0), k = logits.size(1);
  const auto in = dense_inputs(logits, noise);
  const auto grad = grad_sample.to(in.logits.scalar_type()).contiguous();
  auto grad_logits = at::empty({n, k}, in.logits.options());
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "gumbel_argmax_backward_cpu", [&] {
    const auto rows = perturbed_rows<scalar_t>(in, noise_state);
    const scalar_t* g_y = grad.data_ptr<scalar_t>();
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    const auto inverse_temperature = static_cast<scalar_t>(1.0 / host_temperature(temperature));
    at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> philox_buffer(std::min(k, cpu::row::kNoiseChunk));
      std::vector<scalar_t> y(k);
      for (int64_t row = begin; row < end; ++row) {
        rows.row(row, philox_buffer.data(), y.data());
        cpu::row::softmax_row(y.data(), inverse_temperature, y.data(), k);
        const scalar_t* g_row = g_y + row * k;
        const scalar_t dot = cpu::row::row_dot(y.data(), g_row, k);
        scalar_t* out_row = out + row * k;
        for (int64_t j = 0; j < k; ++j) out_row[j] = inverse_temperature * y[j] * (g_row[j] - dot);
      }
    });
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(gmvq, CPU, m) {
  m.impl("gumbel_argmax", cpu::without_subnormals<&gumbel_argmax_cpu>);
  m.impl("gumbel_argmax_backward", cpu::without_subnormals<&gumbel_argmax_backward_cpu>);
}

}  // namespace gmvq
