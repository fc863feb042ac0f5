// Every schema of the gmvq namespace, in one place. Kernels live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL); fake kernels
// and autograd wiring in gmvq_ext/ops.py. Absent optional inputs give an
// empty gradient (numel 0) from the backward ops.
#include <torch/library.h>

TORCH_LIBRARY(gmvq, m) {
  // The counter-based noise itself (philox.h): float32 of like's shape (R, C),
  // Gumbel (stream 0) or Gaussian (stream 1), element r * C + c.
  m.def("philox_noise(Tensor like, int seed, int offset, bool gaussian) -> Tensor");

  m.def("codebook_distance(Tensor z, Tensor? weight, Tensor codebook) -> Tensor");
  m.def(
      "codebook_distance_backward(Tensor grad_distance, Tensor z, Tensor? weight, Tensor codebook)"
      " -> (Tensor grad_z, Tensor grad_weight, Tensor grad_codebook)");

  m.def(
      "weighted_softmax(Tensor z, Tensor? weight, Tensor codebook, float temperature)"
      " -> (Tensor probs, Tensor lse)");
  m.def(
      "weighted_softmax_backward(Tensor grad_probs, Tensor grad_lse, Tensor probs, Tensor z,"
      " Tensor? weight, Tensor codebook, float temperature)"
      " -> (Tensor grad_z, Tensor grad_weight, Tensor grad_codebook)");

  m.def(
      "gumbel_argmax(Tensor logits, float temperature, bool hard, int seed, int offset,"
      " Tensor? noise) -> (Tensor sample, Tensor indices)");
  m.def(
      "gumbel_argmax_backward(Tensor grad_sample, Tensor logits, float temperature, int seed,"
      " int offset, Tensor? noise) -> Tensor grad_logits");

  m.def("aggregated_posterior_entropy(Tensor logits) -> (Tensor entropy, Tensor q_bar)");
  m.def(
      "aggregated_posterior_entropy_backward(Tensor grad_entropy, Tensor grad_q_bar,"
      " Tensor logits, Tensor q_bar) -> Tensor grad_logits");

  m.def(
      "quantize(Tensor z, Tensor? weight, Tensor codebook, float temperature, float sigma_z2,"
      " bool hard, bool training, int seed, int offset, Tensor? gumbel_noise, Tensor? eps_noise)"
      " -> (Tensor z_out, Tensor indices, Tensor q_bar, Tensor latent_reg)");
  m.def(
      "quantize_backward(Tensor grad_z_out, Tensor grad_q_bar, Tensor grad_latent_reg, Tensor z,"
      " Tensor? weight, Tensor codebook, Tensor indices, float temperature, float sigma_z2,"
      " bool hard, bool training, int seed, int offset, Tensor? gumbel_noise, Tensor? eps_noise)"
      " -> (Tensor grad_z, Tensor grad_weight, Tensor grad_codebook, Tensor grad_gumbel_noise,"
      " Tensor grad_eps_noise)");
}
