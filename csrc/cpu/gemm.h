// The CPU kernels' GEMMs, each through one of these, so that the subnormal
// check (subnormals.h, GMVQ_DEBUG_SUBNORMALS=1) sees every operand and result.
#pragma once

#include <ATen/ATen.h>

#include "subnormals.h"

namespace gmvq::cpu {

inline void count_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& result) {
  count_subnormals(a);
  count_subnormals(b);
  count_subnormals(result);
}

// out = a b
inline void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b);
  if (counting_subnormals()) count_gemm(a, b, out);
}

// out += a b
inline void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  out.addmm_(a, b);
  if (counting_subnormals()) count_gemm(a, b, out);
}

// a b
inline at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::mm(a, b);
  if (counting_subnormals()) count_gemm(a, b, out);
  return out;
}

}  // namespace gmvq::cpu
