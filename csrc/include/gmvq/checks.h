// Input validation shared by the CPU and CUDA kernels. Every message names the
// argument; gmvq_ext/_checks.py mirrors these in the fake kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "gmvq/philox.h"

namespace gmvq {

// Logits, softmax statistics and entropies: float64 for float64 inputs, else float32.
inline at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// A floating (N, cols) matrix; shape_doc is shown in the message, e.g. "(N, D)".
void check_matrix(const at::Tensor& t, const char* name, const char* shape_doc);
// Same device (and, with same_dtype, same dtype) as the tensor called ref_name.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                bool same_dtype);
// z (N, D), weight None or (N, D) or (N, 1), codebook (K >= 1, D): all checks.
void check_codebook_inputs(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                           const at::Tensor& codebook);
// logits (N, K >= 1).
void check_logits(const at::Tensor& logits, const char* name = "logits");
// A positive finite float argument (sigma_z2).
void check_positive_finite(double value, const char* name);
// temperature: a 0-dim float32/float64 tensor on the CPU or on ref's device. A
// CPU value is also checked to be finite and > 0 (reading it costs nothing); a
// device value is the caller's contract (reading it would sync the device).
void check_temperature(const at::Tensor& temperature, const at::Tensor& ref);
// noise_state: an int64 tensor of two elements [seed, offset] on the CPU or on ref's device.
void check_noise_state(const at::Tensor& noise_state, const at::Tensor& ref);
// Every input check of quantize (shared by quantize and quantize_backward, CPU and CUDA).
void check_quantize_inputs(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                           const at::Tensor& codebook, const at::Tensor& temperature, double sigma_z2,
                           const at::Tensor& noise_state, const std::optional<at::Tensor>& gumbel_noise,
                           const std::optional<at::Tensor>& eps_noise, double noise_scale);
// quantize_backward's own inputs: the gradients, the forward's indices and saved state.
void check_quantize_backward_state(const at::Tensor& grad_z_out, const at::Tensor& grad_q_bar,
                                   const at::Tensor& grad_latent_reg, const at::Tensor& indices,
                                   const at::Tensor& row_lse, const at::Tensor& z_soft, const at::Tensor& z,
                                   const at::Tensor& codebook, bool hard, bool training);

// philox_noise's distribution argument: "uniform", "gumbel" or "gaussian".
rng::NoiseDistribution parse_noise_distribution(c10::string_view distribution);

// Every input check of one op, called by its CPU and its CUDA kernel alike, so
// that a device can neither skip a check nor word it differently.
// philox_noise: like (R, C), the noise state; returns the distribution.
rng::NoiseDistribution check_philox_noise_inputs(const at::Tensor& like, const at::Tensor& noise_state,
                                                 c10::string_view distribution);
void check_codebook_distance_backward_inputs(const at::Tensor& grad_distance, const at::Tensor& z,
                                             const std::optional<at::Tensor>& weight, const at::Tensor& codebook);
void check_weighted_softmax_inputs(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                                   const at::Tensor& codebook, const at::Tensor& temperature);
void check_weighted_softmax_backward_inputs(const at::Tensor& grad_probs, const at::Tensor& grad_lse,
                                            const at::Tensor& probs, const at::Tensor& z,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
                                            const at::Tensor& temperature);
void check_gumbel_argmax_inputs(const at::Tensor& logits, const at::Tensor& temperature,
                                const at::Tensor& noise_state, const std::optional<at::Tensor>& noise);
void check_gumbel_argmax_backward_inputs(const at::Tensor& grad_sample, const at::Tensor& logits,
                                         const at::Tensor& temperature, const at::Tensor& noise_state,
                                         const std::optional<at::Tensor>& noise);
void check_entropy_backward_inputs(const at::Tensor& grad_entropy, const at::Tensor& grad_q_bar,
                                   const at::Tensor& logits, const at::Tensor& q_bar);

// The values of CPU-resident scalars (for CPU kernels, or CUDA kernels given CPU scalars).
double host_temperature(const at::Tensor& temperature);
struct NoiseState {
  int64_t seed = 0, offset = 0;
};
NoiseState host_noise_state(const at::Tensor& noise_state);
// An optional noise tensor: floating, shape (rows, cols), on ref's device.
void check_noise(const std::optional<at::Tensor>& noise, const char* name, int64_t rows,
                 int64_t cols, const at::Tensor& ref);
// A gradient of shape `shape` on ref's device.
void check_grad(const at::Tensor& grad, const char* name, at::IntArrayRef shape,
                const at::Tensor& ref);

// The gradient for an absent optional input: an empty tensor.
inline at::Tensor absent_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace gmvq
