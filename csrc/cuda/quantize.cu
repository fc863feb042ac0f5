// quantize on CUDA: the fused GM-VQ bottleneck (docs/math.md#quantize). No N x K
// tensor is allocated in either direction (unless the caller passes
// gumbel_noise, whose gradient is N x K): logits, noise and probabilities are
// recomputed tile by tile, as flash attention does, from z, w, E, the noise
// key and O(N) saved row statistics.
//
// Forward (noise generated once):
//   forward_rows     one sweep over the codebook per block of rows: row_lse
//                    (lse_pi, lse_y), the index, z_soft (soft training);
//   forward_columns  one sweep without noise: q_bar = mean_n pi;
//   forward_finish   per row: z_q, latent_reg, z_out = z_q + s eps.
// Backward (noise regenerated twice, from the forward's row_lse and z_soft):
//   backward_prepare per row: G_zq, the direct part of G_z, G_eps, soft beta
//                    (and the device-side check of the indices);
//   backward_rows    one sweep: b_pi, hard beta, G_z += 2 w P, G_w;
//   backward_columns one sweep: G_E (and dL/dg) per segment of rows.
// The formulas are in quantize_backward.cuh; the tile layout in
// quantize_common.cuh. row_lse's second column in eval (no noise, no y)
// repeats the first.
//
// Tile products (tile_math.cuh): GMVQ_CUDA_TILES=tensor runs them on tensor
// cores with the 3xTF32 split (the default on compute capability 8.0+),
// GMVQ_CUDA_TILES=simt as FP32 FFMA; float64 inputs always take the SIMT
// path. The variable is read at each call (a getenv), so a benchmark can
// measure both paths in one process by changing os.environ between calls.
//
// This file is the host entry: the operands, the checks, the launch order.
// The kernels are launched from quantize_forward.cu and quantize_backward.cu
// (quantize_args.cuh declares them): three translation units that compile in
// parallel.
//
// Nothing here waits for the device: a device temperature and noise state are
// read by the kernels, the indices are checked by the kernel that reads them,
// and every loop bound comes from the shapes. Results are bitwise
// reproducible: no atomics, fixed reduction orders, and the segment partials
// added by at::sum, deterministic for a given shape and device (its order is
// fixed, though not left to right).
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "gmvq/checks.h"
#include "quantize_args.cuh"

namespace gmvq::cuda {
namespace {

using fused::RowArgs;
using fused::SweepArgs;
using fused::Tiles;

// The operands of quantize_common.cuh's layout, in the accumulation dtype.
struct Operands {
  int64_t n = 0, k = 0, d = 0;
  int dp = 0, rp = 0;
  bool full_weight = false;  // weight (N, D) with D > 1
  at::Tensor z;              // (N, D)
  at::Tensor rows;           // (N, rp)
  at::Tensor codes;          // (K, rp)
  at::Tensor row_term;       // (N,)

  Operands(const at::Tensor& z_in, const std::optional<at::Tensor>& weight, const at::Tensor& codebook) {
    const auto acc = accumulation_type(z_in.scalar_type());
    n = z_in.size(0);
    d = z_in.size(1);
    k = codebook.size(0);
    dp = static_cast<int>(ceil_div(d, 8) * 8);
    full_weight = weight.has_value() && weight->size(1) == d && d != 1;
    rp = full_weight ? 2 * dp : dp + 8;
    z = to_acc(z_in, acc);
    const auto e = to_acc(codebook, acc);
    rows = at::zeros({n, rp}, z.options());
    codes = at::zeros({k, rp}, z.options());
    at::Tensor w;  // (N, D) or (N, 1)
    if (weight.has_value()) {
      w = to_acc(*weight, acc);
    } else {
      w = at::ones({n, 1}, z.options());
    }
    const auto wz = w * z;
    row_term = (wz * z).sum(1).contiguous();
    rows.narrow(1, 0, d).copy_(wz * -2.0);
    rows.narrow(1, dp, w.size(1)).copy_(w);
    codes.narrow(1, 0, d).copy_(e);
    const auto e2 = e * e;
    codes.narrow(1, dp, full_weight ? d : 1).copy_(full_weight ? e2 : e2.sum(1, /*keepdim=*/true));
  }
};

Tiles tile_path(at::ScalarType acc) {
  if (acc == at::kDouble) return Tiles::kSimt;  // tensor cores hold no float64 products here
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const char* env = std::getenv("GMVQ_CUDA_TILES");
  const std::string choice = env == nullptr ? "" : env;
  if (choice.empty()) return major >= 8 ? Tiles::kTensor : Tiles::kSimt;
  if (choice == "simt") return Tiles::kSimt;
  TORCH_CHECK(choice == "tensor", "GMVQ_CUDA_TILES must be \"tensor\" or \"simt\", got \"", choice, "\"");
  TORCH_CHECK(major >= 8, "GMVQ_CUDA_TILES=tensor needs a GPU of compute capability 8.0 or newer, this one is ",
              major, ".x");
  return Tiles::kTensor;
}

// The register tiles hold a bounded D (quantize_backward.cuh).
template <typename T>
void check_dimension(const Operands& ops) {
  TORCH_CHECK(ops.dp <= fused::max_backward_dp<T>(), "quantize (CUDA): D = ", ops.d, " is larger than the ",
              fused::max_backward_dp<T>(), " the fused kernels hold in registers for ",
              sizeof(T) == 4 ? "float32" : "float64", " accumulation; run it on the CPU");
}

// Row segments of the column sweeps: about 4 waves of blocks on a large GPU,
// decided by the shape alone so that the summation order never changes. Each
// segment holds ceil(row tiles / segments) tiles, so the count is the number of
// segments that then hold rows: an empty one would leave its partial (from
// at::empty) unwritten and add garbage to the sum (N = 9000, K = 512: 66
// segments of 5 tiles, the last 9 empty).
int64_t column_segments(int64_t n, int64_t k, int64_t row_tile) {
  const int64_t row_tiles = ceil_div(n, row_tile), code_tiles = ceil_div(k, fused::kCodeTile);
  if (row_tiles == 0) return 1;
  const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(row_tiles, ceil_div(528, code_tiles)));
  return ceil_div(row_tiles, ceil_div(row_tiles, wanted));
}

template <typename T>
SweepArgs<T> sweep_args(const Operands& ops, const InverseTemperature& inv_temperature, const NoiseArg& noise,
                        const at::Tensor& gumbel, bool hard, bool training) {
  SweepArgs<T> a;
  a.n = ops.n;
  a.k = ops.k;
  a.d = ops.d;
  a.dp = ops.dp;
  a.rp = ops.rp;
  a.rows = ops.rows.data_ptr<T>();
  a.codes = ops.codes.data_ptr<T>();
  a.row_term = ops.row_term.data_ptr<T>();
  a.gumbel = gumbel.defined() ? gumbel.data_ptr<T>() : nullptr;
  a.inv_temperature = inv_temperature.arg<T>();
  a.noise = noise.key();
  a.training = training;
  a.hard = hard;
  return a;
}

template <typename T>
RowArgs<T> row_args(const Operands& ops, const NoiseArg& noise, const at::Tensor& eps, double sigma_z2,
                    double noise_scale, bool hard, bool training) {
  RowArgs<T> r;
  r.n = ops.n;
  r.k = ops.k;
  r.d = ops.d;
  r.dp = ops.dp;
  r.rp = ops.rp;
  r.z = ops.z.data_ptr<T>();
  r.codes = ops.codes.data_ptr<T>();
  r.eps = eps.defined() ? eps.data_ptr<T>() : nullptr;
  r.noise = noise.key();
  r.training = training;
  r.soft = training && !hard;
  r.noisy = training && noise_scale > 0.0;
  r.sigma_z2 = static_cast<T>(sigma_z2);
  if (r.noisy) r.c0 = static_cast<T>(std::sqrt(2.0 * sigma_z2 * static_cast<double>(ops.d)) / noise_scale);
  return r;
}

// Sum of the segment partials (S, ...) over the segments (at::sum: a fixed order).
at::Tensor sum_segments(const at::Tensor& partial) {
  return partial.size(0) == 1 ? partial.squeeze(0) : partial.sum(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize(
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    const at::Tensor& temperature, double sigma_z2, bool hard, bool training, const at::Tensor& noise_state,
    const std::optional<at::Tensor>& gumbel_noise, const std::optional<at::Tensor>& eps_noise,
    double noise_scale) {
  check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, noise_state, gumbel_noise, eps_noise,
                        noise_scale);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), d = z.size(1), k = codebook.size(0);
  const auto acc = accumulation_type(z.scalar_type());
  const auto opts = z.options().dtype(acc);
  const bool soft = training && !hard;
  if (n == 0) {
    return {at::empty({0, d}, z.options()), at::empty({0}, z.options().dtype(at::kLong)), at::zeros({k}, opts),
            at::empty({0}, opts), at::empty({0, 2}, opts), at::empty({0, d}, opts)};
  }
  const Operands ops(z, weight, codebook);
  const InverseTemperature inv_temperature(temperature, acc);
  const NoiseArg noise(noise_state);
  const auto gumbel = training && gumbel_noise.has_value() ? to_acc(*gumbel_noise, acc) : at::Tensor();
  const bool noisy = training && noise_scale > 0.0;
  const auto eps = noisy && eps_noise.has_value() ? to_acc(*eps_noise, acc) : at::Tensor();
  auto row_lse = at::empty({n, 2}, opts);
  auto indices = at::empty({n}, opts.dtype(at::kLong));
  auto z_soft = at::empty({soft ? n : 0, d}, opts);
  auto z_out = at::empty({n, d}, opts);
  auto latent_reg = at::empty({n}, opts);
  at::Tensor q_bar;
  dispatch_acc(acc, [&](auto tag) {
    using T = decltype(tag);
    const Tiles tiles = tile_path(acc);
    check_dimension<T>(ops);
    auto args = sweep_args<T>(ops, inv_temperature, noise, gumbel, hard, training);
    args.row_lse = row_lse.data_ptr<T>();
    args.index = indices.data_ptr<int64_t>();
    args.z_soft = soft ? z_soft.data_ptr<T>() : nullptr;
    fused::launch_forward_rows<T>(tiles, args, soft);

    const int64_t segments = column_segments(n, k, fused::kColumnRows);
    auto partial = at::empty({segments, k}, opts);
    args.partial = partial.data_ptr<T>();
    args.rows_per_segment = ceil_div(ceil_div(n, fused::kColumnRows), segments) * fused::kColumnRows;
    fused::launch_forward_columns<T>(tiles, args, segments);
    q_bar = sum_segments(partial).div_(static_cast<double>(n));

    auto finish = row_args<T>(ops, noise, eps, sigma_z2, noise_scale, hard, training);
    finish.index = indices.data_ptr<int64_t>();
    finish.z_soft = soft ? z_soft.data_ptr<T>() : nullptr;
    finish.z_out = z_out.data_ptr<T>();
    finish.latent_reg = latent_reg.data_ptr<T>();
    fused::launch_forward_finish<T>(finish);
  });
  return {z_out.to(z.scalar_type()), indices, q_bar, latent_reg, row_lse, z_soft};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_backward(
    const at::Tensor& grad_z_out, const at::Tensor& grad_q_bar, const at::Tensor& grad_latent_reg,
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    const at::Tensor& indices, const at::Tensor& row_lse, const at::Tensor& z_soft, const at::Tensor& temperature,
    double sigma_z2, bool hard, bool training, const at::Tensor& noise_state,
    const std::optional<at::Tensor>& gumbel_noise, const std::optional<at::Tensor>& eps_noise,
    double noise_scale) {
  check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, noise_state, gumbel_noise, eps_noise,
                        noise_scale);
  check_quantize_backward_state(grad_z_out, grad_q_bar, grad_latent_reg, indices, row_lse, z_soft, z, codebook,
                                hard, training);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), d = z.size(1), k = codebook.size(0);
  const auto acc = accumulation_type(z.scalar_type());
  const auto opts = z.options().dtype(acc);
  const auto like = [](const at::Tensor& t) { return at::empty_like(t, at::MemoryFormat::Contiguous); };
  if (n == 0) {
    return {like(z), weight.has_value() ? like(*weight) : absent_grad(z),
            at::zeros_like(codebook, at::MemoryFormat::Contiguous),
            gumbel_noise.has_value() ? like(*gumbel_noise) : absent_grad(z),
            eps_noise.has_value() ? like(*eps_noise) : absent_grad(z)};
  }
  const bool soft = training && !hard;
  const Operands ops(z, weight, codebook);
  const InverseTemperature inv_temperature(temperature, acc);
  const NoiseArg noise(noise_state);
  const auto gumbel = training && gumbel_noise.has_value() ? to_acc(*gumbel_noise, acc) : at::Tensor();
  const bool noisy = training && noise_scale > 0.0;
  const auto eps = noisy && eps_noise.has_value() ? to_acc(*eps_noise, acc) : at::Tensor();
  const auto g_out = to_acc(grad_z_out, acc);
  const auto g_lat = to_acc(grad_latent_reg, acc);
  const auto grad_pi = (grad_q_bar.to(acc) / static_cast<double>(n)).contiguous();
  const auto lse = row_lse.contiguous();
  const auto z_q_soft = z_soft.contiguous();
  const auto index = indices.contiguous();

  auto grad_zq = at::zeros({n, ops.dp}, opts);  // zero padding: exact products over whole steps
  auto grad_z = at::empty({n, d}, opts);
  auto b_pi = at::empty({n}, opts);
  auto beta = at::empty({n}, opts);  // soft: the prepare kernel; hard: the row sweep; eval: unused
  at::Tensor grad_w = weight.has_value() ? at::empty({n, weight->size(1)}, opts) : at::Tensor();
  at::Tensor grad_eps, grad_gumbel, grad_e;
  if (eps_noise.has_value()) grad_eps = noisy ? at::empty({n, d}, opts) : at::zeros({n, d}, opts);
  if (gumbel_noise.has_value()) grad_gumbel = training ? at::empty({n, k}, opts) : at::zeros({n, k}, opts);

  dispatch_acc(acc, [&](auto tag) {
    using T = decltype(tag);
    const Tiles tiles = tile_path(acc);
    check_dimension<T>(ops);
    auto prepare = row_args<T>(ops, noise, eps, sigma_z2, noise_scale, hard, training);
    prepare.index = index.data_ptr<int64_t>();
    prepare.z_soft = soft ? z_q_soft.data_ptr<T>() : nullptr;
    prepare.grad_z_out = g_out.data_ptr<T>();
    prepare.grad_latent_reg = g_lat.data_ptr<T>();
    prepare.grad_z = grad_z.data_ptr<T>();
    prepare.grad_zq = grad_zq.data_ptr<T>();
    prepare.grad_eps = noisy && grad_eps.defined() ? grad_eps.data_ptr<T>() : nullptr;
    prepare.beta = beta.data_ptr<T>();
    fused::launch_backward_prepare<T>(prepare);

    auto args = sweep_args<T>(ops, inv_temperature, noise, gumbel, hard, training);
    args.row_lse = lse.data_ptr<T>();
    args.index = index.data_ptr<int64_t>();
    args.grad_pi = grad_pi.data_ptr<T>();
    args.grad_zq = grad_zq.data_ptr<T>();
    args.b_pi = b_pi.data_ptr<T>();
    args.beta = beta.data_ptr<T>();
    args.z = ops.z.data_ptr<T>();
    args.grad_z = grad_z.data_ptr<T>();
    args.grad_w = grad_w.defined() ? grad_w.data_ptr<T>() : nullptr;
    args.grad_gumbel = training && grad_gumbel.defined() ? grad_gumbel.data_ptr<T>() : nullptr;
    const int64_t segments = column_segments(n, k, fused::kBackwardRows);
    auto partial = at::empty({segments, k, d}, opts);
    args.partial = partial.data_ptr<T>();
    args.rows_per_segment = ceil_div(ceil_div(n, fused::kBackwardRows), segments) * fused::kBackwardRows;
    fused::launch_backward_rows<T>(tiles, args, ops.full_weight);
    fused::launch_backward_columns<T>(tiles, args, segments, ops.full_weight);
    grad_e = sum_segments(partial);
  });
  const auto cast_like = [](const at::Tensor& g, const at::Tensor& ref) {
    return g.to(ref.scalar_type()).contiguous();
  };
  return {cast_like(grad_z, z), weight.has_value() ? cast_like(grad_w, *weight) : absent_grad(z),
          cast_like(grad_e, codebook), gumbel_noise.has_value() ? cast_like(grad_gumbel, *gumbel_noise) : absent_grad(z),
          eps_noise.has_value() ? cast_like(grad_eps, *eps_noise) : absent_grad(z)};
}

}  // namespace
}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) {
  m.impl("quantize", &gmvq::cuda::quantize);
  m.impl("quantize_backward", &gmvq::cuda::quantize_backward);
}
