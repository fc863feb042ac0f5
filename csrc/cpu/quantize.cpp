// Fused GM-VQ bottleneck on CPU: gmvq::quantize and gmvq::quantize_backward.
//
// Semantics: gmvq_ext/reference.py `quantize` (values) and autograd through it
// (gradients); formulas in GMVQ_MATH.md. The point of the fusion is memory: no
// N x K tensor exists in either direction. Rows are processed in blocks of B
// rows (B * K <= kMaxBlockElements); per block the logits come from one GEMM,
//   l = -max(a + [w z, w] [-2 E, E*E]^T, 0),   a[n] = sum_d w z^2,
// (with weight None or (N, 1) the second factor is [-2 E, ||e_k||^2]), and
// everything else is done row by row with the whole row of K values at hand.
// The Gumbel and Gaussian noise are regenerated from Philox (philox.h) in the
// backward pass instead of being stored; the forward's indices are reused.
//
// Threads: the rows are cut into at most kStripes stripes of whole blocks, one
// at::parallel_for task per stripe, so the whole op is one parallel region
// (per-block regions cost a barrier each, which is ruinous on a loaded
// machine). GEMMs inside a stripe run single-threaded on the stripe's blocks.
//
// Determinism: the stripes do not depend on the thread count; each stripe
// accumulates its own q_bar and codebook-gradient partials in row order, and
// the partials are added in stripe order. Same inputs, same bits, run after
// run (and across thread counts as far as the BLAS is: a lone stripe runs
// its GEMMs with the BLAS's own threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <vector>

#include "gmvq/checks.h"
#include "gmvq/philox.h"
#include "quantize_rowmath.h"

// at::parallel_for is header code: without -fopenmp it silently runs serially
// (ATen/Parallel-inl.h tests INTRA_OP_PARALLEL, defined only under _OPENMP).
#if !defined(_OPENMP)
#pragma message("gmvq quantize.cpp built without OpenMP (-fopenmp): the CPU kernel will run on one thread")
#endif

namespace gmvq {
namespace {

namespace rowmath = quantize_rowmath;

// B * K of one block: large enough for efficient GEMMs, small enough that the
// block's (B, K) buffers stay in cache. Nothing here depends on the thread count.
constexpr int64_t kTargetBlockElements = int64_t{1} << 16;
constexpr int64_t kMaxBlockElements = int64_t{1} << 20;
constexpr int64_t kStripes = 16;

// Rows [row_begin, row_end) of a stripe: whole blocks of rows_per_block rows.
struct Blocking {
  int64_t rows = 0, rows_per_block = 1, blocks = 0, stripes = 0;

  Blocking(int64_t n, int64_t k) : rows(n) {
    rows_per_block = std::max<int64_t>(1, kTargetBlockElements / k);
    // Huge K: still a few rows per GEMM, within the hard cap on B * K.
    rows_per_block = std::max(rows_per_block, std::min<int64_t>(16, std::max<int64_t>(1, kMaxBlockElements / k)));
    rows_per_block = std::max<int64_t>(1, std::min(rows_per_block, n));
    blocks = (n + rows_per_block - 1) / rows_per_block;
    stripes = std::min(kStripes, blocks);
  }
  int64_t row_begin(int64_t stripe) const { return std::min(rows, stripe * blocks / stripes * rows_per_block); }
  int64_t row_end(int64_t stripe) const { return row_begin(stripe + 1); }
};

// fn(stripe, row_begin, row_end) for every stripe, in parallel. Threads take
// stripes from a shared counter (a thread that the OS delays takes fewer);
// which thread runs a stripe changes nothing in its result.
// The caller's thread-local state (dispatch keys below autograd, grad mode) is
// installed in every worker: the ATen calls made inside (at::mm_out, ...)
// must dispatch exactly as they would on the calling thread.
template <typename Fn>
void for_each_stripe(const Blocking& blocking, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, blocking.stripes, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t s = next++; s < blocking.stripes; s = next++) {
      fn(s, blocking.row_begin(s), blocking.row_end(s));
    }
  });
}

struct Scalars {
  double temperature;
  double sigma_z2;
  bool hard;
  bool training;
  int64_t seed;
  int64_t offset;
};

// The inputs in the accumulation dtype (O(N D + K D) memory) and the two GEMM
// factors of the logits.
struct Operands {
  int64_t n = 0, k = 0, d = 0;
  at::Tensor z;         // (N, D)
  at::Tensor weight;    // undefined, (N, D) or (N, 1)
  at::Tensor codebook;  // (K, D)
  at::Tensor lhs;       // (N, D + W): [w z, w]; W = D (full weight) or 1 ([z, 1] when absent)
  at::Tensor rhs;       // (K, D + W): [-2 E, E * E] or [-2 E, ||e_k||^2]
  at::Tensor row_term;  // (N): a = sum_d w z^2
  at::Tensor gumbel;    // explicit Gumbel noise as given, or undefined
  at::Tensor eps;       // explicit Gaussian noise (N, D) in acc, or undefined
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
  at::Tensor weighted_z = op.z;
  at::Tensor w_column;  // the weight factor of the code term
  if (weight.has_value()) {
    op.weight = weight->to(acc).contiguous();
    weighted_z = op.z * op.weight;
    w_column = op.weight;
  } else {
    w_column = at::ones({op.n, 1}, op.z.options());
  }
  op.row_term = (weighted_z * op.z).sum(1);
  op.lhs = at::cat({weighted_z, w_column}, 1).contiguous();
  const at::Tensor squared = op.codebook * op.codebook;
  // A full weight pairs each w[n, d] with E[k, d]^2; a per-row weight (or none)
  // only needs ||e_k||^2.
  const bool full_weight = op.weight.defined() && op.weight.size(1) == op.d;
  const at::Tensor code_factor = full_weight ? squared : squared.sum(1, /*keepdim=*/true);
  op.rhs = at::cat({op.codebook * -2.0, code_factor}, 1).contiguous();
  if (gumbel_noise.has_value()) op.gumbel = *gumbel_noise;
  if (eps_noise.has_value()) op.eps = eps_noise->to(acc).contiguous();
  return op;
}

// Logits of rows [n0, n0 + B) into logits (B, K): l = -max(a + lhs rhs^T, 0).
template <typename acc_t>
void block_logits(const Operands& op, int64_t n0, at::Tensor& logits) {
  at::mm_out(logits, op.lhs.narrow(0, n0, logits.size(0)), op.rhs.t());
  const acc_t* a = op.row_term.data_ptr<acc_t>() + n0;
  acc_t* l = logits.data_ptr<acc_t>();
  const int64_t k = op.k;
  for (int64_t b = 0; b < logits.size(0); ++b) {
    acc_t* row = l + b * k;
    const acc_t ab = a[b];
    for (int64_t j = 0; j < k; ++j) {
      const acc_t distance = ab + row[j];
      row[j] = -(distance > acc_t(0) ? distance : acc_t(0));
    }
  }
}

// Explicit Gumbel noise of the block as a (B, K) acc tensor (undefined if absent).
at::Tensor block_gumbel(const Operands& op, int64_t n0, int64_t rows) {
  if (!op.gumbel.defined()) return {};
  return op.gumbel.narrow(0, n0, rows).to(op.z.scalar_type()).contiguous();
}

// Per-thread scratch: one row of Gumbel noise (float32, as philox.h makes it).
// v = l + g into `perturbed`.
template <typename acc_t>
void perturb_row(const Operands& op, const Scalars& s, int64_t n, const acc_t* logits,
                 const acc_t* explicit_noise, std::vector<float>& noise, acc_t* perturbed) {
  const int64_t k = op.k;
  if (explicit_noise != nullptr) {
    for (int64_t j = 0; j < k; ++j) perturbed[j] = logits[j] + explicit_noise[j];
    return;
  }
  rowmath::fill_gumbel(s.seed, s.offset, static_cast<uint64_t>(n) * k, k, noise.data());
  for (int64_t j = 0; j < k; ++j) perturbed[j] = logits[j] + static_cast<acc_t>(noise[j]);
}

// eps[n] (D values) from eps_noise or Philox stream 1.
template <typename acc_t>
void eps_row(const Operands& op, const Scalars& s, int64_t n, std::vector<float>& scratch, acc_t* out) {
  const int64_t d = op.d;
  if (op.eps.defined()) {
    const acc_t* e = op.eps.data_ptr<acc_t>() + n * d;
    std::copy(e, e + d, out);
    return;
  }
  rng::fill_gaussian(s.seed, s.offset, static_cast<uint64_t>(n) * d, d, scratch.data());
  for (int64_t j = 0; j < d; ++j) out[j] = static_cast<acc_t>(scratch[j]);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
template <typename acc_t>
void quantize_forward_impl(const Operands& op, const Scalars& s, at::Tensor& z_out, at::Tensor& indices,
                           at::Tensor& q_bar, at::Tensor& latent_reg) {
  const int64_t n = op.n, k = op.k, d = op.d;
  const Blocking blocking(n, k);
  const bool soft = s.training && !s.hard;
  const auto options = op.z.options();
  // q_bar: float64 column sums of pi per stripe (rows in order), added in stripe order.
  std::vector<std::vector<double>> column_sums(blocking.stripes);
  const acc_t c0 = static_cast<acc_t>(std::sqrt(2.0 * s.sigma_z2 * static_cast<double>(d)));
  const acc_t two_sigma = static_cast<acc_t>(2.0 * s.sigma_z2);
  const acc_t temperature = static_cast<acc_t>(s.temperature);
  const acc_t* z = op.z.data_ptr<acc_t>();
  const acc_t* codebook = op.codebook.data_ptr<acc_t>();
  acc_t* out = z_out.data_ptr<acc_t>();
  int64_t* idx = indices.data_ptr<int64_t>();
  acc_t* reg = latent_reg.data_ptr<acc_t>();

  for_each_stripe(blocking, [&](int64_t stripe, int64_t row_begin, int64_t row_end) {
    at::Tensor logits_buffer = at::empty({blocking.rows_per_block, k}, options);
    at::Tensor sample_buffer = soft ? at::empty({blocking.rows_per_block, k}, options) : at::Tensor();
    std::vector<double>& sums = column_sums[stripe];
    sums.assign(k, 0.0);
    std::vector<float> noise(k), scratch(d);
    std::vector<acc_t> perturbed(k), eps(d);

    for (int64_t n0 = row_begin; n0 < row_end; n0 += blocking.rows_per_block) {
      const int64_t rows = std::min(blocking.rows_per_block, row_end - n0);
      at::Tensor logits = logits_buffer.narrow(0, 0, rows);
      block_logits<acc_t>(op, n0, logits);
      const at::Tensor gumbel = s.training ? block_gumbel(op, n0, rows) : at::Tensor();
      acc_t* l = logits.data_ptr<acc_t>();
      acc_t* y = soft ? sample_buffer.data_ptr<acc_t>() : nullptr;

      // Sample (index; soft sample y) from the logits, then pi in place and its column sums.
      for (int64_t b = 0; b < rows; ++b) {
        acc_t* row = l + b * k;
        if (s.training) {
          const acc_t* g = gumbel.defined() ? gumbel.data_ptr<acc_t>() + b * k : nullptr;
          perturb_row<acc_t>(op, s, n0 + b, row, g, noise, perturbed.data());
          idx[n0 + b] = rowmath::row_argmax(perturbed.data(), k);
          if (soft) rowmath::softmax_row(perturbed.data(), temperature, y + b * k, k);
        } else {
          idx[n0 + b] = rowmath::row_argmax(row, k);
        }
        rowmath::softmax_row(row, acc_t(1), row, k);
        for (int64_t j = 0; j < k; ++j) sums[j] += static_cast<double>(row[j]);
      }

      // Soft training: z_q = y E for the block.
      const at::Tensor soft_zq = soft ? at::mm(sample_buffer.narrow(0, 0, rows), op.codebook) : at::Tensor();

      // z_q, the noise scale, z_out and the latent term.
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t row = n0 + b;
        const acc_t* zq = soft ? soft_zq.data_ptr<acc_t>() + b * d : codebook + idx[row] * d;
        const acc_t* zr = z + row * d;
        acc_t rho2 = 0;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t r = zr[j] - zq[j];
          rho2 += r * r;
        }
        reg[row] = rho2 / two_sigma;
        acc_t* o = out + row * d;
        if (s.training) {
          eps_row<acc_t>(op, s, row, scratch, eps.data());
          const acc_t scale = std::sqrt(rho2) / c0;
          for (int64_t j = 0; j < d; ++j) o[j] = zq[j] + scale * eps[j];
        } else {
          std::copy(zq, zq + d, o);
        }
      }
    }
  });
  std::vector<double> total(k, 0.0);
  for (const auto& sums : column_sums) {
    for (int64_t j = 0; j < k; ++j) total[j] += sums[j];
  }
  const double inv_n = 1.0 / static_cast<double>(std::max<int64_t>(n, 1));
  acc_t* q = q_bar.data_ptr<acc_t>();
  for (int64_t j = 0; j < k; ++j) q[j] = static_cast<acc_t>(total[j] * inv_n);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cpu(
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    double temperature, double sigma_z2, bool hard, bool training, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& gumbel_noise, const std::optional<at::Tensor>& eps_noise) {
  check_codebook_inputs(z, weight, codebook);
  check_positive_finite(temperature, "temperature");
  check_positive_finite(sigma_z2, "sigma_z2");
  check_noise(gumbel_noise, "gumbel_noise", z.size(0), codebook.size(0), z);
  check_noise(eps_noise, "eps_noise", z.size(0), z.size(1), z);
  const Operands op = prepare(z, weight, codebook, gumbel_noise, eps_noise);
  const Scalars s{temperature, sigma_z2, hard, training, seed, offset};
  const auto options = op.z.options();
  at::Tensor z_out = at::empty({op.n, op.d}, options);
  at::Tensor indices = at::empty({op.n}, options.dtype(at::kLong));
  at::Tensor q_bar = at::empty({op.k}, options);
  at::Tensor latent_reg = at::empty({op.n}, options);
  AT_DISPATCH_FLOATING_TYPES(op.z.scalar_type(), "quantize_cpu", [&] {
    quantize_forward_impl<scalar_t>(op, s, z_out, indices, q_bar, latent_reg);
  });
  return {z_out.to(z.scalar_type()), indices, q_bar, latent_reg};
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
struct Gradients {
  at::Tensor grad_z_out;       // (N, D) acc
  at::Tensor grad_pi;          // (K) acc: grad_q_bar / max(N, 1)
  at::Tensor grad_latent_reg;  // (N) acc
  at::Tensor indices;          // (N) int64
};

struct BackwardOutputs {
  at::Tensor grad_z;        // (N, D) acc
  at::Tensor grad_weight;   // like op.weight, acc, or undefined
  at::Tensor grad_codebook; // (K, D) acc
  at::Tensor grad_gumbel;   // (N, K) acc, or undefined
  at::Tensor grad_eps;      // (N, D) acc, or undefined
};

template <typename acc_t>
void quantize_backward_impl(const Operands& op, const Scalars& s, const Gradients& g, BackwardOutputs& out) {
  const int64_t n = op.n, k = op.k, d = op.d, width = op.lhs.size(1);
  const Blocking blocking(n, k);
  const bool soft = s.training && !s.hard;
  const auto options = op.z.options();
  // Each stripe's contribution to G_E, added in stripe order at the end.
  std::vector<at::Tensor> codebook_partials(blocking.stripes);

  const acc_t c0 = static_cast<acc_t>(std::sqrt(2.0 * s.sigma_z2 * static_cast<double>(d)));
  const acc_t sigma = static_cast<acc_t>(s.sigma_z2);
  const acc_t temperature = static_cast<acc_t>(s.temperature);
  const acc_t inv_temperature = acc_t(1) / temperature;
  const acc_t* z = op.z.data_ptr<acc_t>();
  const acc_t* codebook = op.codebook.data_ptr<acc_t>();
  const acc_t* grad_z_out = g.grad_z_out.data_ptr<acc_t>();
  const acc_t* grad_pi = g.grad_pi.data_ptr<acc_t>();
  const acc_t* grad_lat = g.grad_latent_reg.data_ptr<acc_t>();
  const int64_t* idx = g.indices.data_ptr<int64_t>();
  acc_t* grad_z = out.grad_z.data_ptr<acc_t>();
  acc_t* grad_eps = out.grad_eps.defined() ? out.grad_eps.data_ptr<acc_t>() : nullptr;
  acc_t* grad_gumbel = out.grad_gumbel.defined() ? out.grad_gumbel.data_ptr<acc_t>() : nullptr;
  const bool full_weight = op.weight.defined() && op.weight.size(1) == d;
  const acc_t* w = op.weight.defined() ? op.weight.data_ptr<acc_t>() : nullptr;
  acc_t* grad_w = out.grad_weight.defined() ? out.grad_weight.data_ptr<acc_t>() : nullptr;

  for_each_stripe(blocking, [&](int64_t stripe, int64_t row_begin, int64_t row_end) {
    const int64_t block = blocking.rows_per_block;
    at::Tensor logits_buffer = at::empty({block, k}, options);  // l, then G_l
    at::Tensor sample_buffer = s.training ? at::empty({block, k}, options) : at::Tensor();       // y
    at::Tensor grad_sample_buffer = s.training ? at::empty({block, k}, options) : at::Tensor();  // G_y
    at::Tensor grad_zq_buffer = at::empty({block, d}, options);
    at::Tensor pq_buffer = at::empty({block, width}, options);
    // c^T G_zq (the direct path through z_q = c E) and G_l^T lhs = [G_l^T (w z), G_l^T w].
    at::Tensor direct = at::zeros({k, d}, options);
    at::Tensor distance_terms = at::zeros({k, width}, options);
    acc_t* direct_ptr = direct.data_ptr<acc_t>();
    std::vector<float> noise(k), scratch(d);
    std::vector<acc_t> eps(d), r(d), row_sums(block);

    for (int64_t n0 = row_begin; n0 < row_end; n0 += block) {
      const int64_t rows = std::min(block, row_end - n0);
      at::Tensor logits = logits_buffer.narrow(0, 0, rows);
      block_logits<acc_t>(op, n0, logits);
      const at::Tensor gumbel = s.training ? block_gumbel(op, n0, rows) : at::Tensor();
      acc_t* l = logits.data_ptr<acc_t>();
      acc_t* y = s.training ? sample_buffer.data_ptr<acc_t>() : nullptr;

      // Regenerate y; pi; G_l1 = pi (G_pi - <pi, G_pi>) in the logits' place.
      for (int64_t b = 0; b < rows; ++b) {
        acc_t* row = l + b * k;
        if (s.training) {
          acc_t* yrow = y + b * k;
          const acc_t* gb = gumbel.defined() ? gumbel.data_ptr<acc_t>() + b * k : nullptr;
          perturb_row<acc_t>(op, s, n0 + b, row, gb, noise, yrow);
          rowmath::softmax_row(yrow, temperature, yrow, k);
        }
        rowmath::softmax_row(row, acc_t(1), row, k);
        const acc_t mean = rowmath::row_dot(row, grad_pi, k);
        for (int64_t j = 0; j < k; ++j) row[j] = row[j] * (grad_pi[j] - mean);
      }

      const at::Tensor soft_zq = soft ? at::mm(sample_buffer.narrow(0, 0, rows), op.codebook) : at::Tensor();

      // The quantize-and-noise part: G_zq, the direct part of G_z, G_eps.
      acc_t* grad_zq = grad_zq_buffer.data_ptr<acc_t>();
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t row = n0 + b;
        const acc_t* zq = soft ? soft_zq.data_ptr<acc_t>() + b * d : codebook + idx[row] * d;
        const acc_t* zr = z + row * d;
        const acc_t* gzo = grad_z_out + row * d;
        acc_t rho2 = 0;
        for (int64_t j = 0; j < d; ++j) {
          r[j] = zr[j] - zq[j];
          rho2 += r[j] * r[j];
        }
        const acc_t lat = grad_lat[row] / sigma;  // d latent_reg / d r = r / sigma_z2
        // d z_out / d r through the scale s = ||r|| / c0: (alpha / c0) r / ||r||,
        // taken as 0 at r = 0 like torch's norm backward.
        acc_t coef = 0;
        if (s.training) {
          eps_row<acc_t>(op, s, row, scratch, eps.data());
          const acc_t rho = std::sqrt(rho2);
          const acc_t alpha = rowmath::row_dot(gzo, eps.data(), d);
          coef = rho > acc_t(0) ? alpha / (rho * c0) : acc_t(0);
          if (grad_eps != nullptr) {
            const acc_t scale = rho / c0;
            for (int64_t j = 0; j < d; ++j) grad_eps[row * d + j] = gzo[j] * scale;
          }
        }
        acc_t* gz = grad_z + row * d;
        acc_t* gq = grad_zq + b * d;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t through_r = coef * r[j] + lat * r[j];
          gz[j] = through_r;
          gq[j] = gzo[j] - through_r;
        }
      }
      const at::Tensor grad_zq_block = grad_zq_buffer.narrow(0, 0, rows);

      // Codebook gradient through z_q = c E: c^T G_zq (hard: a scatter-add in row order).
      if (soft) {
        direct.addmm_(sample_buffer.narrow(0, 0, rows).t(), grad_zq_block);
      } else {
        for (int64_t b = 0; b < rows; ++b) {
          acc_t* dst = direct_ptr + idx[n0 + b] * d;
          const acc_t* src = grad_zq + b * d;
          for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
        }
      }

      // Training: G_l += G_l2 = (1/T) y (G_y - <y, G_y>), G_y = G_zq E^T (hard:
      // straight-through, the same formula). S = row sums of G_l.
      if (s.training) {
        at::Tensor grad_sample = grad_sample_buffer.narrow(0, 0, rows);
        at::mm_out(grad_sample, grad_zq_block, op.codebook.t());
        const acc_t* gy = grad_sample.data_ptr<acc_t>();
        for (int64_t b = 0; b < rows; ++b) {
          const acc_t* yrow = y + b * k;
          const acc_t* gyrow = gy + b * k;
          acc_t* row = l + b * k;
          acc_t* gg = grad_gumbel != nullptr ? grad_gumbel + (n0 + b) * k : nullptr;
          const acc_t mean = rowmath::row_dot(yrow, gyrow, k);
          for (int64_t j = 0; j < k; ++j) {
            const acc_t g2 = inv_temperature * yrow[j] * (gyrow[j] - mean);
            row[j] += g2;
            if (gg != nullptr) gg[j] = g2;  // v = l + g: the noise gets G_l2 too
          }
          row_sums[b] = rowmath::row_sum(row, k);
        }
      } else {
        for (int64_t b = 0; b < rows; ++b) row_sums[b] = rowmath::row_sum(l + b * k, k);
      }

      // Distance backward: [-2 P, Q] = G_l rhs; G_l^T lhs for the codebook.
      at::Tensor pq = pq_buffer.narrow(0, 0, rows);
      at::mm_out(pq, logits, op.rhs);
      distance_terms.addmm_(logits.t(), op.lhs.narrow(0, n0, rows));
      const acc_t* pqp = pq.data_ptr<acc_t>();
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t row = n0 + b;
        const acc_t srow = row_sums[b];
        const acc_t* zr = z + row * d;
        const acc_t* pm2 = pqp + b * width;  // -2 P
        const acc_t* q = pm2 + d;            // Q: D values (full weight) or 1 (||e||^2)
        acc_t* gz = grad_z + row * d;
        acc_t scalar_grad_w = 0;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t p = acc_t(-0.5) * pm2[j];
          const acc_t wj = w == nullptr ? acc_t(1) : (full_weight ? w[row * d + j] : w[row]);
          gz[j] += acc_t(-2) * wj * (zr[j] * srow - p);
          if (grad_w != nullptr) {
            const acc_t zz = zr[j] * zr[j] * srow - acc_t(2) * zr[j] * p;
            if (full_weight) {
              grad_w[row * d + j] = -(zz + q[j]);
            } else {
              scalar_grad_w += zz;
            }
          }
        }
        if (grad_w != nullptr && !full_weight) grad_w[row] = -(scalar_grad_w + q[0]);
      }
    }
    // G_E of the stripe: c^T G_zq + 2 (G_l^T (w z) - E * (G_l^T w)).
    const at::Tensor cross = distance_terms.narrow(1, 0, d);
    const at::Tensor weight_sums = distance_terms.narrow(1, d, width - d);
    codebook_partials[stripe] = direct.add_((cross - op.codebook * weight_sums) * 2.0);
  });
  for (const at::Tensor& partial : codebook_partials) out.grad_codebook.add_(partial);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_backward_cpu(
    const at::Tensor& grad_z_out, const at::Tensor& grad_q_bar, const at::Tensor& grad_latent_reg,
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    const at::Tensor& indices, double temperature, double sigma_z2, bool hard, bool training, int64_t seed,
    int64_t offset, const std::optional<at::Tensor>& gumbel_noise, const std::optional<at::Tensor>& eps_noise) {
  check_codebook_inputs(z, weight, codebook);
  check_positive_finite(temperature, "temperature");
  check_positive_finite(sigma_z2, "sigma_z2");
  check_noise(gumbel_noise, "gumbel_noise", z.size(0), codebook.size(0), z);
  check_noise(eps_noise, "eps_noise", z.size(0), z.size(1), z);
  const int64_t n = z.size(0), k = codebook.size(0);
  check_grad(grad_z_out, "grad_z_out", z.sizes(), z);
  check_grad(grad_q_bar, "grad_q_bar", {k}, z);
  check_grad(grad_latent_reg, "grad_latent_reg", {n}, z);
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == n && indices.scalar_type() == at::kLong,
              "indices must be an int64 tensor of shape (", n, "), got ", indices.scalar_type(), " ",
              indices.sizes());
  TORCH_CHECK(indices.device() == z.device(), "indices must be on ", z.device(), ", got ", indices.device());

  const Operands op = prepare(z, weight, codebook, gumbel_noise, eps_noise);
  const Scalars s{temperature, sigma_z2, hard, training, seed, offset};
  const auto acc = op.z.scalar_type();
  if (n > 0) {
    const int64_t max_index = indices.max().item<int64_t>();
    const int64_t min_index = indices.min().item<int64_t>();
    TORCH_CHECK(min_index >= 0 && max_index < k, "indices must lie in [0, ", k, "), got values in [",
                min_index, ", ", max_index, "]");
  }
  Gradients g{grad_z_out.to(acc).contiguous(), grad_q_bar.to(acc).contiguous() / static_cast<double>(std::max<int64_t>(n, 1)),
              grad_latent_reg.to(acc).contiguous(), indices.contiguous()};
  BackwardOutputs out;
  out.grad_z = at::empty({n, op.d}, op.z.options());
  out.grad_weight = op.weight.defined() ? at::empty(op.weight.sizes(), op.z.options()) : at::Tensor();
  out.grad_codebook = at::zeros({k, op.d}, op.z.options());
  const bool noise_grads = training;  // eval uses neither noise: their gradients are 0
  if (gumbel_noise.has_value() && noise_grads) out.grad_gumbel = at::empty({n, k}, op.z.options());
  if (eps_noise.has_value() && noise_grads) out.grad_eps = at::empty({n, op.d}, op.z.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "quantize_backward_cpu", [&] {
    quantize_backward_impl<scalar_t>(op, s, g, out);
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
  m.impl("quantize", &quantize_cpu);
  m.impl("quantize_backward", &quantize_backward_cpu);
}

}  // namespace gmvq
