#include "gmvq/checks.h"

#include <cmath>

namespace gmvq {

void check_matrix(const at::Tensor& t, const char* name, const char* shape_doc) {
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D tensor ", shape_doc, ", got ", t.dim(), "-D");
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble,
              name, " must be float16, bfloat16, float32 or float64, got ", type);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                bool same_dtype) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ",
                ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  }
}

void check_codebook_inputs(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                           const at::Tensor& codebook) {
  check_matrix(z, "z", "(N, D)");
  check_matrix(codebook, "codebook", "(K, D)");
  check_like(codebook, "codebook", z, "z", /*same_dtype=*/true);
  TORCH_CHECK(codebook.size(0) >= 1, "codebook must have at least one code (K >= 1), got K = 0");
  TORCH_CHECK(codebook.size(1) == z.size(1), "codebook must have D = ", z.size(1),
              " columns like z, got ", codebook.size(1));
  TORCH_CHECK(z.size(1) >= 1, "z must have at least one column (D >= 1), got D = 0");
  if (weight.has_value()) {
    const auto& w = *weight;
    check_matrix(w, "weight", "(N, D) or (N, 1)");
    check_like(w, "weight", z, "z", /*same_dtype=*/true);
    TORCH_CHECK(w.size(0) == z.size(0) && (w.size(1) == z.size(1) || w.size(1) == 1),
                "weight must have shape (N, D) = (", z.size(0), ", ", z.size(1), ") or (N, 1), got ",
                w.sizes());
  }
}

void check_logits(const at::Tensor& logits, const char* name) {
  check_matrix(logits, name, "(N, K)");
  TORCH_CHECK(logits.size(1) >= 1, name, " must have at least one column (K >= 1), got K = 0");
}

void check_positive_finite(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value) && value > 0, name, " must be finite and > 0, got ", value);
}

void check_temperature(const at::Tensor& temperature, const at::Tensor& ref) {
  TORCH_CHECK(temperature.dim() == 0, "temperature must be a 0-dim tensor, got shape ", temperature.sizes());
  TORCH_CHECK(temperature.scalar_type() == at::kFloat || temperature.scalar_type() == at::kDouble,
              "temperature must be float32 or float64, got ", temperature.scalar_type());
  TORCH_CHECK(temperature.device().is_cpu() || temperature.device() == ref.device(),
              "temperature must be on the CPU or on ", ref.device(), ", got ", temperature.device());
  if (temperature.device().is_cpu()) check_positive_finite(host_temperature(temperature), "temperature");
}

void check_noise_state(const at::Tensor& noise_state, const at::Tensor& ref) {
  TORCH_CHECK(noise_state.scalar_type() == at::kLong && noise_state.numel() == 2,
              "noise_state must be an int64 tensor of two elements [seed, offset], got ",
              noise_state.scalar_type(), " of shape ", noise_state.sizes());
  TORCH_CHECK(noise_state.device().is_cpu() || noise_state.device() == ref.device(),
              "noise_state must be on the CPU or on ", ref.device(), ", got ", noise_state.device());
}

void check_quantize_inputs(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                           const at::Tensor& codebook, const at::Tensor& temperature, double sigma_z2,
                           const at::Tensor& noise_state, const std::optional<at::Tensor>& gumbel_noise,
                           const std::optional<at::Tensor>& eps_noise, double noise_scale) {
  check_codebook_inputs(z, weight, codebook);
  check_temperature(temperature, z);
  check_positive_finite(sigma_z2, "sigma_z2");
  check_noise_state(noise_state, z);
  check_noise(gumbel_noise, "gumbel_noise", z.size(0), codebook.size(0), z);
  check_noise(eps_noise, "eps_noise", z.size(0), z.size(1), z);
  TORCH_CHECK(std::isfinite(noise_scale) && noise_scale >= 0.0,
              "noise_scale must be finite and non-negative (0: no Gaussian noise), got ", noise_scale);
}

void check_quantize_backward_state(const at::Tensor& grad_z_out, const at::Tensor& grad_q_bar,
                                   const at::Tensor& grad_latent_reg, const at::Tensor& indices,
                                   const at::Tensor& row_lse, const at::Tensor& z_soft, const at::Tensor& z,
                                   const at::Tensor& codebook, bool hard, bool training) {
  const int64_t n = z.size(0), d = z.size(1), k = codebook.size(0);
  check_grad(grad_z_out, "grad_z_out", z.sizes(), z);
  check_grad(grad_q_bar, "grad_q_bar", {k}, z);
  check_grad(grad_latent_reg, "grad_latent_reg", {n}, z);
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == n && indices.scalar_type() == at::kLong,
              "indices must be an int64 tensor of shape (", n, "), got ", indices.scalar_type(), " ",
              indices.sizes());
  TORCH_CHECK(indices.device() == z.device(), "indices must be on ", z.device(), ", got ", indices.device());
  const auto acc = accumulation_type(z.scalar_type());
  TORCH_CHECK(row_lse.dim() == 2 && row_lse.size(0) == n && row_lse.size(1) == 2 &&
                  row_lse.scalar_type() == acc && row_lse.device() == z.device(),
              "row_lse must be the forward's (", n, ", 2) ", acc, " tensor on ", z.device(), ", got ",
              row_lse.scalar_type(), " ", row_lse.sizes(), " on ", row_lse.device());
  const int64_t soft_rows = training && !hard ? n : 0;
  TORCH_CHECK(z_soft.dim() == 2 && z_soft.size(0) == soft_rows && z_soft.size(1) == d &&
                  z_soft.scalar_type() == acc && z_soft.device() == z.device(),
              "z_soft must be the forward's (", soft_rows, ", ", d, ") ", acc, " tensor on ", z.device(),
              ", got ", z_soft.scalar_type(), " ", z_soft.sizes(), " on ", z_soft.device());
}

rng::NoiseDistribution parse_noise_distribution(c10::string_view distribution) {
  if (distribution == "uniform") return rng::NoiseDistribution::kUniform;
  if (distribution == "gumbel") return rng::NoiseDistribution::kGumbel;
  if (distribution == "gaussian") return rng::NoiseDistribution::kGaussian;
  TORCH_CHECK(false, "distribution must be \"uniform\", \"gumbel\" or \"gaussian\", got \"", distribution, "\"");
}

rng::NoiseDistribution check_philox_noise_inputs(const at::Tensor& like, const at::Tensor& noise_state,
                                                 c10::string_view distribution) {
  TORCH_CHECK(like.dim() == 2, "like must be a 2-D tensor (R, C), got ", like.dim(), "-D");
  check_noise_state(noise_state, like);
  return parse_noise_distribution(distribution);
}

void check_codebook_distance_backward_inputs(const at::Tensor& grad_distance, const at::Tensor& z,
                                             const std::optional<at::Tensor>& weight, const at::Tensor& codebook) {
  check_codebook_inputs(z, weight, codebook);
  check_grad(grad_distance, "grad_distance", {z.size(0), codebook.size(0)}, z);
}

void check_weighted_softmax_inputs(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                                   const at::Tensor& codebook, const at::Tensor& temperature) {
  check_codebook_inputs(z, weight, codebook);
  check_temperature(temperature, z);
}

void check_weighted_softmax_backward_inputs(const at::Tensor& grad_probs, const at::Tensor& grad_lse,
                                            const at::Tensor& probs, const at::Tensor& z,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
                                            const at::Tensor& temperature) {
  check_weighted_softmax_inputs(z, weight, codebook, temperature);
  const int64_t n = z.size(0), k = codebook.size(0);
  check_grad(grad_probs, "grad_probs", {n, k}, z);
  check_grad(grad_lse, "grad_lse", {n}, z);
  check_grad(probs, "probs", {n, k}, z);
}

void check_gumbel_argmax_inputs(const at::Tensor& logits, const at::Tensor& temperature,
                                const at::Tensor& noise_state, const std::optional<at::Tensor>& noise) {
  check_logits(logits);
  check_temperature(temperature, logits);
  check_noise_state(noise_state, logits);
  check_noise(noise, "noise", logits.size(0), logits.size(1), logits);
}

void check_gumbel_argmax_backward_inputs(const at::Tensor& grad_sample, const at::Tensor& logits,
                                         const at::Tensor& temperature, const at::Tensor& noise_state,
                                         const std::optional<at::Tensor>& noise) {
  check_gumbel_argmax_inputs(logits, temperature, noise_state, noise);
  check_grad(grad_sample, "grad_sample", logits.sizes(), logits);
}

void check_entropy_backward_inputs(const at::Tensor& grad_entropy, const at::Tensor& grad_q_bar,
                                   const at::Tensor& logits, const at::Tensor& q_bar) {
  check_logits(logits);
  const int64_t k = logits.size(1);
  check_grad(grad_entropy, "grad_entropy", {}, logits);
  check_grad(grad_q_bar, "grad_q_bar", {k}, logits);
  check_grad(q_bar, "q_bar", {k}, logits);
}

double host_temperature(const at::Tensor& temperature) {
  TORCH_CHECK(temperature.device().is_cpu(), "internal: host_temperature of a ", temperature.device(), " tensor");
  return temperature.item<double>();
}

NoiseState host_noise_state(const at::Tensor& noise_state) {
  TORCH_CHECK(noise_state.device().is_cpu(), "internal: host_noise_state of a ", noise_state.device(), " tensor");
  const auto values = noise_state.reshape({2}).contiguous();
  return {values.data_ptr<int64_t>()[0], values.data_ptr<int64_t>()[1]};
}

void check_noise(const std::optional<at::Tensor>& noise, const char* name, int64_t rows,
                 int64_t cols, const at::Tensor& ref) {
  if (!noise.has_value()) return;
  const auto& t = *noise;
  check_matrix(t, name, "(N, cols)");
  check_like(t, name, ref, "the input", /*same_dtype=*/false);
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ", cols,
              "), got ", t.sizes());
}

void check_grad(const at::Tensor& grad, const char* name, at::IntArrayRef shape,
                const at::Tensor& ref) {
  TORCH_CHECK(grad.sizes() == shape, name, " must have shape ", shape, ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == ref.device(), name, " must be on ", ref.device(), ", got ",
              grad.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), name, " must be floating point, got ",
              grad.scalar_type());
}

}  // namespace gmvq
