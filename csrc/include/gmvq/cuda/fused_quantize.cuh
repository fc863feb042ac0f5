// The fused quantize kernels (flash-attention style): logits, Gumbel noise,
// softmax probabilities and their gradients are recomputed tile by tile and
// never stored; only O(N) row statistics and O(N D + K D) tensors live in
// global memory. Three sweeps, each over 64 x 64 tiles of (rows, codes):
//
//   row_stats_kernel  (a block owns 64 rows, loops over all codes)
//       online max/sum of exp(l) (lse1) and of (l+g)/T (lse2), the argmax of
//       l+g (training) or l (eval), b_pi = sum_k pi_k G_qbar_k / N, and for
//       soft samples z_soft = sum_k y_k e_k (a P @ E product, rescaled
//       flash-style whenever the running max moves);
//   row_grad_kernel   (a block owns 64 rows) the logits gradient G_l tile by
//       tile and its row sums S = sum_k G_l, P = G_l E, Q = G_l (E*E), plus
//       dL/dgumbel when the caller passed the noise;
//   col_sweep_kernel  (a block owns 64 codes and one fixed segment of rows)
//       column sums: q_bar partials (forward) or G_E partials (backward).
// Partials are summed over segments in a fixed order afterwards: no atomics,
// so every result is bitwise reproducible.
#pragma once

#include "gmvq/cuda/codebook_terms.cuh"
#include "gmvq/philox.h"

namespace gmvq::cuda {

template <typename T>
struct QuantizeView {
  DistanceView<T> dist;
  const T* gumbel = nullptr;  // given Gumbel noise (N, K), else regenerated
  int64_t seed = 0, offset = 0;
  T temperature = 1;
  bool training = true;
  bool hard = true;
  // Backward inputs.
  const T* grad_qbar = nullptr;     // (K,) G_qbar / N
  const T* lse1 = nullptr;          // (N,) logsumexp_k l
  const T* lse2 = nullptr;          // (N,) logsumexp_k (l + g) / T
  const T* b_pi = nullptr;          // (N,) sum_k pi G_qbar / N
  const T* beta = nullptr;          // (N,) G_zq . z_soft = sum_k y G_y
  const int64_t* index = nullptr;   // (N,) the sampled code
  Operand<T> grad_zq;               // (N, D) G_zq
};

#if defined(GMVQ_CUDA_EMULATION)
template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(emulation::dynamic_shared_memory());
}
#else
extern __shared__ __align__(16) unsigned char gmvq_dynamic_smem[];

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  return reinterpret_cast<T*>(gmvq_dynamic_smem);
}
#endif

// Logits l = -distance of this thread's 4 x 4 micro-tile (-inf outside the
// matrix) and, with GY, gy = G_zq[n] . e_k.
template <typename T, bool FULL, bool GY>
__device__ __forceinline__ void tile_logits(TileStage<T, 1 + FULL + GY>& stage, const QuantizeView<T>& v,
                                            int64_t row0, int64_t col0, T (&l)[kMicro][kMicro],
                                            T (&gy)[kMicro][kMicro]) {
  constexpr int NP = 1 + FULL + GY;
  Operand<T> a[NP], b[NP];
  a[0] = v.dist.wz;
  b[0] = v.dist.codebook;
  if constexpr (FULL) {
    a[1] = v.dist.w_full;
    b[1] = v.dist.code_sq;
  }
  if constexpr (GY) {
    a[NP - 1] = v.grad_zq;
    b[NP - 1] = v.dist.codebook;
  }
  T c[NP][kMicro][kMicro];
  tile_products<T, NP>(stage, a, b, v.dist.d, row0, col0, c);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t r = row0 + ty * kMicro + i;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t k = col0 + tx * kMicro + j;
      const bool valid = r < v.dist.n && k < v.dist.k;
      l[i][j] = valid ? -v.dist.distance(r, k, c[0][i][j], FULL ? c[FULL ? 1 : 0][i][j] : T(0))
                      : neg_inf<T>();
      gy[i][j] = GY ? c[NP - 1][i][j] : T(0);
    }
  }
}

// Gumbel noise of row r, codes k0 .. k0+3 (one Philox call when aligned).
template <typename T>
__device__ __forceinline__ void tile_noise(const QuantizeView<T>& v, int64_t r, int64_t k0,
                                           T (&g)[kMicro]) {
#pragma unroll
  for (int j = 0; j < kMicro; ++j) g[j] = T(0);
  if (r >= v.dist.n || k0 >= v.dist.k) return;
  const int count = v.dist.k - k0 < kMicro ? static_cast<int>(v.dist.k - k0) : kMicro;
  if (v.gumbel != nullptr) {
    for (int j = 0; j < count; ++j) g[j] = v.gumbel[r * v.dist.k + k0 + j];
  } else {
    float f[kMicro];
    rng::fill_gumbel(v.seed, v.offset, static_cast<uint64_t>(r * v.dist.k + k0), count, f);
    for (int j = 0; j < count; ++j) g[j] = static_cast<T>(f[j]);
  }
}

// ---------------------------------------------------------------------------
// Sweep 1: row statistics
// ---------------------------------------------------------------------------
template <typename T>
struct RowStatsOut {
  T* lse1 = nullptr;
  T* lse2 = nullptr;          // training
  T* b_pi = nullptr;          // when grad_qbar is given (backward)
  int64_t* index = nullptr;   // forward
  T* z_soft = nullptr;        // (N, D), when wanted
};

// Dynamic shared memory: p^T[64][kTilePad], row_scale[64], z_acc[64][D].
template <typename T>
int64_t row_stats_smem(int64_t d, bool z_soft) {
  return z_soft ? static_cast<int64_t>(sizeof(T)) * (kTile * kTilePad + kTile + kTile * d) : 0;
}

template <typename T, bool FULL>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(QuantizeView<T> v, RowStatsOut<T> out) {
  __shared__ TileStage<T, 1 + FULL> stage;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n = v.dist.n, k_total = v.dist.k, d = v.dist.d;
  const bool want_z_soft = out.z_soft != nullptr;
  T* p_tile = dynamic_smem<T>();              // [code][row], kTilePad per code
  T* row_scale = p_tile + kTile * kTilePad;   // [64]
  T* z_acc = row_scale + kTile;                  // [64][D]
  if (want_z_soft) {
    for (int64_t idx = threadIdx.x; idx < kTile * d; idx += kThreads) z_acc[idx] = T(0);
  }

  SoftmaxStats<T> pi_stats[kMicro];
  ArgMax<T> best[kMicro];
  T m2[kMicro], s2[kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    m2[i] = neg_inf<T>();
    s2[i] = T(0);
  }

  for (int64_t col0 = 0; col0 < k_total; col0 += kTile) {
    T l[kMicro][kMicro], unused[kMicro][kMicro];
    tile_logits<T, FULL, false>(stage, v, row0, col0, l, unused);
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t r = row0 + ty * kMicro + i;
      const int64_t k0 = col0 + tx * kMicro;
      T g[kMicro] = {};
      if (v.training) tile_noise(v, r, k0, g);
      T tile_max = neg_inf<T>();
      T y_arg[kMicro];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t k = k0 + j;
        const T gq = (v.grad_qbar != nullptr && k < k_total) ? v.grad_qbar[k] : T(0);
        pi_stats[i].add(l[i][j], gq);
        if (v.training) {
          const T perturbed = l[i][j] + g[j];
          best[i].add(perturbed, k);
          y_arg[j] = l[i][j] == neg_inf<T>() ? neg_inf<T>() : perturbed / v.temperature;
          tile_max = y_arg[j] > tile_max ? y_arg[j] : tile_max;
        } else {
          best[i].add(l[i][j], k);
        }
      }
      if (v.training) {
        // All 16 lanes of the row agree on the running max (needed to rescale z_acc).
        tile_max = max_lanes(tile_max, 16);
        const T new_max = tile_max > m2[i] ? tile_max : m2[i];
        const T scale = exp_shift(m2[i], new_max);
        T tile_sum = 0;
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          const T p = exp_shift(y_arg[j], new_max);
          tile_sum += p;
          if (want_z_soft) p_tile[(tx * kMicro + j) * kTilePad + ty * kMicro + i] = p;
        }
        s2[i] = s2[i] * scale + tile_sum;
        m2[i] = new_max;
        if (want_z_soft && tx == 0) row_scale[ty * kMicro + i] = scale;
      }
    }
    if (want_z_soft) {
      // z_acc[r] = z_acc[r] * scale_r + sum_k p[r][k] e_k (E read through L1).
      __syncthreads();
      const int64_t codes = k_total - col0 < kTile ? k_total - col0 : kTile;
      const T* const a[1] = {p_tile};
      const T* const b[1] = {v.dist.codebook.ptr + col0 * d};
      accumulate_products<T, 1>(z_acc, a, b, codes, d, row_scale,
                                [](int, int64_t, const T* c) { return c[0]; });
      // tile_logits' first barrier orders these reads before the next writes.
    }
  }

  if (want_z_soft) __syncthreads();  // the last tile's reads of row_scale are done
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    pi_stats[i].merge_lanes(16);
    best[i].merge_lanes(16);
    s2[i] = sum_lanes(s2[i], 16);
    const int64_t r = row0 + ty * kMicro + i;
    if (want_z_soft && tx == 0) row_scale[ty * kMicro + i] = s2[i];
    if (tx != 0 || r >= n) continue;
    out.lse1[r] = pi_stats[i].lse();
    if (out.b_pi != nullptr) out.b_pi[r] = pi_stats[i].t / pi_stats[i].s;
    if (out.index != nullptr) out.index[r] = best[i].index == INT64_MAX ? 0 : best[i].index;
    if (v.training && out.lse2 != nullptr) out.lse2[r] = m2[i] + log_acc(s2[i]);
  }
  if (want_z_soft) {
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < kTile * d; idx += kThreads) {
      const int64_t r = idx / d;
      if (row0 + r < n) out.z_soft[row0 * d + idx] = z_acc[idx] / row_scale[r];
    }
  }
}

// ---------------------------------------------------------------------------
// The logits gradient of one element (backward sweeps)
// ---------------------------------------------------------------------------
// G_l = pi (G_qbar/N - b_pi) + [training] (1/T) y (G_y - beta); also the
// weight c of G_zq in G_E (onehot(index) for hard or eval, y for soft) and
// the Gumbel part G_l2 (dL/dg).
template <typename T>
struct ElementGrad {
  T grad_logit, code_weight, grad_gumbel;
};

template <typename T>
__device__ __forceinline__ ElementGrad<T> element_grad(const QuantizeView<T>& v, int64_t r, int64_t k,
                                                       T l, T g, T gy) {
  ElementGrad<T> out{T(0), T(0), T(0)};
  if (l == neg_inf<T>()) return out;
  const T pi = exp_acc(l - v.lse1[r]);
  out.grad_logit = pi * (v.grad_qbar[k] - v.b_pi[r]);
  const bool chosen = v.index[r] == k;
  if (v.training) {
    const T y = exp_acc((l + g) / v.temperature - v.lse2[r]);
    out.grad_gumbel = y * (gy - v.beta[r]) / v.temperature;
    out.grad_logit += out.grad_gumbel;
    out.code_weight = v.hard ? T(chosen ? 1 : 0) : y;
  } else {
    out.code_weight = T(chosen ? 1 : 0);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Sweep 2: per-row gradient sums
// ---------------------------------------------------------------------------
template <typename T>
struct RowGradOut {
  T* s = nullptr;            // (N,)
  T* p = nullptr;            // (N, D)
  T* q = nullptr;            // (N, D), when there is a weight
  T* grad_gumbel = nullptr;  // (N, K), when the noise was given
};

// Dynamic shared memory: gl^T[64][kTilePad], p_acc[64][D], q_acc[64][D].
template <typename T>
int64_t row_grad_smem(int64_t d) {
  return static_cast<int64_t>(sizeof(T)) * (kTile * kTilePad + 2 * kTile * d);
}

template <typename T, bool FULL, bool GY>
__global__ void __launch_bounds__(kThreads) row_grad_kernel(QuantizeView<T> v, RowGradOut<T> out) {
  __shared__ TileStage<T, 1 + FULL + GY> stage;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n = v.dist.n, k_total = v.dist.k, d = v.dist.d;
  const bool want_q = out.q != nullptr;
  T* gl_tile = dynamic_smem<T>();              // [code][row], kTilePad per code
  T* p_acc = gl_tile + kTile * kTilePad;       // [64][D]
  T* q_acc = p_acc + kTile * d;                // [64][D]
  for (int64_t idx = threadIdx.x; idx < kTile * d; idx += kThreads) {
    p_acc[idx] = T(0);
    q_acc[idx] = T(0);
  }
  T s[kMicro] = {};

  for (int64_t col0 = 0; col0 < k_total; col0 += kTile) {
    T l[kMicro][kMicro], gy[kMicro][kMicro];
    tile_logits<T, FULL, GY>(stage, v, row0, col0, l, gy);
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t r = row0 + ty * kMicro + i;
      const int64_t k0 = col0 + tx * kMicro;
      T g[kMicro] = {};
      if (v.training) tile_noise(v, r, k0, g);
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const ElementGrad<T> e = element_grad(v, r, k0 + j, l[i][j], g[j], gy[i][j]);
        s[i] += e.grad_logit;
        gl_tile[(tx * kMicro + j) * kTilePad + ty * kMicro + i] = e.grad_logit;
        if (out.grad_gumbel != nullptr && r < n && k0 + j < k_total) {
          out.grad_gumbel[r * k_total + k0 + j] = e.grad_gumbel;
        }
      }
    }
    __syncthreads();
    const int64_t codes = k_total - col0 < kTile ? k_total - col0 : kTile;
    const auto first = [](int, int64_t, const T* c) { return c[0]; };
    const T* const a[1] = {gl_tile};
    const T* const e[1] = {v.dist.codebook.ptr + col0 * d};
    accumulate_products<T, 1>(p_acc, a, e, codes, d, nullptr, first);
    if (want_q) {
      const T* const e2[1] = {v.dist.code_sq.ptr + col0 * d};
      accumulate_products<T, 1>(q_acc, a, e2, codes, d, nullptr, first);
    }
  }

#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const T total = sum_lanes(s[i], 16);
    const int64_t r = row0 + ty * kMicro + i;
    if (tx == 0 && r < n) out.s[r] = total;
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < kTile * d; idx += kThreads) {
    if (row0 + idx / d >= n) continue;
    out.p[row0 * d + idx] = p_acc[idx];
    if (want_q) out.q[row0 * d + idx] = q_acc[idx];
  }
}

// ---------------------------------------------------------------------------
// Sweep 3: column sums over a fixed segment of rows
// ---------------------------------------------------------------------------
// GRAD = false: partial[segment][k] = sum_n pi[n, k] (q_bar).
// GRAD = true:  partial[segment][k][:] = sum_n 2 G_l (w z)_n - 2 e_k * G_l w_n
//                                       + c[n, k] G_zq[n]          (G_E).
template <typename T>
struct ColSweepArgs {
  T* partial = nullptr;
  int64_t rows_per_segment = 0;
};

// Dynamic shared memory: GRAD: gl[row][kTilePad], c[row][kTilePad], g_acc[64][D];
// q_bar: sums[16][64].
template <typename T>
int64_t col_sweep_smem(int64_t d, bool grad) {
  return static_cast<int64_t>(sizeof(T)) * (grad ? 2 * kTile * kTilePad + kTile * d : 16 * kTile);
}

template <typename T, bool FULL, bool GY, bool GRAD>
__global__ void __launch_bounds__(kThreads) col_sweep_kernel(QuantizeView<T> v, ColSweepArgs<T> args) {
  __shared__ TileStage<T, 1 + FULL + GY> stage;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t segment = blockIdx.y;
  const int64_t n = v.dist.n, k_total = v.dist.k, d = v.dist.d;
  const int64_t row_begin = segment * args.rows_per_segment;
  const int64_t row_end = row_begin + args.rows_per_segment < n ? row_begin + args.rows_per_segment : n;
  T* gl_tile = dynamic_smem<T>();              // [row][code], kTilePad per row
  T* c_tile = gl_tile + kTile * kTilePad;      // [row][code]
  T* g_acc = c_tile + kTile * kTilePad;        // [code][D]
  if constexpr (GRAD) {
    for (int64_t idx = threadIdx.x; idx < kTile * d; idx += kThreads) g_acc[idx] = T(0);
  }
  T col_sum[kMicro] = {};

  for (int64_t row0 = row_begin; row0 < row_end; row0 += kTile) {
    T l[kMicro][kMicro], gy[kMicro][kMicro];
    tile_logits<T, FULL, GY>(stage, v, row0, col0, l, gy);
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t r = row0 + ty * kMicro + i;
      const int64_t k0 = col0 + tx * kMicro;
      if constexpr (GRAD) {
        T g[kMicro] = {};
        if (v.training) tile_noise(v, r, k0, g);
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          const bool valid = r < row_end;
          const ElementGrad<T> e = valid ? element_grad(v, r, k0 + j, l[i][j], g[j], gy[i][j])
                                         : ElementGrad<T>{T(0), T(0), T(0)};
          gl_tile[(ty * kMicro + i) * kTilePad + tx * kMicro + j] = e.grad_logit;
          c_tile[(ty * kMicro + i) * kTilePad + tx * kMicro + j] = e.code_weight;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) {
          if (r < row_end) col_sum[j] += exp_shift(l[i][j], v.lse1[r]);
        }
      }
    }
    if constexpr (GRAD) {
      __syncthreads();
      const int64_t rows = row_end - row0 < kTile ? row_end - row0 : kTile;
      // 2 G_l^T (w z) - 2 e_k * (G_l^T w) + c^T G_zq for this tile's rows.
      const T* const a[3] = {gl_tile, gl_tile, c_tile};
      const T* const b[3] = {v.dist.wz.ptr + row0 * d, v.dist.w_full.ptr + row0 * d,
                             v.grad_zq.ptr + row0 * d};
      const T* codebook = v.dist.codebook.ptr;
      accumulate_products<T, 3>(g_acc, a, b, rows, d, nullptr,
                                [=](int kc, int64_t dd, const T* c) {
                                  const int64_t k = col0 + kc;
                                  const T e = k < k_total ? codebook[k * d + dd] : T(0);
                                  return T(2) * c[0] - T(2) * e * c[1] + c[2];
                                });
    }
  }

  if constexpr (GRAD) {
    __syncthreads();
    T* dst = args.partial + segment * k_total * d;
    for (int64_t idx = threadIdx.x; idx < kTile * d; idx += kThreads) {
      if (col0 + idx / d < k_total) dst[col0 * d + idx] = g_acc[idx];
    }
  } else {
    // Sum the 16 row groups in a fixed order.
    T* sums = dynamic_smem<T>();  // [16][64]
#pragma unroll
    for (int j = 0; j < kMicro; ++j) sums[ty * kTile + tx * kMicro + j] = col_sum[j];
    __syncthreads();
    if (threadIdx.x < kTile && col0 + threadIdx.x < k_total) {
      T total = 0;
      for (int t = 0; t < 16; ++t) total += sums[t * kTile + threadIdx.x];
      args.partial[segment * k_total + col0 + threadIdx.x] = total;
    }
  }
}

}  // namespace gmvq::cuda
