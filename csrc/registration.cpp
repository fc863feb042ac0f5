// Every schema of the gmvq namespace, in one place. Kernels live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL); fake kernels
// and autograd wiring in gmvq_ext/ops.py; the math in docs/math.md. Absent
// optional inputs give an empty gradient (numel 0) from the backward ops.
//
// Run-time scalars are tensors, as in flash-attention and PyTorch's own
// attention kernels: `temperature` is a 0-dim float tensor and `noise_state`
// an int64 tensor [seed, offset], each on the CPU or on the inputs' device.
// A training step that anneals the temperature and advances the noise
// offset is then one traced graph (no recompile per value) and one CUDA
// graph (the kernels read the values from device memory: no host sync).
#include <torch/library.h>

TORCH_LIBRARY(gmvq, m) {
  // The counter-based noise itself (philox.h): float32 of like's shape (R, C),
  // element r * C + c; distribution "uniform" or "gumbel" (stream 0), "gaussian" (stream 1).
  m.def("philox_noise(Tensor like, Tensor noise_state, str distribution) -> Tensor");

  m.def("codebook_distance(Tensor z, Tensor? weight, Tensor codebook) -> Tensor");
  m.def(
      "codebook_distance_backward(Tensor grad_distance, Tensor z, Tensor? weight, Tensor codebook)"
      " -> (Tensor grad_z, Tensor grad_weight, Tensor grad_codebook)");

  m.def(
      "weighted_softmax(Tensor z, Tensor? weight, Tensor codebook, Tensor temperature)"
      " -> (Tensor probs, Tensor lse)");
  m.def(
      "weighted_softmax_backward(Tensor grad_probs, Tensor grad_lse, Tensor probs, Tensor z,"
      " Tensor? weight, Tensor codebook, Tensor temperature)"
      " -> (Tensor grad_z, Tensor grad_weight, Tensor grad_codebook)");

  m.def(
      "gumbel_argmax(Tensor logits, Tensor temperature, bool hard, Tensor noise_state, Tensor? noise)"
      " -> (Tensor sample, Tensor indices)");
  m.def(
      "gumbel_argmax_backward(Tensor grad_sample, Tensor logits, Tensor temperature,"
      " Tensor noise_state, Tensor? noise) -> Tensor grad_logits");

  m.def("aggregated_posterior_entropy(Tensor logits) -> (Tensor entropy, Tensor q_bar)");
  m.def(
      "aggregated_posterior_entropy_backward(Tensor grad_entropy, Tensor grad_q_bar,"
      " Tensor logits, Tensor q_bar) -> Tensor grad_logits");

  // row_lse (N, 2): logsumexp_k l and, in training, logsumexp_k (l + g) / T;
  // z_soft: the soft sample's mean sum_k y e_k (= z_q), (N, D) in soft training,
  // else (0, D). Both are state for the backward (flash-attention's softmax_lse).
  m.def(
      "quantize(Tensor z, Tensor? weight, Tensor codebook, Tensor temperature, float sigma_z2,"
      " bool hard, bool training, Tensor noise_state, Tensor? gumbel_noise, Tensor? eps_noise,"
      " float noise_scale=1.0)"
      " -> (Tensor z_out, Tensor indices, Tensor q_bar, Tensor latent_reg, Tensor row_lse,"
      " Tensor z_soft)");
  m.def(
      "quantize_backward(Tensor grad_z_out, Tensor grad_q_bar, Tensor grad_latent_reg, Tensor z,"
      " Tensor? weight, Tensor codebook, Tensor indices, Tensor row_lse, Tensor z_soft,"
      " Tensor temperature, float sigma_z2, bool hard, bool training, Tensor noise_state,"
      " Tensor? gumbel_noise, Tensor? eps_noise, float noise_scale=1.0)"
      " -> (Tensor grad_z, Tensor grad_weight, Tensor grad_codebook, Tensor grad_gumbel_noise,"
      " Tensor grad_eps_noise)");
}
