// Fused GM-VQ bottleneck on CPU: gmvq::quantize and gmvq::quantize_backward.
//
// Semantics: gmvq_ext/reference.py `quantize` (values) and autograd through it
// (gradients); formulas in docs/math.md. The point of the fusion is memory: no
// N x K tensor exists in either direction. Rows are processed in blocks of B
// rows (B * K <= kMaxBlockElements); per block the logits come from one GEMM,
//   l = -max(a + [w z, w] [-2 E, E*E]^T, 0),   a[n] = sum_d w z^2,
// (with weight None or (N, 1) the second factor is [-2 E, ||e_k||^2]), and
// everything else is done row by row with the whole row of K values at hand.
// The left factor [w z, w] and a are formed per block too: as (N, D + W)
// tensors they would cost a pass and fresh pages (and their faults) each call.
//
// The forward saves per row the two log-sum-exps (row_lse: of the posterior's
// logits and of the tempered perturbed logits) and, for soft samples, z_soft;
// the backward rebuilds pi = exp(l - lse_pi) and y = exp((l + g) / T - lse_y)
// in one pass each, regenerating the Gumbel noise from Philox (philox.h)
// instead of storing it. Noise is generated once in each direction.
//
// Threads (stripes.h): the rows are cut into at most kStripes stripes of whole
// blocks that the threads take in turn, so the whole op is one parallel region
// (per-block regions cost a barrier each, which is ruinous on a loaded
// machine). GEMMs inside a stripe run single-threaded on the stripe's blocks.
//
// Determinism: the stripes do not depend on the thread count; each stripe
// accumulates its own q_bar and codebook-gradient partials in row order, and
// the partials are added in stripe order. Same inputs, same bits, run after
// run (and across thread counts as far as the BLAS is: a lone stripe runs
// its GEMMs with the BLAS's own threads).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "gmvq/checks.h"
#include "gmvq/philox.h"
#include "gemm.h"
#include "philox_fill.h"
#include "quantize_rows.h"
#include "row_math.h"
#include "stripes.h"
#include "subnormals.h"

namespace gmvq {
namespace {

namespace row = cpu::row;
using cpu::Blocking;
using cpu::for_each_stripe;
using cpu::OrderedSum;

// Run-time scalars, read on the host (the tensors are CPU tensors here).
struct Scalars {
  double inverse_temperature;
  double sigma_z2;
  double noise_scale;  // z_out's Gaussian noise is noise_scale * s * eps; 0: none drawn
  bool hard;
  bool training;
  NoiseState key;

  bool soft() const { return training && !hard; }
  bool noisy() const { return training && noise_scale > 0.0; }
  // sqrt(2 sigma_z2 D) / noise_scale: z_out = z_q + (||r|| / c0) eps (noisy only).
  double c0(int64_t d) const { return std::sqrt(2.0 * sigma_z2 * static_cast<double>(d)) / noise_scale; }
};

Scalars read_scalars(const at::Tensor& temperature, double sigma_z2, double noise_scale, bool hard, bool training,
                     const at::Tensor& noise_state) {
  return {1.0 / host_temperature(temperature), sigma_z2, noise_scale, hard, training,
          host_noise_state(noise_state)};
}

// The inputs in the accumulation dtype (O(N D + K D) memory) and the codebook's
// GEMM factor of the logits (the rows' factor is formed per block: block_factor).
struct Operands {
  int64_t n = 0, k = 0, d = 0;
  at::Tensor z;         // (N, D)
  at::Tensor weight;    // undefined, (N, D) or (N, 1)
  at::Tensor codebook;  // (K, D)
  at::Tensor rhs;       // (K, D + W): [-2 E, E * E] or [-2 E, ||e_k||^2]; W = D (full weight) or 1
  at::Tensor gumbel;    // explicit Gumbel noise as given, or undefined
  at::Tensor eps;       // explicit Gaussian noise (N, D) in acc, or undefined

  bool full_weight() const { return weight.defined() && weight.size(1) == d; }
  int64_t width() const { return rhs.size(1); }
};

Operands prepare(const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
                 const std::optional<at::Tensor>& gumbel_noise, const std::optional<at::Tensor>& eps_noise) {
  const auto acc = accumulation_type(z.scalar_type());
  Operands op;
  op.n = z.size(0);
  op.d = z.size(1);
  op.k = codebook.size(0);
  op.z = z.to(acc).contiguous();
  op.codebook = codebook.to(acc).contiguous();
  if (weight.has_value()) op.weight = weight->to(acc).contiguous();
  const at::Tensor squared = op.codebook * op.codebook;
  // A full weight pairs each w[n, d] with E[k, d]^2; a per-row weight (or none)
  // only needs ||e_k||^2.
  const at::Tensor code_factor = op.full_weight() ? squared : squared.sum(1, /*keepdim=*/true);
  op.rhs = at::cat({op.codebook * -2.0, code_factor}, 1).contiguous();
  if (gumbel_noise.has_value()) op.gumbel = *gumbel_noise;
  if (eps_noise.has_value()) op.eps = eps_noise->to(acc).contiguous();
  return op;
}

// The rows' GEMM factor of rows [n0, n0 + B) into factor (B, D + W): [w z, w]
// ([w z, w] with a per-row weight, [z, 1] without one), and a = sum_d w z^2
// into row_term (B).
template <typename acc_t>
void block_factor(const Operands& op, int64_t n0, at::Tensor& factor, acc_t* row_term) {
  const int64_t d = op.d, width = op.width();
  const bool full_weight = op.full_weight();
  const acc_t* z = op.z.data_ptr<acc_t>() + n0 * d;
  const acc_t* w = op.weight.defined() ? op.weight.data_ptr<acc_t>() + n0 * op.weight.size(1) : nullptr;
  acc_t* f = factor.data_ptr<acc_t>();
  for (int64_t b = 0; b < factor.size(0); ++b) {
    const acc_t* zr = z + b * d;
    acc_t* wz = f + b * width;
    if (full_weight) {
      const acc_t* wr = w + b * d;
      for (int64_t j = 0; j < d; ++j) wz[j] = wr[j] * zr[j];
      std::copy(wr, wr + d, wz + d);
    } else {
      const acc_t wr = w == nullptr ? acc_t(1) : w[b];
      for (int64_t j = 0; j < d; ++j) wz[j] = wr * zr[j];
      wz[d] = wr;
    }
    row_term[b] = row::row_dot(wz, zr, d);
  }
}

// Logits of a block into logits (B, K): l = -max(a + factor rhs^T, 0), with
// block_factor's factor and a; each row's largest logit into row_max (B)
// unless it is null.
template <typename acc_t>
void block_logits(const Operands& op, const at::Tensor& factor, const acc_t* a, at::Tensor& logits,
                  acc_t* row_max) {
  cpu::mm_out(logits, factor, op.rhs.t());
  acc_t* l = logits.data_ptr<acc_t>();
  for (int64_t b = 0; b < logits.size(0); ++b) {
    if (row_max != nullptr) {
      row_max[b] = row::clamped_logits_row(l + b * op.k, a[b], op.k);
    } else {
      row::clamp_logits_row(l + b * op.k, a[b], op.k);
    }
  }
}

// Explicit Gumbel noise of the block as a (B, K) acc tensor (undefined if absent).
at::Tensor block_gumbel(const Operands& op, int64_t n0, int64_t rows) {
  if (!op.gumbel.defined()) return {};
  return op.gumbel.narrow(0, n0, rows).to(op.z.scalar_type()).contiguous();
}

// Per-thread row scratch.
template <typename acc_t>
struct RowScratch {
  std::vector<float> noise;       // min(K, kNoiseChunk): Philox Gumbel noise, a chunk of a row at a time
  std::vector<acc_t> perturbed;   // K: l + g, then y
  std::vector<acc_t> posterior;   // K: pi
  std::vector<float> gaussian;    // D: one row of Philox Gaussian noise
  std::vector<acc_t> eps;         // D
  std::vector<acc_t> residual;    // D

  RowScratch(int64_t k, int64_t d)
      : noise(std::min(k, row::kNoiseChunk)), perturbed(k), posterior(k), gaussian(d), eps(d), residual(d) {}
};

// v = l + g of row n into `perturbed` (explicit noise row, or Philox element
// n*K + k); returns max_k v.
template <typename acc_t>
acc_t perturb_row(const Operands& op, const Scalars& s, int64_t n, const acc_t* logits,
                  const acc_t* explicit_noise, RowScratch<acc_t>& scratch, acc_t* perturbed) {
  const int64_t k = op.k;
  if (explicit_noise != nullptr) {
    row::add_rows(logits, explicit_noise, perturbed, k);
    return row::row_max(perturbed, k);
  }
  return row::perturb_row_max(s.key.seed, s.key.offset, static_cast<uint64_t>(n) * k, logits, scratch.noise.data(),
                              perturbed, k);
}

// eps[n] (D values) from eps_noise or Philox stream 1.
template <typename acc_t>
void eps_row(const Operands& op, const Scalars& s, int64_t n, RowScratch<acc_t>& scratch) {
  const int64_t d = op.d;
  acc_t* out = scratch.eps.data();
  if (op.eps.defined()) {
    const acc_t* e = op.eps.data_ptr<acc_t>() + n * d;
    std::copy(e, e + d, out);
    return;
  }
  row::fill_gaussian(s.key.seed, s.key.offset, static_cast<uint64_t>(n) * d, d, scratch.gaussian.data());
  for (int64_t j = 0; j < d; ++j) out[j] = static_cast<acc_t>(scratch.gaussian[j]);
}

// z_q of row n: the code E[idx] (hard, eval) or the soft sample's mean.
template <typename acc_t>
const acc_t* quantized_row(const Operands& op, const Scalars& s, const acc_t* z_soft, const int64_t* idx,
                           int64_t n) {
  return s.soft() ? z_soft + n * op.d : op.codebook.data_ptr<acc_t>() + idx[n] * op.d;
}

// r = z - z_q into scratch.residual; returns ||r||^2.
template <typename acc_t>
acc_t residual_row(const Operands& op, const acc_t* zq, int64_t n, RowScratch<acc_t>& scratch) {
  const acc_t* zr = op.z.data_ptr<acc_t>() + n * op.d;
  acc_t* r = scratch.residual.data();
  for (int64_t j = 0; j < op.d; ++j) r[j] = zr[j] - zq[j];
  return row::row_dot(r, r, op.d);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
struct ForwardOutputs {
  at::Tensor z_out;       // (N, D) acc
  at::Tensor indices;     // (N) int64
  at::Tensor q_bar;       // (K) acc
  at::Tensor latent_reg;  // (N) acc
  at::Tensor row_lse;     // (N, 2) acc: lse of l, lse of (l + g) / T
  at::Tensor z_soft;      // (N, D) acc in soft training, else (0, D)
};

// Training: the sampled index and lse_y = logsumexp_k (l + g) / T of one row
// (v = l + g in scratch.perturbed); soft samples also get y = softmax(v / T)
// written to `y`. One exponential pass.
template <typename acc_t>
void sample_row(const Operands& op, const Scalars& s, int64_t n, const acc_t* logits, const acc_t* explicit_noise,
                RowScratch<acc_t>& scratch, int64_t* index, acc_t* lse_y, acc_t* y) {
  const int64_t k = op.k;
  acc_t* v = scratch.perturbed.data();
  const acc_t v_max = perturb_row(op, s, n, logits, explicit_noise, scratch, v);
  *index = row::index_of_max(v, v_max, k);
  const auto inverse_temperature = static_cast<acc_t>(s.inverse_temperature);
  const acc_t shift = v_max * inverse_temperature;
  if (y == nullptr) {
    *lse_y = row::log_sum_exp_from_max(v, inverse_temperature, shift, k);
    return;
  }
  const acc_t total = row::exp_affine_row(v, inverse_temperature, shift, y, k);
  const acc_t inverse = acc_t(1) / total;
  for (int64_t j = 0; j < k; ++j) y[j] *= inverse;
  *lse_y = shift + std::log(total);
}

// One thread's buffers for the forward's blocks.
template <typename acc_t>
struct ForwardBuffers {
  at::Tensor logits, factor, sample;  // (B, K), (B, D + W), y (B, K) in soft training
  std::vector<acc_t> block_sums, row_max, row_term;
  RowScratch<acc_t> scratch;

  ForwardBuffers(const Operands& op, const Scalars& s, int64_t block)
      : block_sums(op.k), row_max(block), row_term(block), scratch(op.k, op.d) {
    const auto options = op.z.options();
    logits = at::empty({block, op.k}, options);
    factor = at::empty({block, op.width()}, options);
    sample = s.soft() ? at::empty({block, op.k}, options) : at::Tensor();
  }
};

// pi = e / sum(e), e = exp(l - max l), of one row added into column_sums
// without being stored normalised (the same products e * (1 / sum)), e in
// `posterior`; returns lse_pi. A row whose maximum is NaN or +-inf gives its
// verdict everywhere.
template <typename acc_t>
acc_t add_posterior_row(const acc_t* logits, acc_t row_max, int64_t k, acc_t* posterior, acc_t* column_sums) {
  acc_t lse, inverse_total;
  if (std::abs(row_max) < std::numeric_limits<acc_t>::infinity()) {
    const acc_t total = row::exp_affine_row(logits, acc_t(1), row_max, posterior, k);
    lse = row_max + std::log(total);
    inverse_total = acc_t(1) / total;
  } else {
    std::fill(posterior, posterior + k, std::numeric_limits<acc_t>::quiet_NaN());
    lse = row_max;
    inverse_total = acc_t(1);
  }
  row::accumulate_scaled(column_sums, posterior, inverse_total, k);
  return lse;
}

// Step 1, per row: the sample (training: index, lse_y, and y in soft
// training) or the argmax (eval), lse_pi, and pi's column sums into
// buffers.block_sums (rows in order).
template <typename acc_t>
void sample_rows(const Operands& op, const Scalars& s, int64_t n0, int64_t rows, const at::Tensor& gumbel,
                 ForwardBuffers<acc_t>& buffers, ForwardOutputs& out) {
  const int64_t k = op.k;
  RowScratch<acc_t>& scratch = buffers.scratch;
  const acc_t* l = buffers.logits.template data_ptr<acc_t>();
  const acc_t* row_max = buffers.row_max.data();
  int64_t* idx = out.indices.data_ptr<int64_t>();
  acc_t* row_lse = out.row_lse.data_ptr<acc_t>();
  std::fill(buffers.block_sums.begin(), buffers.block_sums.end(), acc_t(0));
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t r = n0 + b;
    const acc_t* lrow = l + b * k;
    acc_t* lse = row_lse + 2 * r;
    if (s.training) {
      const acc_t* g = gumbel.defined() ? gumbel.data_ptr<acc_t>() + b * k : nullptr;
      acc_t* y = s.soft() ? buffers.sample.template data_ptr<acc_t>() + b * k : nullptr;
      sample_row(op, s, r, lrow, g, scratch, idx + r, lse + 1, y);
    } else {
      idx[r] = row::index_of_max(lrow, row_max[b], k);
    }
    lse[0] = add_posterior_row(lrow, row_max[b], k, scratch.posterior.data(), buffers.block_sums.data());
    if (!s.training) lse[1] = lse[0];  // unused: no tempered sample in evaluation
  }
}

// Step 3, per row: latent_reg = ||z - z_q||^2 / (2 sigma_z2) and z_out = z_q +
// s eps (training with noise, s = noise_scale ||z - z_q|| / sqrt(2 sigma_z2 D)) or z_q.
template <typename acc_t>
void output_rows(const Operands& op, const Scalars& s, int64_t n0, int64_t rows, RowScratch<acc_t>& scratch,
                 ForwardOutputs& out) {
  const int64_t d = op.d;
  const acc_t inverse_c0 = s.noisy() ? static_cast<acc_t>(1.0 / s.c0(d)) : acc_t(0);
  const acc_t inverse_two_sigma = static_cast<acc_t>(1.0 / (2.0 * s.sigma_z2));
  const acc_t* z_soft = s.soft() ? out.z_soft.data_ptr<acc_t>() : nullptr;
  const int64_t* idx = out.indices.data_ptr<int64_t>();
  acc_t* z_out = out.z_out.data_ptr<acc_t>();
  acc_t* latent_reg = out.latent_reg.data_ptr<acc_t>();
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t r = n0 + b;
    const acc_t* zq = quantized_row(op, s, z_soft, idx, r);
    const acc_t rho2 = residual_row(op, zq, r, scratch);
    latent_reg[r] = rho2 * inverse_two_sigma;
    acc_t* o = z_out + r * d;
    if (s.noisy()) {
      eps_row(op, s, r, scratch);
      const acc_t scale = std::sqrt(rho2) * inverse_c0;
      const acc_t* eps = scratch.eps.data();
      for (int64_t j = 0; j < d; ++j) o[j] = zq[j] + scale * eps[j];
    } else {
      std::copy(zq, zq + d, o);
    }
  }
}

template <typename acc_t>
void quantize_forward_impl(const Operands& op, const Scalars& s, ForwardOutputs& out) {
  const int64_t n = op.n, k = op.k;
  const Blocking blocking(n, k, k * static_cast<int64_t>(sizeof(double)));
  // q_bar: each block's column sums of pi (acc_t, rows in order), added into
  // a float64 sum per stripe, the stripes added in order.
  at::Tensor column_total = at::empty({k}, op.z.options().dtype(at::kDouble));
  OrderedSum<double> column_sums(column_total, blocking.stripes);

  const auto make_buffers = [&] { return ForwardBuffers<acc_t>(op, s, blocking.rows_per_block); };
  for_each_stripe(blocking, make_buffers, [&](ForwardBuffers<acc_t>& buffers, int64_t stripe, int64_t row_begin,
                                              int64_t row_end) {
    at::Tensor stripe_sums = column_sums.take();
    double* sums = stripe_sums.data_ptr<double>();
    for (int64_t n0 = row_begin; n0 < row_end; n0 += blocking.rows_per_block) {
      const int64_t rows = std::min(blocking.rows_per_block, row_end - n0);
      at::Tensor logits = buffers.logits.narrow(0, 0, rows);
      at::Tensor factor = buffers.factor.narrow(0, 0, rows);
      block_factor<acc_t>(op, n0, factor, buffers.row_term.data());
      block_logits<acc_t>(op, factor, buffers.row_term.data(), logits, buffers.row_max.data());
      const at::Tensor gumbel = s.training ? block_gumbel(op, n0, rows) : at::Tensor();

      sample_rows(op, s, n0, rows, gumbel, buffers, out);
      for (int64_t j = 0; j < k; ++j) sums[j] += static_cast<double>(buffers.block_sums[j]);
      // Step 2, soft training: z_q = z_soft = y E for the block.
      if (s.soft()) {
        at::Tensor z_soft_block = out.z_soft.narrow(0, n0, rows);
        cpu::mm_out(z_soft_block, buffers.sample.narrow(0, 0, rows), op.codebook);
      }
      output_rows(op, s, n0, rows, buffers.scratch, out);
    }
    column_sums.give(stripe, std::move(stripe_sums));
  });
  TORCH_INTERNAL_ASSERT(column_sums.complete());
  const double* total = column_total.data_ptr<double>();
  const double inv_n = 1.0 / static_cast<double>(std::max<int64_t>(n, 1));
  acc_t* q = out.q_bar.data_ptr<acc_t>();
  for (int64_t j = 0; j < k; ++j) q[j] = static_cast<acc_t>(total[j] * inv_n);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cpu(
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    const at::Tensor& temperature, double sigma_z2, bool hard, bool training, const at::Tensor& noise_state,
    const std::optional<at::Tensor>& gumbel_noise, const std::optional<at::Tensor>& eps_noise,
    double noise_scale) {
  check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, noise_state, gumbel_noise, eps_noise,
                        noise_scale);
  const Operands op = prepare(z, weight, codebook, gumbel_noise, eps_noise);
  const Scalars s = read_scalars(temperature, sigma_z2, noise_scale, hard, training, noise_state);
  const auto options = op.z.options();
  ForwardOutputs out{at::empty({op.n, op.d}, options), at::empty({op.n}, options.dtype(at::kLong)),
                     at::empty({op.k}, options), at::empty({op.n}, options), at::empty({op.n, 2}, options),
                     at::empty({s.soft() ? op.n : 0, op.d}, options)};
  AT_DISPATCH_FLOATING_TYPES(op.z.scalar_type(), "quantize_cpu", [&] {
    quantize_forward_impl<scalar_t>(op, s, out);
  });
  return {out.z_out.to(z.scalar_type()), out.indices, out.q_bar, out.latent_reg, out.row_lse, out.z_soft};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
// With pi = exp(l - lse_pi), y = exp((l + g) / T - lse_y), G_pi = G_qbar / N:
//   G_l = pi (G_pi - <pi, G_pi>) + [training] (1/T) y (G_y - <y, G_y>),
//   G_y = G_zq E^T (straight-through for hard samples: the same formula),
//   G_zq = G_z_out - (the part of G_z_out that flows through r = z - z_q),
// then the distance backward of l. docs/math.md has the derivation.
struct BackwardInputs {
  at::Tensor grad_z_out;       // (N, D) acc
  at::Tensor grad_pi;          // (K) acc: grad_q_bar / max(N, 1)
  at::Tensor grad_latent_reg;  // (N) acc
  at::Tensor indices;          // (N) int64
  at::Tensor row_lse;          // (N, 2) acc
  at::Tensor z_soft;           // (N, D) acc (soft training) or empty
};

struct BackwardOutputs {
  at::Tensor grad_z;        // (N, D) acc
  at::Tensor grad_weight;   // like op.weight, acc, or undefined
  at::Tensor grad_codebook; // (K, D) acc
  at::Tensor grad_gumbel;   // (N, K) acc, or undefined
  at::Tensor grad_eps;      // (N, D) acc, or undefined
};

// One thread's buffers for the backward's blocks: (B, K) logits then G_l, G_y,
// y (soft), G_zq, G_l rhs, the block's GEMM factor and a, row scratch.
template <typename acc_t>
struct BackwardBuffers {
  at::Tensor logits, grad_sample, sample, grad_zq, pq, factor;
  at::Tensor distance_terms;  // (D + W, K): [w z, w]^T G_l, transposed: as (B, D + W)^T (B, K)
                              // this GEMM ran faster than G_l^T [w z, w] (git log has the timings)
  std::vector<acc_t> row_sums, row_term;
  RowScratch<acc_t> scratch;

  BackwardBuffers(const Operands& op, const Scalars& s, int64_t block)
      : row_sums(block), row_term(block), scratch(op.k, op.d) {
    const auto options = op.z.options();
    logits = at::empty({block, op.k}, options);
    grad_sample = s.training ? at::empty({block, op.k}, options) : at::Tensor();
    sample = s.soft() ? at::empty({block, op.k}, options) : at::Tensor();
    grad_zq = at::empty({block, op.d}, options);
    pq = at::empty({block, op.width()}, options);
    factor = at::empty({block, op.width()}, options);
    distance_terms = at::empty({op.width(), op.k}, options);  // each stripe's first block writes it
  }
};

// Step 1, per row: G_zq and the direct part of G_z (through r = z - z_q, in
// the noise scale s = ||r|| / sqrt(2 sigma_z2 D) and the latent term), G_eps.
template <typename acc_t>
void residual_gradients(const Operands& op, const Scalars& s, const BackwardInputs& in, int64_t n0,
                        int64_t rows, RowScratch<acc_t>& scratch, acc_t* grad_zq, BackwardOutputs& out) {
  const int64_t d = op.d;
  const acc_t c0 = s.noisy() ? static_cast<acc_t>(s.c0(d)) : acc_t(1);
  const acc_t inverse_sigma = static_cast<acc_t>(1.0 / s.sigma_z2);
  const acc_t* grad_z_out = in.grad_z_out.data_ptr<acc_t>();
  const acc_t* grad_latent = in.grad_latent_reg.data_ptr<acc_t>();
  const acc_t* z_soft = s.soft() ? in.z_soft.data_ptr<acc_t>() : nullptr;
  const int64_t* idx = in.indices.data_ptr<int64_t>();
  acc_t* grad_z = out.grad_z.data_ptr<acc_t>();
  acc_t* grad_eps = out.grad_eps.defined() ? out.grad_eps.data_ptr<acc_t>() : nullptr;
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t r = n0 + b;
    const acc_t* zq = quantized_row(op, s, z_soft, idx, r);
    const acc_t rho2 = residual_row(op, zq, r, scratch);
    const acc_t* gzo = grad_z_out + r * d;
    // d latent_reg / d r = r / sigma_z2; d z_out / d r through the scale is
    // (alpha / c0) r / ||r||, alpha = <G_z_out, eps>, taken as 0 at r = 0 like
    // torch's norm backward.
    acc_t coef = grad_latent[r] * inverse_sigma;
    if (s.noisy()) {
      eps_row(op, s, r, scratch);
      const acc_t rho = std::sqrt(rho2);
      const acc_t alpha = row::row_dot(gzo, scratch.eps.data(), d);
      if (rho > acc_t(0)) coef += alpha / (rho * c0);
      if (grad_eps != nullptr) {
        const acc_t scale = rho / c0;
        for (int64_t j = 0; j < d; ++j) grad_eps[r * d + j] = gzo[j] * scale;
      }
    }
    const acc_t* res = scratch.residual.data();
    acc_t* gz = grad_z + r * d;
    acc_t* gq = grad_zq + b * d;
    for (int64_t j = 0; j < d; ++j) {
      const acc_t through_r = coef * res[j];
      gz[j] = through_r;
      gq[j] = gzo[j] - through_r;
    }
  }
}

// Step 2, per row: G_l from pi, y and G_y (into the logits' place), the row
// sums S of G_l, and dL/dg = the y part (the noise enters as l + g).
template <typename acc_t>
void logit_gradients(const Operands& op, const Scalars& s, const BackwardInputs& in, int64_t n0,
                     int64_t rows, const at::Tensor& gumbel, BackwardBuffers<acc_t>& buffers,
                     BackwardOutputs& out) {
  RowScratch<acc_t>& scratch = buffers.scratch;
  const int64_t k = op.k;
  const acc_t inverse_temperature = static_cast<acc_t>(s.inverse_temperature);
  const acc_t* grad_pi = in.grad_pi.data_ptr<acc_t>();
  const acc_t* row_lse = in.row_lse.data_ptr<acc_t>();
  acc_t* l = buffers.logits.template data_ptr<acc_t>();
  const acc_t* gy = s.training ? buffers.grad_sample.template data_ptr<acc_t>() : nullptr;
  acc_t* grad_gumbel = out.grad_gumbel.defined() ? out.grad_gumbel.data_ptr<acc_t>() : nullptr;
  acc_t* pi = scratch.posterior.data();
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t r = n0 + b;
    acc_t* lrow = l + b * k;
    const acc_t b_pi = row::exp_affine_dot(lrow, acc_t(1), row_lse[2 * r], grad_pi, pi, k);
    // Evaluation: no tempered sample, so no y part (y stays null).
    acc_t* y = nullptr;
    const acc_t* gyrow = nullptr;
    acc_t beta = 0;
    if (s.training) {
      // y = exp(v / T - lse_y) with v = l + g, before G_l overwrites the logits.
      y = s.soft() ? buffers.sample.template data_ptr<acc_t>() + b * k : scratch.perturbed.data();
      const acc_t* g = gumbel.defined() ? gumbel.data_ptr<acc_t>() + b * k : nullptr;
      perturb_row(op, s, r, lrow, g, scratch, y);  // the maximum is not needed here
      gyrow = gy + b * k;
      beta = row::exp_affine_dot(y, inverse_temperature, row_lse[2 * r + 1], gyrow, y, k);
    }
    acc_t* gg = grad_gumbel != nullptr ? grad_gumbel + r * k : nullptr;
    buffers.row_sums[b] =
        row::logit_gradient_row(pi, grad_pi, b_pi, y, gyrow, beta, inverse_temperature, lrow, gg, k);
  }
}

// Step 3, per row: G_z and G_w from the distance backward,
//   G_z += -2 w (z S - P),  G_w = -(z^2 S - 2 z P + Q),  [-2 P, Q] = G_l rhs.
template <typename acc_t>
void distance_gradients(const Operands& op, int64_t n0, int64_t rows, const BackwardBuffers<acc_t>& buffers,
                        BackwardOutputs& out) {
  const int64_t d = op.d, width = op.width();
  const bool full_weight = op.full_weight();
  const acc_t* z = op.z.data_ptr<acc_t>();
  const acc_t* w = op.weight.defined() ? op.weight.data_ptr<acc_t>() : nullptr;
  const acc_t* pq = buffers.pq.template data_ptr<acc_t>();
  acc_t* grad_z = out.grad_z.data_ptr<acc_t>();
  acc_t* grad_w = out.grad_weight.defined() ? out.grad_weight.data_ptr<acc_t>() : nullptr;
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t r = n0 + b;
    const acc_t srow = buffers.row_sums[b];
    const acc_t* zr = z + r * d;
    const acc_t* pm2 = pq + b * width;  // -2 P
    const acc_t* q = pm2 + d;           // Q: D values (full weight) or 1 (||e||^2)
    acc_t* gz = grad_z + r * d;
    acc_t scalar_grad_w = 0;
    for (int64_t j = 0; j < d; ++j) {
      const acc_t p = acc_t(-0.5) * pm2[j];
      const acc_t wj = w == nullptr ? acc_t(1) : (full_weight ? w[r * d + j] : w[r]);
      gz[j] += acc_t(-2) * wj * (zr[j] * srow - p);
      if (grad_w != nullptr) {
        const acc_t zz = zr[j] * zr[j] * srow - acc_t(2) * zr[j] * p;
        if (full_weight) {
          grad_w[r * d + j] = -(zz + q[j]);
        } else {
          scalar_grad_w += zz;
        }
      }
    }
    if (grad_w != nullptr && !full_weight) grad_w[r] = -(scalar_grad_w + q[0]);
  }
}

// A stripe's G_E: direct += 2 (G_l^T (w z) - E * (G_l^T w)), from the
// transposed distance_terms = [w z, w]^T G_l (one pass; E * (G_l^T w) pairs
// E[k, d] with row d of w^T G_l, or with its single row for a per-row weight).
template <typename acc_t>
void add_distance_codebook_gradient(const Operands& op, const at::Tensor& distance_terms, at::Tensor& direct) {
  // Codes in tiles of kTile: the tile's columns of the terms are copied into
  // code-major rows (a walk down a column, K apart, falls into one cache set),
  // then each code's row of G_E is one contiguous pass.
  constexpr int64_t kTile = 16;
  const int64_t k = op.k, d = op.d;
  const int64_t weight_rows = op.full_weight() ? d : 1;
  const acc_t* codebook = op.codebook.data_ptr<acc_t>();
  const acc_t* terms = distance_terms.data_ptr<acc_t>();
  acc_t* out = direct.data_ptr<acc_t>();
  std::vector<acc_t> cross(kTile * d), weight_sums(kTile * weight_rows);
  for (int64_t code0 = 0; code0 < k; code0 += kTile) {
    const int64_t tile = std::min(kTile, k - code0);
    for (int64_t j = 0; j < d; ++j) {
      const acc_t* row = terms + j * k + code0;
      for (int64_t c = 0; c < tile; ++c) cross[c * d + j] = row[c];
    }
    for (int64_t j = 0; j < weight_rows; ++j) {
      const acc_t* row = terms + (d + j) * k + code0;
      for (int64_t c = 0; c < tile; ++c) weight_sums[c * weight_rows + j] = row[c];
    }
    for (int64_t c = 0; c < tile; ++c) {
      const acc_t* e = codebook + (code0 + c) * d;
      const acc_t* x = cross.data() + c * d;
      const acc_t* ws = weight_sums.data() + c * weight_rows;
      acc_t* o = out + (code0 + c) * d;
      if (weight_rows == d) {
        for (int64_t j = 0; j < d; ++j) o[j] += acc_t(2) * (x[j] - e[j] * ws[j]);
      } else {
        for (int64_t j = 0; j < d; ++j) o[j] += acc_t(2) * (x[j] - e[j] * ws[0]);
      }
    }
  }
}

template <typename acc_t>
void quantize_backward_impl(const Operands& op, const Scalars& s, const BackwardInputs& in, BackwardOutputs& out) {
  const int64_t k = op.k, d = op.d;
  const Blocking blocking(op.n, k, k * d * static_cast<int64_t>(sizeof(acc_t)));
  // Each stripe's contribution to G_E, added in stripe order.
  OrderedSum<acc_t> codebook_gradient(out.grad_codebook, blocking.stripes);
  const int64_t* idx = in.indices.data_ptr<int64_t>();

  const auto make_buffers = [&] { return BackwardBuffers<acc_t>(op, s, blocking.rows_per_block); };
  for_each_stripe(blocking, make_buffers, [&](BackwardBuffers<acc_t>& buffers, int64_t stripe, int64_t row_begin,
                                              int64_t row_end) {
    // The stripe's G_E: c^T G_zq, the codebook gradient through z_q = c E, then the distance part.
    at::Tensor direct_gradient = codebook_gradient.take();
    acc_t* direct = direct_gradient.data_ptr<acc_t>();

    for (int64_t n0 = row_begin; n0 < row_end; n0 += blocking.rows_per_block) {
      const int64_t rows = std::min(blocking.rows_per_block, row_end - n0);
      at::Tensor logits = buffers.logits.narrow(0, 0, rows);
      at::Tensor factor = buffers.factor.narrow(0, 0, rows);
      block_factor<acc_t>(op, n0, factor, buffers.row_term.data());
      block_logits<acc_t>(op, factor, buffers.row_term.data(), logits, static_cast<acc_t*>(nullptr));
      const at::Tensor gumbel = s.training ? block_gumbel(op, n0, rows) : at::Tensor();

      at::Tensor grad_zq = buffers.grad_zq.narrow(0, 0, rows);
      residual_gradients(op, s, in, n0, rows, buffers.scratch, grad_zq.data_ptr<acc_t>(), out);
      if (s.training) {  // G_y = G_zq E^T
        at::Tensor grad_sample = buffers.grad_sample.narrow(0, 0, rows);
        cpu::mm_out(grad_sample, grad_zq, op.codebook.t());
      }
      logit_gradients(op, s, in, n0, rows, gumbel, buffers, out);

      // Codebook gradient through z_q = c E: c^T G_zq (hard: a scatter-add in row order).
      if (s.soft()) {
        cpu::addmm_(direct_gradient, buffers.sample.narrow(0, 0, rows).t(), grad_zq);
      } else {
        const acc_t* gq = grad_zq.data_ptr<acc_t>();
        for (int64_t b = 0; b < rows; ++b) {
          acc_t* dst = direct + idx[n0 + b] * d;
          for (int64_t j = 0; j < d; ++j) dst[j] += gq[b * d + j];
        }
      }

      // Distance backward: [-2 P, Q] = G_l rhs; [w z, w]^T G_l for the codebook.
      at::Tensor pq = buffers.pq.narrow(0, 0, rows);
      cpu::mm_out(pq, logits, op.rhs);
      if (n0 == row_begin) {
        cpu::mm_out(buffers.distance_terms, factor.t(), logits);
      } else {
        cpu::addmm_(buffers.distance_terms, factor.t(), logits);
      }
      distance_gradients(op, n0, rows, buffers, out);
    }
    add_distance_codebook_gradient<acc_t>(op, buffers.distance_terms, direct_gradient);
    codebook_gradient.give(stripe, std::move(direct_gradient));
  });
  TORCH_INTERNAL_ASSERT(codebook_gradient.complete());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_backward_cpu(
    const at::Tensor& grad_z_out, const at::Tensor& grad_q_bar, const at::Tensor& grad_latent_reg,
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    const at::Tensor& indices, const at::Tensor& row_lse, const at::Tensor& z_soft,
    const at::Tensor& temperature, double sigma_z2, bool hard, bool training, const at::Tensor& noise_state,
    const std::optional<at::Tensor>& gumbel_noise, const std::optional<at::Tensor>& eps_noise,
    double noise_scale) {
  check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, noise_state, gumbel_noise, eps_noise,
                        noise_scale);
  check_quantize_backward_state(grad_z_out, grad_q_bar, grad_latent_reg, indices, row_lse, z_soft, z, codebook,
                                hard, training);
  const int64_t n = z.size(0), k = codebook.size(0);
  if (n > 0) {  // the kernel trusts the indices (reading them is free on the CPU)
    const auto [low, high] = at::aminmax(indices);
    const int64_t min_index = low.item<int64_t>(), max_index = high.item<int64_t>();
    TORCH_CHECK(min_index >= 0 && max_index < k, "indices must lie in [0, ", k, "), got values in [",
                min_index, ", ", max_index, "]");
  }

  const Operands op = prepare(z, weight, codebook, gumbel_noise, eps_noise);
  const Scalars s = read_scalars(temperature, sigma_z2, noise_scale, hard, training, noise_state);
  const auto acc = op.z.scalar_type();
  const BackwardInputs in{grad_z_out.to(acc).contiguous(),
                          grad_q_bar.to(acc).contiguous() / static_cast<double>(std::max<int64_t>(n, 1)),
                          grad_latent_reg.to(acc).contiguous(), indices.contiguous(), row_lse.contiguous(),
                          z_soft.contiguous()};
  BackwardOutputs out;
  out.grad_z = at::empty({n, op.d}, op.z.options());
  out.grad_weight = op.weight.defined() ? at::empty(op.weight.sizes(), op.z.options()) : at::Tensor();
  out.grad_codebook = at::empty({k, op.d}, op.z.options());
  // Evaluation uses neither noise, and noise_scale 0 no Gaussian noise: their gradients are 0.
  if (gumbel_noise.has_value() && training) out.grad_gumbel = at::empty({n, k}, op.z.options());
  if (eps_noise.has_value() && s.noisy()) out.grad_eps = at::empty({n, op.d}, op.z.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "quantize_backward_cpu", [&] {
    quantize_backward_impl<scalar_t>(op, s, in, out);
  });

  const auto noise_grad = [&](const std::optional<at::Tensor>& noise, const at::Tensor& grad) {
    if (!noise.has_value()) return absent_grad(z);
    if (!grad.defined()) return at::zeros(noise->sizes(), noise->options());
    return grad.to(noise->scalar_type());
  };
  return {out.grad_z.to(z.scalar_type()),
          weight.has_value() ? out.grad_weight.to(z.scalar_type()) : absent_grad(z),
          out.grad_codebook.to(z.scalar_type()), noise_grad(gumbel_noise, out.grad_gumbel),
          noise_grad(eps_noise, out.grad_eps)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmvq, CPU, m) {
  m.impl("quantize", cpu::without_subnormals<&quantize_cpu>);
  m.impl("quantize_backward", cpu::without_subnormals<&quantize_backward_cpu>);
}

}  // namespace gmvq
