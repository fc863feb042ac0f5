// gumbel_argmax: y = softmax((l + g) / T) with Gumbel noise g (given, or
// Philox element n*K + k), indices = argmax_k (l + g) (ties to the lowest k);
// hard returns the exact one-hot of the indices (straight-through gradient).
// The backward op regenerates g and recomputes y row by row: it needs no
// N x K tensor besides its inputs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gmvq/checks.h"
#include "gmvq/philox.h"

namespace gmvq {
namespace {

// Rows per parallel task (each row is K exps and, without given noise, K/4 Philox calls).
constexpr int64_t kRowGrain = 16;

// The perturbed logits l + g of one row, in the accumulation type.
template <typename acc_t>
struct PerturbedRows {
  const acc_t* logits;  // (N, K), contiguous
  const acc_t* noise;   // (N, K), contiguous, or nullptr for the Philox Gumbel noise
  int64_t k;
  int64_t seed, offset;

  void row(int64_t n, float* philox_buffer, acc_t* out) const {
    const acc_t* l = logits + n * k;
    if (noise != nullptr) {
      const acc_t* g = noise + n * k;
      for (int64_t j = 0; j < k; ++j) out[j] = l[j] + g[j];
    } else {
      // float32 noise, then one rounding in acc_t: what the reference does.
      rng::fill_gumbel(seed, offset, static_cast<uint64_t>(n * k), k, philox_buffer);
      for (int64_t j = 0; j < k; ++j) out[j] = l[j] + static_cast<acc_t>(philox_buffer[j]);
    }
  }
};

// First index of the largest value (strictly greater wins, so ties go low).
template <typename acc_t>
int64_t argmax_row(const acc_t* x, int64_t k) {
  int64_t best = 0;
  for (int64_t j = 1; j < k; ++j) {
    if (x[j] > x[best]) best = j;
  }
  return best;
}

// x <- softmax(x / T), computed as torch.softmax does: scale, subtract the max.
template <typename acc_t>
void softmax_row(acc_t* x, int64_t k, acc_t temperature) {
  acc_t max_value = x[0] / temperature;
  for (int64_t j = 0; j < k; ++j) {
    x[j] = x[j] / temperature;
    max_value = std::max(max_value, x[j]);
  }
  acc_t total = 0;
  for (int64_t j = 0; j < k; ++j) {
    x[j] = std::exp(x[j] - max_value);
    total += x[j];
  }
  for (int64_t j = 0; j < k; ++j) x[j] = x[j] / total;
}

// Logits (and given noise) in the accumulation dtype, contiguous.
struct DenseInputs {
  at::Tensor logits, noise;
};

DenseInputs dense_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& noise) {
  const auto acc = accumulation_type(logits.scalar_type());
  return {logits.to(acc).contiguous(), noise.has_value() ? noise->to(acc).contiguous() : at::Tensor()};
}

template <typename acc_t>
PerturbedRows<acc_t> perturbed_rows(const DenseInputs& in, int64_t seed, int64_t offset) {
  return {in.logits.data_ptr<acc_t>(), in.noise.defined() ? in.noise.data_ptr<acc_t>() : nullptr,
          in.logits.size(1), seed, offset};
}

std::tuple<at::Tensor, at::Tensor> gumbel_argmax_cpu(const at::Tensor& logits, double temperature,
                                                     bool hard, int64_t seed, int64_t offset,
                                                     const std::optional<at::Tensor>& noise) {
  check_logits(logits);
  check_positive_finite(temperature, "temperature");
  const int64_t n = logits.size(0), k = logits.size(1);
  check_noise(noise, "noise", n, k, logits);

  const auto in = dense_inputs(logits, noise);
  auto sample = at::empty({n, k}, in.logits.options());
  auto indices = at::empty({n}, in.logits.options().dtype(at::kLong));
  int64_t* index_data = indices.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "gumbel_argmax_cpu", [&] {
    const auto rows = perturbed_rows<scalar_t>(in, seed, offset);
    scalar_t* out = sample.data_ptr<scalar_t>();
    const auto tau = static_cast<scalar_t>(temperature);
    at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> philox_buffer(k);
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* y = out + row * k;
        rows.row(row, philox_buffer.data(), y);
        const int64_t best = argmax_row(y, k);
        index_data[row] = best;
        if (hard) {
          std::fill(y, y + k, scalar_t(0));
          y[best] = scalar_t(1);
        } else {
          softmax_row(y, k, tau);
        }
      }
    });
  });
  return {sample, indices};
}

// G_l = (1/T) y (G_y - sum_k y G_y), for the soft and the straight-through
// hard sample alike.
at::Tensor gumbel_argmax_backward_cpu(const at::Tensor& grad_sample, const at::Tensor& logits,
                                      double temperature, int64_t seed, int64_t offset,
                                      const std::optional<at::Tensor>& noise) {
  check_logits(logits);
  check_positive_finite(temperature, "temperature");
  const int64_t n = logits.size(0), k = logits.size(1);
  check_noise(noise, "noise", n, k, logits);
  check_grad(grad_sample, "grad_sample", {n, k}, logits);

  const auto in = dense_inputs(logits, noise);
  const auto grad = grad_sample.to(in.logits.scalar_type()).contiguous();
  auto grad_logits = at::empty({n, k}, in.logits.options());
  AT_DISPATCH_FLOATING_TYPES(in.logits.scalar_type(), "gumbel_argmax_backward_cpu", [&] {
    const auto rows = perturbed_rows<scalar_t>(in, seed, offset);
    const scalar_t* g_y = grad.data_ptr<scalar_t>();
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    const auto tau = static_cast<scalar_t>(temperature);
    at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> philox_buffer(k);
      std::vector<scalar_t> y(k);
      for (int64_t row = begin; row < end; ++row) {
        rows.row(row, philox_buffer.data(), y.data());
        softmax_row(y.data(), k, tau);
        const scalar_t* g_row = g_y + row * k;
        scalar_t dot = 0;
        for (int64_t j = 0; j < k; ++j) dot += y[j] * g_row[j];
        scalar_t* out_row = out + row * k;
        for (int64_t j = 0; j < k; ++j) out_row[j] = y[j] * (g_row[j] - dot) / tau;
      }
    });
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(gmvq, CPU, m) {
  m.impl("gumbel_argmax", &gumbel_argmax_cpu);
  m.impl("gumbel_argmax_backward", &gumbel_argmax_backward_cpu);
}

}  // namespace gmvq
