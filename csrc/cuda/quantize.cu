// quantize on CUDA: the fused GM-VQ bottleneck. No N x K tensor is ever
// allocated (unless the caller passes gumbel_noise, whose gradient is N x K):
// the sweeps of fused_quantize.cuh recompute logits and noise tile by tile
// from z, w, E and (seed, offset); the per-row finish (z_q, s, eps, z_out,
// latent_reg and the per-row gradient terms) is O(N D) tensor arithmetic.
#include <torch/library.h>

#include <cmath>

#include "gmvq/checks.h"
#include "gmvq/cuda/fused_quantize.cuh"
#include "gmvq/cuda/noise.cuh"

namespace gmvq::cuda {
namespace {

void check_quantize_inputs(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                           const at::Tensor& codebook, double temperature, double sigma_z2,
                           const std::optional<at::Tensor>& gumbel_noise,
                           const std::optional<at::Tensor>& eps_noise) {
  check_codebook_inputs(z, weight, codebook);
  check_positive_finite(temperature, "temperature");
  check_positive_finite(sigma_z2, "sigma_z2");
  check_noise(gumbel_noise, "gumbel_noise", z.size(0), codebook.size(0), z);
  check_noise(eps_noise, "eps_noise", z.size(0), z.size(1), z);
}

// Row segments of the column sweeps: about 4 waves of blocks on a large GPU,
// decided by the shape alone so that the summation order never changes.
int64_t column_segments(int64_t n, int64_t k) {
  const int64_t row_tiles = ceil_div(n, kTile), code_tiles = ceil_div(k, kTile);
  return std::max<int64_t>(1, std::min<int64_t>(row_tiles, ceil_div(528, code_tiles)));
}

template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes, const char* what) {
  const int64_t static_bytes = 3 * 2 * 16 * kTilePad * 4;  // the largest TileStage
  TORCH_CHECK(bytes + static_bytes <= max_dynamic_smem(), "quantize (CUDA): D = ", what,
              " needs more shared memory per block than this GPU has (", bytes + static_bytes,
              " bytes); use a smaller D or the CPU");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <typename T>
QuantizeView<T> make_view(const CodebookTerms& terms, const at::Tensor& gumbel, int64_t seed,
                          int64_t offset, double temperature, bool hard, bool training) {
  QuantizeView<T> v;
  v.dist = distance_view<T>(terms);
  v.gumbel = gumbel.defined() ? gumbel.data_ptr<T>() : nullptr;
  v.seed = seed;
  v.offset = offset;
  v.temperature = static_cast<T>(temperature);
  v.hard = hard;
  v.training = training;
  return v;
}

struct RowStats {
  at::Tensor lse1, lse2, b_pi, index, z_soft;
};

// Sweep 1 (see fused_quantize.cuh). grad_qbar: G_qbar / N for b_pi (backward).
template <typename T>
RowStats row_stats(QuantizeView<T> v, const at::TensorOptions& opts, bool want_index,
                   bool want_z_soft, const at::Tensor& grad_qbar) {
  const int64_t n = v.dist.n, d = v.dist.d;
  RowStats s;
  s.lse1 = at::empty({n}, opts);
  s.lse2 = at::empty({n}, opts);
  if (grad_qbar.defined()) s.b_pi = at::empty({n}, opts);
  if (want_index) s.index = at::empty({n}, opts.dtype(at::kLong));
  if (want_z_soft) s.z_soft = at::empty({n, d}, opts);
  RowStatsOut<T> out;
  out.lse1 = s.lse1.data_ptr<T>();
  out.lse2 = s.lse2.data_ptr<T>();
  out.b_pi = grad_qbar.defined() ? s.b_pi.data_ptr<T>() : nullptr;
  out.index = want_index ? s.index.data_ptr<int64_t>() : nullptr;
  out.z_soft = want_z_soft ? s.z_soft.data_ptr<T>() : nullptr;
  v.grad_qbar = grad_qbar.defined() ? grad_qbar.data_ptr<T>() : nullptr;
  const int64_t smem = row_stats_smem<T>(d, want_z_soft);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto kernel) {
    allow_smem(kernel, smem, std::to_string(d).c_str());
    GMVQ_LAUNCH(kernel, ceil_div(n, kTile), kThreads, smem, stream, v, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (v.dist.full_weight) {
    launch(row_stats_kernel<T, true>);
  } else {
    launch(row_stats_kernel<T, false>);
  }
  return s;
}

// Sweep 3 in its forward form: q_bar[k] = sum_n pi[n, k] / N.
template <typename T>
at::Tensor q_bar_sweep(const QuantizeView<T>& v, const at::TensorOptions& opts) {
  const int64_t n = v.dist.n, k = v.dist.k;
  const int64_t segments = column_segments(n, k);
  auto partial = at::empty({segments, k}, opts);
  ColSweepArgs<T> args;
  args.partial = partial.data_ptr<T>();
  args.rows_per_segment = ceil_div(ceil_div(n, kTile), segments) * kTile;
  const int64_t smem = col_sweep_smem<T>(v.dist.d, /*grad=*/false);
  const dim3 grid(ceil_div(k, kTile), segments);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto kernel) {
    allow_smem(kernel, smem, std::to_string(v.dist.d).c_str());
    GMVQ_LAUNCH(kernel, grid, kThreads, smem, stream, v, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (v.dist.full_weight) {
    launch(col_sweep_kernel<T, true, false, false>);
  } else {
    launch(col_sweep_kernel<T, false, false, false>);
  }
  return partial.sum(0) / static_cast<double>(n);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize(
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    double temperature, double sigma_z2, bool hard, bool training, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& gumbel_noise, const std::optional<at::Tensor>& eps_noise) {
  check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, gumbel_noise, eps_noise);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), d = z.size(1), k = codebook.size(0);
  const auto acc = accumulation_type(z.scalar_type());
  const auto opts = z.options().dtype(acc);
  if (n == 0) {
    return {at::empty_like(z, at::MemoryFormat::Contiguous), at::empty({0}, z.options().dtype(at::kLong)),
            at::zeros({k}, opts), at::empty({0}, opts)};
  }
  const CodebookTerms terms(z, weight, codebook);
  const auto gumbel = (training && gumbel_noise.has_value()) ? to_acc(*gumbel_noise, acc) : at::Tensor();
  const bool soft_sample = training && !hard;
  RowStats stats;
  at::Tensor q_bar;
  dispatch_acc(acc, [&](auto tag) {
    using T = decltype(tag);
    auto v = make_view<T>(terms, gumbel, seed, offset, temperature, hard, training);
    stats = row_stats<T>(v, opts, /*want_index=*/true, /*want_z_soft=*/soft_sample, at::Tensor());
    v.lse1 = stats.lse1.data_ptr<T>();  // q_bar needs the normalised pi: a second sweep
    q_bar = q_bar_sweep<T>(v, opts);
  });
  const auto z_acc = z.to(acc);
  const auto z_q = soft_sample ? stats.z_soft : terms.codebook.index_select(0, stats.index);
  const auto residual = z_acc - z_q;
  const auto latent_reg = residual.pow(2).sum(1) / (2.0 * sigma_z2);
  at::Tensor z_out = z_q;
  if (training) {
    const auto eps = eps_noise.has_value() ? eps_noise->to(acc)
                                           : gaussian_noise_cuda(n, d, seed, offset, z.options()).to(acc);
    const auto scale = at::linalg_vector_norm(residual, 2, {1}, /*keepdim=*/true) /
                       std::sqrt(2.0 * sigma_z2 * static_cast<double>(d));
    z_out = z_q + scale * eps;
  }
  return {z_out.to(z.scalar_type()).contiguous(), stats.index, q_bar, latent_reg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_backward(
    const at::Tensor& grad_z_out, const at::Tensor& grad_q_bar, const at::Tensor& grad_latent_reg,
    const at::Tensor& z, const std::optional<at::Tensor>& weight, const at::Tensor& codebook,
    const at::Tensor& indices, double temperature, double sigma_z2, bool hard, bool training,
    int64_t seed, int64_t offset, const std::optional<at::Tensor>& gumbel_noise,
    const std::optional<at::Tensor>& eps_noise) {
  check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, gumbel_noise, eps_noise);
  const int64_t n = z.size(0), d = z.size(1), k = codebook.size(0);
  check_grad(grad_z_out, "grad_z_out", {n, d}, z);
  check_grad(grad_q_bar, "grad_q_bar", {k}, z);
  check_grad(grad_latent_reg, "grad_latent_reg", {n}, z);
  TORCH_CHECK(indices.sizes() == at::IntArrayRef({n}) && indices.scalar_type() == at::kLong,
              "indices must be an int64 tensor of shape (", n, "), got ", indices.scalar_type(), " ",
              indices.sizes());
  TORCH_CHECK(indices.device() == z.device(), "indices must be on ", z.device(), ", got ", indices.device());
  const c10::cuda::CUDAGuard guard(z.device());
  if (n > 0) {  // the kernels trust the indices: one host sync to check them
    const auto [low, high] = at::aminmax(indices);
    const int64_t min_index = low.item<int64_t>(), max_index = high.item<int64_t>();
    TORCH_CHECK(min_index >= 0 && max_index < k, "indices must lie in [0, ", k, "), got values in [",
                min_index, ", ", max_index, "]");
  }
  const auto acc = accumulation_type(z.scalar_type());
  const auto opts = z.options().dtype(acc);
  const auto cast_like = [](const at::Tensor& g, const at::Tensor& like) {
    return g.to(like.scalar_type()).contiguous();
  };
  if (n == 0) {
    return {at::empty_like(z, at::MemoryFormat::Contiguous),
            weight.has_value() ? at::empty_like(*weight, at::MemoryFormat::Contiguous) : absent_grad(z),
            at::zeros_like(codebook, at::MemoryFormat::Contiguous),
            gumbel_noise.has_value() ? at::empty_like(*gumbel_noise, at::MemoryFormat::Contiguous) : absent_grad(z),
            eps_noise.has_value() ? at::empty_like(*eps_noise, at::MemoryFormat::Contiguous) : absent_grad(z)};
  }
  const CodebookTerms terms(z, weight, codebook);
  const auto gumbel = (training && gumbel_noise.has_value()) ? to_acc(*gumbel_noise, acc) : at::Tensor();
  const auto index = indices.contiguous();
  const auto grad_qbar_n = (grad_q_bar.to(acc) / static_cast<double>(n)).contiguous();
  const auto z_acc = z.to(acc);
  const auto g_out = grad_z_out.to(acc);
  const auto g_lat = grad_latent_reg.to(acc).unsqueeze(1);
  const double c0 = std::sqrt(2.0 * sigma_z2 * static_cast<double>(d));

  at::Tensor grad_z, grad_w, grad_e, grad_gumbel, grad_eps;
  dispatch_acc(acc, [&](auto tag) {
    using T = decltype(tag);
    auto v = make_view<T>(terms, gumbel, seed, offset, temperature, hard, training);
    // Pass 1: row statistics (O(N) saved), then the per-row terms.
    const RowStats stats = row_stats<T>(v, opts, /*want_index=*/false, /*want_z_soft=*/training, grad_qbar_n);
    const auto z_q = (training && !hard) ? stats.z_soft : terms.codebook.index_select(0, index);
    const auto residual = z_acc - z_q;
    at::Tensor grad_direct, grad_zq, beta;
    if (training) {
      const auto eps = eps_noise.has_value() ? eps_noise->to(acc)
                                             : gaussian_noise_cuda(n, d, seed, offset, z.options()).to(acc);
      const auto rho = at::linalg_vector_norm(residual, 2, {1}, /*keepdim=*/true);
      const auto alpha = (g_out * eps).sum(1, /*keepdim=*/true);
      const auto u = at::where(rho > 0, residual / rho, at::zeros_like(residual));
      const auto through_scale = alpha * u / c0;
      const auto through_latent = g_lat * residual / sigma_z2;
      grad_direct = through_scale + through_latent;
      grad_zq = (g_out - through_scale - through_latent).contiguous();
      beta = (grad_zq * stats.z_soft).sum(1).contiguous();
      if (eps_noise.has_value()) grad_eps = cast_like(g_out * (rho / c0), *eps_noise);
    } else {
      const auto through_latent = g_lat * residual / sigma_z2;
      grad_direct = through_latent;
      grad_zq = (g_out - through_latent).contiguous();
      if (eps_noise.has_value()) grad_eps = at::zeros_like(*eps_noise, at::MemoryFormat::Contiguous);
    }
    v.grad_qbar = grad_qbar_n.data_ptr<T>();
    v.lse1 = stats.lse1.data_ptr<T>();
    v.lse2 = stats.lse2.data_ptr<T>();
    v.b_pi = stats.b_pi.data_ptr<T>();
    v.beta = training ? beta.data_ptr<T>() : nullptr;
    v.index = index.data_ptr<int64_t>();
    v.grad_zq = Operand<T>{grad_zq.data_ptr<T>(), n, d, 1};

    // Pass 2: row sums S, P = G_l E, Q = G_l (E*E) and dL/dgumbel.
    const auto s = at::empty({n}, opts);
    const auto p = at::empty({n, d}, opts);
    const auto q = weight.has_value() ? at::empty({n, d}, opts) : at::Tensor();
    at::Tensor g_gumbel;
    if (gumbel_noise.has_value()) g_gumbel = training ? at::empty({n, k}, opts) : at::zeros({n, k}, opts);
    RowGradOut<T> row_out;
    row_out.s = s.data_ptr<T>();
    row_out.p = p.data_ptr<T>();
    row_out.q = q.defined() ? q.data_ptr<T>() : nullptr;
    row_out.grad_gumbel = (training && g_gumbel.defined()) ? g_gumbel.data_ptr<T>() : nullptr;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t row_smem = row_grad_smem<T>(d);
    const auto launch_rows = [&](auto kernel) {
      allow_smem(kernel, row_smem, std::to_string(d).c_str());
      GMVQ_LAUNCH(kernel, ceil_div(n, kTile), kThreads, row_smem, stream, v, row_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // Pass 3: G_E partials over fixed row segments, summed in a fixed order.
    const int64_t segments = column_segments(n, k);
    auto partial = at::empty({segments, k, d}, opts);
    ColSweepArgs<T> col_args;
    col_args.partial = partial.data_ptr<T>();
    col_args.rows_per_segment = ceil_div(ceil_div(n, kTile), segments) * kTile;
    const int64_t col_smem = col_sweep_smem<T>(d, /*grad=*/true);
    const dim3 col_grid(ceil_div(k, kTile), segments);
    const auto launch_cols = [&](auto kernel) {
      allow_smem(kernel, col_smem, std::to_string(d).c_str());
      GMVQ_LAUNCH(kernel, col_grid, kThreads, col_smem, stream, v, col_args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool full = terms.full_weight;
    if (training && full) {
      launch_rows(row_grad_kernel<T, true, true>);
      launch_cols(col_sweep_kernel<T, true, true, true>);
    } else if (training) {
      launch_rows(row_grad_kernel<T, false, true>);
      launch_cols(col_sweep_kernel<T, false, true, true>);
    } else if (full) {
      launch_rows(row_grad_kernel<T, true, false>);
      launch_cols(col_sweep_kernel<T, true, false, true>);
    } else {
      launch_rows(row_grad_kernel<T, false, false>);
      launch_cols(col_sweep_kernel<T, false, false, true>);
    }
    const auto s_col = s.unsqueeze(1);
    grad_z = grad_direct - 2.0 * terms.w_full * (z_acc * s_col - p);
    if (weight.has_value()) {
      grad_w = -(z_acc * z_acc * s_col - 2.0 * z_acc * p + q);
      if (weight->size(1) == 1) grad_w = grad_w.sum(1, /*keepdim=*/true);
    }
    grad_e = segments == 1 ? partial.squeeze(0) : partial.sum(0);
    grad_gumbel = g_gumbel;
  });
  return {cast_like(grad_z, z),
          weight.has_value() ? cast_like(grad_w, *weight) : absent_grad(z),
          cast_like(grad_e, codebook),
          gumbel_noise.has_value() ? cast_like(grad_gumbel, *gumbel_noise) : absent_grad(z),
          eps_noise.has_value() ? grad_eps : absent_grad(z)};
}

}  // namespace
}  // namespace gmvq::cuda

TORCH_LIBRARY_IMPL(gmvq, CUDA, m) {
  m.impl("quantize", &gmvq::cuda::quantize);
  m.impl("quantize_backward", &gmvq::cuda::quantize_backward);
}
