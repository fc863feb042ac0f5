// The per-row O(N D) parts of quantize, one warp per row (fixed-order sums):
//
// forward_finish_kernel: z_q = z_soft (soft) or E[index], r = z - z_q,
//   latent_reg = |r|^2 / (2 sigma_z2), and in training
//   z_out = z_q + |r| / sqrt(2 sigma_z2 D) * eps (eps given, or Philox stream 1).
// backward_prepare_kernel: the gradient through z_out and latent_reg into
//   z and z_q, with alpha = G_zout . eps, u = r / |r| (0 at r = 0), c0 = sqrt(2 sigma_z2 D):
//     G_z(direct) = (alpha / (|r| c0) + G_lat / sigma_z2) r,
//     G_zq = G_zout - G_z(direct),   G_eps = G_zout |r| / c0,
//   and in soft training beta = G_zq . z_soft (= sum_k y G_y). The indices
//   are the caller's: they are checked here, on the device (CUDA_KERNEL_ASSERT,
//   no host sync); an index outside [0, K) stops the kernel with a device-side
//   assertion, which surfaces as a CUDA error at the next synchronising call.
#pragma once

#include "gmvq/philox.h"
#include "quantize_args.cuh"

namespace gmvq::cuda::fused {

// Calls f(d, eps_d) for this lane's elements of row n, by Philox blocks of
// stream 1 (elements n D + d): one Philox call per four elements.
template <typename T, typename F>
__device__ __forceinline__ void for_each_eps(const RowArgs<T>& a, const NoiseKey& key, int64_t n, F f) {
  const int lane = threadIdx.x % 32;
  const int64_t first = n * a.d, last = first + a.d - 1;
  for (int64_t block = first / 4 + lane; block <= last / 4; block += 32) {
    rng::Philox4 words{};
    if (a.eps == nullptr) words = rng::philox_block(key.seed, key.offset, rng::kGaussianStream, block);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t d = 4 * block + q - first;
      if (d < 0 || d >= a.d) continue;
      f(d, a.eps != nullptr ? a.eps[n * a.d + d] : static_cast<T>(rng::gaussian_from_bits(words.word[q])));
    }
  }
}

// z_q of row n: z_soft (soft training) or the code's row of E.
template <typename T>
__device__ __forceinline__ const T* quantized_row(const RowArgs<T>& a, int64_t n) {
  if (a.soft) return a.z_soft + n * a.d;
  const int64_t index = a.index[n];
  CUDA_KERNEL_ASSERT(index >= 0 && index < a.k && "indices must lie in [0, K)");
  return a.codes + index * a.rp;
}

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32) forward_finish_kernel(RowArgs<T> a) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (n >= a.n) return;  // whole warps leave together
  const T* zq = quantized_row(a, n);
  const T* z = a.z + n * a.d;
  T rho2 = T(0);
  for (int64_t d = lane; d < a.d; d += 32) {
    const T r = z[d] - zq[d];
    rho2 += r * r;
  }
  rho2 = sum_lanes(rho2, 32);
  if (lane == 0) a.latent_reg[n] = rho2 / (T(2) * a.sigma_z2);
  T* out = a.z_out + n * a.d;
  if (!a.noisy) {
    for (int64_t d = lane; d < a.d; d += 32) out[d] = zq[d];
    return;
  }
  const T scale = sqrt(rho2) / a.c0;
  const NoiseKey key = a.noise.get();
  for_each_eps(a, key, n, [&](int64_t d, T eps) { out[d] = zq[d] + scale * eps; });
}

template <typename T>
__global__ void __launch_bounds__(kRowsPerBlock * 32) backward_prepare_kernel(RowArgs<T> a) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (n >= a.n) return;  // whole warps leave together
  const T* zq = quantized_row(a, n);
  const T* z = a.z + n * a.d;
  const T* g_out = a.grad_z_out + n * a.d;
  T rho2 = T(0), alpha = T(0);
  for (int64_t d = lane; d < a.d; d += 32) {
    const T r = z[d] - zq[d];
    rho2 += r * r;
  }
  if (a.noisy) {
    const NoiseKey key = a.noise.get();
    for_each_eps(a, key, n, [&](int64_t d, T eps) { alpha += g_out[d] * eps; });
  }
  rho2 = sum_lanes(rho2, 32);
  alpha = sum_lanes(alpha, 32);
  const T rho = sqrt(rho2);
  // d z_out / d r through the scale |r| / c0 is (alpha / c0) r / |r|, taken as 0 at r = 0.
  const T through_scale = a.noisy && rho > T(0) ? alpha / (rho * a.c0) : T(0);
  const T coefficient = through_scale + a.grad_latent_reg[n] / a.sigma_z2;
  const T eps_factor = rho / a.c0;  // |r| / c0, the factor of eps in z_out
  T beta = T(0);
  for (int64_t d = lane; d < a.d; d += 32) {
    const T direct = coefficient * (z[d] - zq[d]);
    const T gzq = g_out[d] - direct;
    a.grad_z[n * a.d + d] = direct;
    a.grad_zq[n * a.dp + d] = gzq;
    if (a.grad_eps != nullptr) a.grad_eps[n * a.d + d] = g_out[d] * eps_factor;
    if (a.soft) beta += gzq * zq[d];
  }
  if (a.soft) {
    beta = sum_lanes(beta, 32);
    if (lane == 0) a.beta[n] = beta;
  }
}

}  // namespace gmvq::cuda::fused
