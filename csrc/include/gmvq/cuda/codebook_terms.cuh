// The weighted squared distance in GEMM form (docs/math.md#codebook_distance),
//   d[n, k] = row[n] - 2 (w z)[n] . e_k + code(n, k),
//   code(n, k) = w[n] . (e_k * e_k)       (weight (N, D): a second product)
//              = wscale[n] * |e_k|^2      (no weight: wscale = 1; weight (N, 1))
// with every operand prepared once on the host in the accumulation dtype.
#pragma once

#include <optional>

#include "gmvq/checks.h"
#include "gmvq/cuda/tile_products.cuh"

namespace gmvq::cuda {

// Host-side tensors (acc dtype, contiguous) that the kernels read.
struct CodebookTerms {
  at::Tensor wz;        // (N, D): w * z, or z without weight
  at::Tensor w_full;    // (N, D): the weight broadcast to (N, D) (ones without weight)
  at::Tensor row;       // (N,): sum_d w z^2
  at::Tensor wscale;    // (N,): the scalar weight (ones for none / unused for full)
  at::Tensor codebook;  // (K, D)
  at::Tensor code_sq;   // (K, D): e * e
  at::Tensor code_norm; // (K,): |e_k|^2
  bool full_weight = false;

  CodebookTerms(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                const at::Tensor& codebook_in) {
    const auto acc = gmvq::accumulation_type(z.scalar_type());
    const auto zc = to_acc(z, acc);
    codebook = to_acc(codebook_in, acc);
    code_sq = codebook * codebook;
    code_norm = code_sq.sum(1);
    const int64_t n = z.size(0);
    if (weight.has_value()) {
      const auto w = to_acc(*weight, acc);
      full_weight = w.size(1) == z.size(1) && z.size(1) != 1;
      w_full = w.expand_as(zc).contiguous();
      wz = w_full * zc;
      row = (wz * zc).sum(1);
      wscale = full_weight ? at::ones({n}, zc.options()) : w.reshape({n}).contiguous();
    } else {
      w_full = at::ones_like(zc);
      wz = zc;
      row = (zc * zc).sum(1);
      wscale = at::ones({n}, zc.options());
    }
  }
};

// What a kernel needs to turn tile products into distances.
template <typename T>
struct DistanceView {
  Operand<T> wz, w_full, codebook, code_sq;
  const T* row;
  const T* wscale;
  const T* code_norm;
  int64_t n, k, d;
  bool full_weight;

  // d from c[0] = (w z) . e and, with a full weight, c[1] = w . e^2;
  // clamped at 0 in value (rounding can go below); NaN stays NaN, as in the
  // CPU's clamp_min.
  __device__ __forceinline__ T distance(int64_t row_i, int64_t code_j, T cross, T weighted_sq) const {
    const T code = full_weight ? weighted_sq : wscale[row_i] * code_norm[code_j];
    const T dist = row[row_i] - T(2) * cross + code;
    return dist < T(0) ? T(0) : dist;
  }
};

template <typename T>
DistanceView<T> distance_view(const CodebookTerms& t) {
  DistanceView<T> v;
  const int64_t n = t.wz.size(0), d = t.wz.size(1), k = t.codebook.size(0);
  v.wz = {t.wz.data_ptr<T>(), n, d, 1};
  v.w_full = {t.w_full.data_ptr<T>(), n, d, 1};
  v.codebook = {t.codebook.data_ptr<T>(), k, d, 1};
  v.code_sq = {t.code_sq.data_ptr<T>(), k, d, 1};
  v.row = t.row.data_ptr<T>();
  v.wscale = t.wscale.data_ptr<T>();
  v.code_norm = t.code_norm.data_ptr<T>();
  v.n = n;
  v.k = k;
  v.d = d;
  v.full_weight = t.full_weight;
  return v;
}

}  // namespace gmvq::cuda
