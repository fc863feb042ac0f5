// aggregated_posterior_entropy: q_bar = (1 / max(N, 1)) sum_n softmax(l)[n]
// and H = -sum_k q_bar log(max(q_bar, 1e-30)); and its backward op, which
// recomputes the posterior row by row from the logits.
//
// The column sum over n runs over fixed blocks of rows whose partial sums
// are added in block order: the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gmvq/checks.h"
#include "row_math.h"
#include "subnormals.h"

namespace gmvq {
namespace {

// Rows per partial sum of q_bar (a constant, not the thread count, so results are reproducible).
constexpr int64_t kRowsPerBlock = 64;
// reference.LOG_CLAMP: the smallest probability whose log is taken.
constexpr double kLogClamp = 1e-30;
// Rows per parallel task of the row-wise loops.
constexpr int64_t kRowGrain = 16;

// lse[n] = logsumexp_k l[n, k], so that pi[n, k] = exp(l[n, k] - lse[n]).
template <typename acc_t>
void row_log_sum_exp(const acc_t* logits, int64_t n, int64_t k, acc_t* lse) {
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) lse[row] = cpu::row::log_sum_exp(logits + row * k, acc_t(1), k);
  });
}

std::tuple<at::Tensor, at::Tensor> aggregated_posterior_entropy_cpu(const at::Tensor& logits) {
  check_logits(logits);
  const auto acc = accumulation_type(logits.scalar_type());
  const auto l = logits.to(acc).contiguous();
  const int64_t n = l.size(0), k = l.size(1);
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  auto q_bar = at::zeros({k}, l.options());
  auto entropy = at::empty({}, l.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "aggregated_posterior_entropy_cpu", [&] {
    const scalar_t* l_data = l.data_ptr<scalar_t>();
    auto lse_tensor = at::empty({n}, l.options());
    scalar_t* lse = lse_tensor.data_ptr<scalar_t>();
    row_log_sum_exp(l_data, n, k, lse);

    auto partial = at::zeros({blocks, k}, l.options());
    scalar_t* partial_data = partial.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> pi(k);
      for (int64_t block = begin; block < end; ++block) {
        scalar_t* sums = partial_data + block * k;
        const int64_t last = std::min(n, (block + 1) * kRowsPerBlock);
        for (int64_t row = block * kRowsPerBlock; row < last; ++row) {
          cpu::row::exp_affine_row(l_data + row * k, scalar_t(1), lse[row], pi.data(), k);
          for (int64_t j = 0; j < k; ++j) sums[j] += pi[j];
        }
      }
    });

    scalar_t* q = q_bar.data_ptr<scalar_t>();
    const auto rows = static_cast<scalar_t>(std::max<int64_t>(n, 1));
    scalar_t h = 0;
    for (int64_t j = 0; j < k; ++j) {
      scalar_t total = 0;
      for (int64_t block = 0; block < blocks; ++block) total += partial_data[block * k + j];
      q[j] = total / rows;
      h += q[j] * std::log(std::max(q[j], static_cast<scalar_t>(kLogClamp)));
    }
    *entropy.data_ptr<scalar_t>() = -h;
  });
  return {entropy, q_bar};
}

// With M = max(N, 1) and c = max(q_bar, 1e-30) (gradient only where q_bar >= 1e-30,
// like clamp_min's), the total gradient on q_bar is
//   G_q[k] = grad_q_bar[k] - grad_entropy (log c[k] + [q_bar[k] >= 1e-30] q_bar[k] / c[k]),
// each row's posterior receives G_pi = G_q / M and the softmax backward gives
//   G_l[n, k] = pi[n, k] (G_pi[k] - sum_j pi[n, j] G_pi[j]).
at::Tensor aggregated_posterior_entropy_backward_cpu(const at::Tensor& grad_entropy,
                                                     const at::Tensor& grad_q_bar,
                                                     const at::Tensor& logits,
                                                     const at::Tensor& q_bar) {
  check_entropy_backward_inputs(grad_entropy, grad_q_bar, logits, q_bar);
  const int64_t n = logits.size(0), k = logits.size(1);
  const auto acc = accumulation_type(logits.scalar_type());
  const auto l = logits.to(acc).contiguous();
  const auto q = q_bar.to(acc).contiguous();
  const auto g_q_bar = grad_q_bar.to(acc).contiguous();
  auto grad_logits = at::empty({n, k}, l.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "aggregated_posterior_entropy_backward_cpu", [&] {
    const auto g_h = grad_entropy.to(acc).item<scalar_t>();
    const auto clamp = static_cast<scalar_t>(kLogClamp);
    const auto rows = static_cast<scalar_t>(std::max<int64_t>(n, 1));
    const scalar_t* q_data = q.data_ptr<scalar_t>();
    const scalar_t* g_q_data = g_q_bar.data_ptr<scalar_t>();
    std::vector<scalar_t> g_pi(k);
    for (int64_t j = 0; j < k; ++j) {
      const scalar_t c = std::max(q_data[j], clamp);
      const scalar_t through_log = q_data[j] >= clamp ? -g_h * q_data[j] / c : scalar_t(0);
      g_pi[j] = (g_q_data[j] + -g_h * std::log(c) + through_log) / rows;
    }

    const scalar_t* l_data = l.data_ptr<scalar_t>();
    auto lse_tensor = at::empty({n}, l.options());
    scalar_t* lse = lse_tensor.data_ptr<scalar_t>();
    row_log_sum_exp(l_data, n, k, lse);
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> pi(k);
      for (int64_t row = begin; row < end; ++row) {
        cpu::row::exp_affine_row(l_data + row * k, scalar_t(1), lse[row], pi.data(), k);
        const scalar_t dot = cpu::row::row_dot(pi.data(), g_pi.data(), k);
        scalar_t* out_row = out + row * k;
        for (int64_t j = 0; j < k; ++j) out_row[j] = pi[j] * (g_pi[j] - dot);
      }
    });
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(gmvq, CPU, m) {
  m.impl("aggregated_posterior_entropy", cpu::without_subnormals<&aggregated_posterior_entropy_cpu>);
  m.impl("aggregated_posterior_entropy_backward", cpu::without_subnormals<&aggregated_posterior_entropy_backward_cpu>);
}

}  // namespace gmvq
