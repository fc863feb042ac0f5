// The weighted codebook distance and its gradient, shared by the CPU
// codebook_distance and weighted_softmax kernels. GEMM form of docs/math.md#codebook_distance
// ("Distance logits"), written for d = -l:
//   d = a 1^T - 2 (w*z) E^T + w (E*E)^T,   a[n] = sum_d w z^2
// Both functions take inputs that already passed check_codebook_inputs and
// work in the accumulation dtype; these unfused ops may hold N x K tensors.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "gemm.h"
#include "gmvq/checks.h"

namespace gmvq::cpu {

// x in dtype, contiguous (a transposed, sliced or expanded input is copied).
inline at::Tensor dense(const at::Tensor& x, at::ScalarType dtype) {
  return x.to(dtype).contiguous();
}

// d[n, k] = sum_d w[n, d] (z[n, d] - E[k, d])^2 in the accumulation dtype,
// clamped at 0: the GEMM form can round a true 0 slightly below it.
inline at::Tensor distance_forward(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                                   const at::Tensor& codebook) {
  const auto acc = accumulation_type(z.scalar_type());
  const auto z_acc = dense(z, acc);
  const auto e_acc = dense(codebook, acc);
  const auto code_norms = (e_acc * e_acc).sum(1);  // (K,)
  at::Tensor distance;
  if (!weight.has_value()) {
    const auto row_term = (z_acc * z_acc).sum(1, /*keepdim=*/true);
    distance = row_term - 2.0 * cpu::mm(z_acc, e_acc.t()) + code_norms.unsqueeze(0);
  } else {
    const auto w = dense(*weight, acc);  // (N, D) or (N, 1): broadcasts over D
    const auto wz = w * z_acc;
    const auto row_term = (wz * z_acc).sum(1, /*keepdim=*/true);
    // w (E*E)^T: a GEMM for a per-dimension weight, an outer product for a
    // per-vector one (w_n * ||e_k||^2).
    const auto code_term = w.size(1) == 1 ? w * code_norms.unsqueeze(0) : cpu::mm(w, (e_acc * e_acc).t());
    distance = row_term - 2.0 * cpu::mm(wz, e_acc.t()) + code_term;
  }
  return distance.clamp_min_(0);
}

// Gradients of sum(grad_distance * d) for the unclamped d (the clamp only
// removes rounding), each in its input's dtype; an absent weight gets an
// empty gradient. With S = sum_k G_d, P = G_d E, Q = G_d (E*E):
//   G_z = 2 w (z S - P),  G_w = z^2 S - 2 z P + Q (summed over D for a
//   (N, 1) weight),  G_E = 2 (E * (G_d^T w) - G_d^T (w z)).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> distance_backward(
    const at::Tensor& grad_distance, const at::Tensor& z, const std::optional<at::Tensor>& weight,
    const at::Tensor& codebook) {
  const auto acc = accumulation_type(z.scalar_type());
  const auto g = dense(grad_distance, acc);
  const auto z_acc = dense(z, acc);
  const auto e_acc = dense(codebook, acc);
  const auto g_t = g.t();
  const auto row_sums = g.sum(1, /*keepdim=*/true);  // S, (N, 1)
  const auto g_e = cpu::mm(g, e_acc);                 // P, (N, D)
  const auto centred = z_acc * row_sums - g_e;       // z S - P

  at::Tensor grad_z, grad_weight, grad_codebook;
  if (!weight.has_value()) {
    grad_z = 2.0 * centred;
    const auto col_sums = g.sum(0).unsqueeze(1);  // G_d^T 1, (K, 1)
    grad_codebook = 2.0 * (e_acc * col_sums - cpu::mm(g_t, z_acc));
    grad_weight = absent_grad(z);
  } else {
    const auto w = dense(*weight, acc);
    grad_z = 2.0 * w * centred;
    grad_codebook = 2.0 * (e_acc * cpu::mm(g_t, w) - cpu::mm(g_t, w * z_acc));
    const auto g_e2 = cpu::mm(g, e_acc * e_acc);  // Q, (N, D)
    auto per_dim = z_acc * z_acc * row_sums - 2.0 * z_acc * g_e + g_e2;
    grad_weight = (w.size(1) == 1 ? per_dim.sum(1, /*keepdim=*/true) : per_dim)
                      .to(weight->scalar_type())
                      .contiguous();
  }
  return {grad_z.to(z.scalar_type()).contiguous(), grad_weight,
          grad_codebook.to(codebook.scalar_type()).contiguous()};
}

}  // namespace gmvq::cpu
