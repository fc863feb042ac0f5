// The host's view of the fused quantize kernels (quantize.cu has the
// overview): their arguments, the tile sizes that the host's grids and checks
// depend on, the tile path, and the launches. The launches are defined, for
// float and double, in quantize_forward.cu and quantize_backward.cu: a
// translation unit per direction, so that the two compile in parallel.
#pragma once

#include "gmvq/cuda/scalar_args.cuh"

namespace gmvq::cuda::fused {

constexpr int kBlockThreads = 256;  // 8 warps, in every sweep
constexpr int kCodeTile = 64;       // codes per tile of every sweep
constexpr int kForwardRows = 64;    // rows per block of the forward row sweep
constexpr int kColumnRows = 64;     // rows per tile of the q_bar sweep
constexpr int kBackwardRows = 32;   // rows per block, or per tile, of the backward sweeps
constexpr int kRowsPerBlock = 8;    // the per-row kernels: one warp per row

// Accumulator slices of 8 columns per warp in the backward row sweep: D <= 4 * 8 * slices.
template <typename T>
constexpr int row_slices() {
  return sizeof(T) == 4 ? 4 : 2;
}
// The largest dp the backward register tiles hold.
template <typename T>
constexpr int max_backward_dp() {
  return 32 * row_slices<T>();
}

// How the sweeps multiply tiles (tile_math.cuh): on tensor cores with the
// 3xTF32 split (float only), or by FFMA / DFMA.
enum class Tiles { kSimt, kTensor };

// The codebook sweeps' arguments (quantize_common.cuh has the operand layout).
template <typename T>
struct SweepArgs {
  int64_t n = 0, k = 0, d = 0;
  int dp = 0, rp = 0;  // D rounded up to 8; operand width
  const T* rows = nullptr;      // (N, rp)
  const T* codes = nullptr;     // (K, rp)
  const T* row_term = nullptr;  // (N,)
  const T* gumbel = nullptr;    // given Gumbel noise (N, K), else Philox stream 0
  ScalarArg<T> inv_temperature;
  NoiseKey noise;
  bool training = false, hard = true;
  T* row_lse = nullptr;      // (N, 2): [logsumexp_k l, logsumexp_k (l + g) / T]
  int64_t* index = nullptr;  // (N,) the sampled code
  T* z_soft = nullptr;       // (N, D) sum_k y e_k (soft forward)
  // Column sweeps: blockIdx.y = segment s covers rows [s rows_per_segment, (s + 1) rows_per_segment).
  int64_t rows_per_segment = 0;
  T* partial = nullptr;  // per segment: q_bar (K,) or G_E (K, D)
  // Backward.
  const T* grad_pi = nullptr;  // (K,) G_qbar / N
  const T* grad_zq = nullptr;  // (N, dp) G_zq, zero padded
  T* b_pi = nullptr;           // (N,) sum_k pi G_pi (the row sweep writes it)
  T* beta = nullptr;           // (N,) sum_k y G_y (soft: the prepare kernel writes it; hard: the row sweep)
  const T* z = nullptr;        // (N, D) z in the accumulation dtype
  T* grad_z = nullptr;         // (N, D) the prepare kernel's part; the row sweep adds 2 w P
  T* grad_w = nullptr;         // (N, D) or (N,), when there is a weight
  T* grad_gumbel = nullptr;    // (N, K), when the noise was given (training)
};

// The per-row kernels' arguments (quantize_rows.cuh).
template <typename T>
struct RowArgs {
  int64_t n = 0, k = 0, d = 0;
  int dp = 0, rp = 0;
  const T* z = nullptr;           // (N, D)
  const T* codes = nullptr;       // (K, rp), E in part 0
  const int64_t* index = nullptr; // (N,) hard / eval
  const T* z_soft = nullptr;      // (N, D) soft training
  const T* eps = nullptr;         // given (N, D), else Philox stream 1
  NoiseKey noise;
  bool training = false, soft = false;
  bool noisy = false;              // training with noise_scale > 0: z_out gets (|r| / c0) eps
  T sigma_z2 = 1, c0 = 1;          // c0 = sqrt(2 sigma_z2 D) / noise_scale
  // forward
  T* z_out = nullptr;       // (N, D)
  T* latent_reg = nullptr;  // (N,)
  // backward
  const T* grad_z_out = nullptr;       // (N, D)
  const T* grad_latent_reg = nullptr;  // (N,)
  T* grad_z = nullptr;                 // (N, D)
  T* grad_zq = nullptr;                // (N, dp)
  T* grad_eps = nullptr;               // (N, D), when eps was given (noisy)
  T* beta = nullptr;                   // (N,), soft training
};

// Forward (quantize_forward.cu): the row sweep (soft: it also sums z_soft),
// the q_bar sweep over `segments` segments of rows, the per-row finish.
template <typename T>
void launch_forward_rows(Tiles tiles, const SweepArgs<T>& args, bool soft);
template <typename T>
void launch_forward_columns(Tiles tiles, const SweepArgs<T>& args, int64_t segments);
template <typename T>
void launch_forward_finish(const RowArgs<T>& args);

// Backward (quantize_backward.cu): the per-row gradients, then the row sweep
// and the codebook-gradient sweep over `segments` segments of rows.
template <typename T>
void launch_backward_prepare(const RowArgs<T>& args);
template <typename T>
void launch_backward_rows(Tiles tiles, const SweepArgs<T>& args, bool full_weight);
template <typename T>
void launch_backward_columns(Tiles tiles, const SweepArgs<T>& args, int64_t segments, bool full_weight);

}  // namespace gmvq::cuda::fused
