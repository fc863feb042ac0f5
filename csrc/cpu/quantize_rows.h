// The fused quantize's own row code (csrc/cpu/quantize.cpp): the logits
// epilogue, and the logit gradient of a row (docs/math.md, quantize).
#pragma once

#include <cstdint>

#include "vector.h"

namespace gmvq::cpu::row {

// The logits epilogue: x[i] = -max(row_term + x[i], 0) (x holds the GEMM's
// cross terms); a NaN distance stays NaN (a select on d > 0 would turn it into
// a perfect match).
// One rule for every copy: the scalars and a vector.
GMVQ_VECTOR_INLINE float clamped_logit(float cross, float row_term) {
  const float d = cross + row_term;
  return -(d < 0.0f ? 0.0f : d);
}
GMVQ_VECTOR_INLINE double clamped_logit(double cross, double row_term) {
  const double d = cross + row_term;
  return -(d < 0.0 ? 0.0 : d);
}
GMVQ_VECTOR_INLINE vfloat clamped_logit(vfloat cross, float row_term) {
  const vfloat d = cross + row_term;
  return -(d < splat(0.0f) ? splat(0.0f) : d);
}

GMVQ_CLONES static void clamp_logits_row(float* x, float row_term, int64_t n) {
  int64_t i = 0;
  for (; i + kVector <= n; i += kVector) store_vector(x + i, clamped_logit(load_vector(x + i), row_term));
  for (; i < n; ++i) x[i] = clamped_logit(x[i], row_term);
}

inline void clamp_logits_row(double* x, double row_term, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = clamped_logit(x[i], row_term);
}

// The epilogue, then the row's maximum logit (NaN if one is NaN); for float
// in one pass (the block's logits have left L1 by the time a second pass reads them).
inline double clamped_logits_row(double* x, double row_term, int64_t n) {
  clamp_logits_row(x, row_term, n);
  return row_max(x, n);
}

GMVQ_CLONES static float clamped_logits_row(float* x, float row_term, int64_t n) {
  RunningMax running;
  int64_t i = 0;
  for (; i + kVector <= n; i += kVector) {
    const vfloat l = clamped_logit(load_vector(x + i), row_term);
    store_vector(x + i, l);
    running.take(l);
  }
  clamp_logits_row(x + i, row_term, n - i);
  return running.finish(x + i, n - i);
}

// The fused quantize's logit gradient of one row (docs/math.md, quantize):
//   out = pi (g_pi - b_pi) + s y (g_y - beta),  s = 1/T,
// without the y part when y is null (evaluation: no tempered sample), and the
// y part alone in through_sample when asked (the Gumbel noise's gradient).
// Returns sum_i out[i] (the distance backward's row sum), in kLanes partial sums.
GMVQ_CLONES static float logit_gradient_row(const float* pi, const float* g_pi, float b_pi, const float* y,
                                            const float* g_y, float beta, float s, float* out,
                                            float* through_sample, int64_t n) {
  // One loop for every case: the bits may not depend on through_sample.
  const auto element = [&](int64_t q) GMVQ_SINK {
    const float posterior_part = pi[q] * (g_pi[q] - b_pi);
    if (y == nullptr) return out[q] = posterior_part;
    const float sample_part = s * y[q] * (g_y[q] - beta);
    if (through_sample != nullptr) through_sample[q] = sample_part;
    return out[q] = posterior_part + sample_part;
  };
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += element(i + j);
  }
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += lane[j];
  for (; i < n; ++i) total += element(i);
  return total;
}

inline double logit_gradient_row(const double* pi, const double* g_pi, double b_pi, const double* y,
                                 const double* g_y, double beta, double s, double* out, double* through_sample,
                                 int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = pi[i] * (g_pi[i] - b_pi);
    if (y != nullptr) {
      const double sample_part = s * y[i] * (g_y[i] - beta);
      if (through_sample != nullptr) through_sample[i] = sample_part;
      out[i] += sample_part;
    }
    total += out[i];
  }
  return total;
}

}  // namespace gmvq::cpu::row
