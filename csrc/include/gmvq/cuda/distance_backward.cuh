// Gradients of the weighted squared distance from G_l = dL/d(logits), where
// logits = -distance (docs/math.md#codebook_distance), with S = rowsum G_l, P = G_l E,
// Q = G_l (E * E):
//   G_z = -2 w (z S - P),   G_w = -(z^2 S - 2 z P + Q)  (summed over D for (N, 1)),
//   G_E = 2 (G_l^T (w z) - E * (G_l^T w)).
// Shared by codebook_distance_backward and weighted_softmax_backward.
#pragma once

#include <tuple>

#include "gmvq/cuda/codebook_terms.cuh"
#include "gmvq/cuda/gemm.cuh"

namespace gmvq::cuda {

// (grad_z, grad_weight or undefined, grad_codebook) in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> distance_backward_from_logit_grad(
    const at::Tensor& grad_logits, const at::Tensor& z, const std::optional<at::Tensor>& weight,
    const at::Tensor& codebook) {
  const CodebookTerms terms(z, weight, codebook);
  const auto g = grad_logits.contiguous();
  const int64_t n = z.size(0), d = z.size(1), k = codebook.size(0);
  const auto zc = z.to(terms.wz.scalar_type());
  at::Tensor grad_z, grad_w, grad_e;
  dispatch_acc(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* gp = g.data_ptr<T>();
    // G_l as (N rows, K reduction) and transposed as (K rows, N reduction).
    const Operand<T> g_rows{gp, n, k, 1};
    const Operand<T> g_cols{gp, k, 1, k};
    // E and E*E as (D rows, K reduction); w z and w as (D rows, N reduction).
    const Operand<T> e_t{terms.codebook.data_ptr<T>(), d, 1, d};
    const Operand<T> e2_t{terms.code_sq.data_ptr<T>(), d, 1, d};
    const Operand<T> wz_t{terms.wz.data_ptr<T>(), d, 1, d};
    const Operand<T> w_t{terms.w_full.data_ptr<T>(), d, 1, d};
    const auto opts = g.options();
    const auto s = g.sum(1, /*keepdim=*/true);
    const auto p = gemm_abt<T>(g_rows, e_t, k, opts);
    grad_z = -2.0 * terms.w_full * (zc * s - p);
    if (weight.has_value()) {
      const auto q = gemm_abt<T>(g_rows, e2_t, k, opts);
      grad_w = -(zc * zc * s - 2.0 * zc * p + q);
      if (weight->size(1) == 1) grad_w = grad_w.sum(1, /*keepdim=*/true);  // (N, 1) weight
    }
    const auto gz = gemm_abt<T>(g_cols, wz_t, n, opts);
    const auto gw = weight.has_value() ? gemm_abt<T>(g_cols, w_t, n, opts)
                                       : g.sum(0).unsqueeze(1).expand({k, d});
    grad_e = 2.0 * (gz - terms.codebook * gw);
  });
  return {grad_z, grad_w, grad_e};
}

}  // namespace gmvq::cuda
