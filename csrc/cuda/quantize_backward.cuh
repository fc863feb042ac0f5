// The two codebook sweeps of the quantize backward (see quantize.cu for the
// formulas). Both regenerate the noise; neither stores anything N x K.
//
// backward_rows_kernel: a block owns 32 rows (with their G_zq) and streams the
//   codebook in tiles of 64 codes. Per element, from the saved lse_pi, lse_y:
//     pi = exp(l - lse_pi), y = exp((l + g) / T - lse_y), G_y = G_zq . e_k,
//   and three coefficient tiles (through shared memory) feed products with E
//   and, for an (N, D) weight, E * E:
//     c   = pi G_pi + (1/T) y G_y      (hard; soft: (1/T) y (G_y - beta))
//     pi  (for b_pi)                    y (hard only, for beta)
//   b_pi = sum_k pi G_pi and, in hard mode, beta = G_zq . sum_k y e_k are only
//   known at the end of the row, so by linearity
//     P = G_l E = c E - b_pi (pi E) - (1/T) beta (y E),  Q likewise with E * E
//   (an (N, 1) weight needs Q's row sum only: sum_k coef |e_k|^2, per element).
//   The row sums of G_l vanish analytically (sum_k pi (G_pi - b_pi) = 0 and
//   sum_k y (G_y - beta) = 0), so G_z = G_z(direct) + 2 w P and
//   G_w = 2 z P - Q. It writes b_pi and (hard) beta for the column sweep.
// backward_columns_kernel: a block owns 64 codes and a fixed segment of rows,
//   streamed 32 at a time; per element the full G_l and the code weight c
//   (one-hot of the index, or y in soft mode), then
//     G_E[k] = sum_n G_l (2 w z)_n + c G_zq_n - 2 e_k sum_n G_l w_n
//   as two products (per segment; the host adds the segments with at::sum).
//   dL/dg = (1/T) y (G_y - beta) when the caller passed the noise.
//
// Warps: in the logits, 2 x 4 (16 rows x 16 codes each). In the products:
//   rows:    2 x 4, warp w owns rows 16 (w % 2) .. and every fourth 8-column
//            slice of D from w / 2, for every coefficient and E / E * E;
//   columns: 4 x 2, warp w owns codes 16 (w % 4) .. and every other slice from w / 4.
#pragma once

#include "quantize_common.cuh"

namespace gmvq::cuda::fused {

// Accumulator slices per warp in the column sweep: D <= 2 * 8 * slices (the
// row sweep's, row_slices, are in quantize_args.cuh: they bound D).
template <typename T>
constexpr int column_slices() {
  return sizeof(T) == 4 ? 8 : 4;
}

template <typename T>
struct BackwardRowsSmem {
  int rs, gs, cs;
  int64_t rows, gzq, codes, coef, sums, bytes;
  __host__ __device__ explicit BackwardRowsSmem(int rp, int dp) {
    rs = cs = operand_stride<T>(rp);
    gs = operand_stride<T>(dp);
    rows = 0;
    gzq = rows + int64_t{kBackwardRows} * rs * sizeof(T);
    codes = gzq + int64_t{kBackwardRows} * gs * sizeof(T);
    coef = codes + int64_t{stages<T>()} * kCodeTile * cs * sizeof(T);
    sums = coef + 3 * int64_t{kBackwardRows} * kCoefStride * sizeof(T);
    bytes = sums + 4 * 5 * kBackwardRows * sizeof(T);  // 4 warps x (b_pi, 3 Q sums, beta or G_w)
  }
};

// One block per SM for both backward sweeps (see forward_rows_blocks for the
// budget; numbers in benchmarks/results/ptxas-sm90.txt): the row sweep holds
// three coefficient tiles' products over D in registers, far above the 128 of
// two blocks, and with an (N, D) weight more shared memory than two blocks
// have at D = 64; the column sweep's two accumulators over D also take more
// than 128 registers on the tensor path, so a second block would cost spills.
template <typename T, typename Math, bool FULL>
__global__ void __launch_bounds__(kBlockThreads, 1) backward_rows_kernel(SweepArgs<T> a) {
  constexpr int S = row_slices<T>();
  constexpr int PARTS = FULL ? 2 : 1;  // products with E, and with E * E
  const int warp = threadIdx.x / 32;
  const int g = lane_group(), t = lane_tig();
  const BackwardRowsSmem<T> layout(a.rp, a.dp);
  unsigned char* smem = dynamic_smem<unsigned char>();
  const OperandTile<T> rows_t{reinterpret_cast<T*>(smem + layout.rows), layout.rs};
  const OperandTile<T> gzq_t{reinterpret_cast<T*>(smem + layout.gzq), layout.gs};
  T* codes_s = reinterpret_cast<T*>(smem + layout.codes);
  T* coef_s = reinterpret_cast<T*>(smem + layout.coef);
  T* sums_s = reinterpret_cast<T*>(smem + layout.sums);
  const auto codes_buffer = [&](int buffer) {
    return OperandTile<T>{codes_s + buffer * kCodeTile * layout.cs, layout.cs};
  };
  const auto coef_at = [&](int type, int r, int c) -> T& { return coef_s[coef_offset(type * kBackwardRows + r, c)]; };
  const auto sum_at = [&](int what, int w, int r) -> T& { return sums_s[(what * 4 + w) * kBackwardRows + r]; };

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBackwardRows;
  const int64_t tiles = ceil_div(a.k, kCodeTile);
  const auto pipeline = tile_pipeline<T>(tiles, [&](int64_t tile, int buffer) {
    stage_rows(codes_buffer(buffer), a.codes, tile * kCodeTile, kCodeTile, a.k, a.rp);
  });
  stage_rows(rows_t, a.rows, row0, kBackwardRows, a.n, a.rp);
  stage_rows(gzq_t, a.grad_zq, row0, kBackwardRows, a.n, a.dp);
  pipeline.start();

  const bool hard_training = a.training && a.hard;
  const int types = hard_training ? 3 : 2;  // c, pi (, y)
  const T inv_t = a.inv_temperature.get();
  const NoiseKey key = a.training ? a.noise.get() : NoiseKey{};

  // Logits role: rows 16 lm .. of the block, codes 16 ln .. of the tile.
  const int lm = warp % 2, ln = warp / 2;
  int64_t n_of[2];
  T row_term[2], lse_pi[2], lse_y[2], beta_soft[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    n_of[h] = row0 + 16 * lm + g + 8 * h;
    const bool ok = n_of[h] < a.n;
    row_term[h] = ok ? a.row_term[n_of[h]] : T(0);
    lse_pi[h] = ok ? a.row_lse[2 * n_of[h]] : T(0);
    lse_y[h] = ok ? a.row_lse[2 * n_of[h] + 1] : T(0);
    beta_soft[h] = ok && a.training && !a.hard ? a.beta[n_of[h]] : T(0);
  }
  T b_part[2] = {T(0), T(0)};
  T q_part[3][2] = {{T(0), T(0)}, {T(0), T(0)}, {T(0), T(0)}};  // (N, 1) / no weight: sum coef |e|^2

  // Products role: rows 16 pm .., slices ps, ps + 4, ...
  const int pm = warp % 2, ps = warp / 2;
  T acc[3][PARTS][S][4];
#pragma unroll
  for (int c = 0; c < 3; ++c)
#pragma unroll
    for (int part = 0; part < PARTS; ++part)
#pragma unroll
      for (int s = 0; s < S; ++s)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[c][part][s][i] = T(0);

  for (int64_t tile = 0; tile < tiles; ++tile) {
    const OperandTile<T> codes_cur = codes_buffer(pipeline.buffer(tile));
    pipeline.begin(tile);

    T l[1][2][4], gy[1][2][4];
    tile_logits<Math, 1>(rows_t.rows_from(16 * lm), gzq_t.rows_from(16 * lm), codes_cur.rows_from(16 * ln), a.rp,
                         a.dp, a.training, l, gy);
    const int64_t k0 = tile * kCodeTile + 16 * ln + 4 * t;
    T grad_pi[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) grad_pi[q] = k0 + q < a.k ? a.grad_pi[k0 + q] : T(0);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool row_ok = n_of[h] < a.n;
      T noise[4] = {T(0), T(0), T(0), T(0)};
      if (a.training && row_ok && k0 < a.k) lane_gumbel(a, key, n_of[h], k0, noise);
      const int r = 16 * lm + g + 8 * h;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int code = 16 * ln + 4 * t + q;
        const bool valid = row_ok && k0 + q < a.k;
        const T x = logit(valid, row_term[h], frag(l, 0, h, q));
        const T pi = exp_shift(x, lse_pi[h]);
        T c = pi * grad_pi[q], y = T(0);
        b_part[h] += c;
        if (a.training) {
          y = exp_shift(valid ? (x + noise[q]) * inv_t : neg_inf<T>(), lse_y[h]);
          c += inv_t * y * (frag(gy, 0, h, q) - beta_soft[h]);
        }
        coef_at(0, r, code) = c;
        coef_at(1, r, code) = pi;
        if (hard_training) coef_at(2, r, code) = y;
        if constexpr (!FULL) {
          const T norm = codes_cur(code, a.dp);  // |e_k|^2 (0 past K)
          q_part[0][h] += c * norm;
          q_part[1][h] += pi * norm;
          q_part[2][h] += y * norm;
        }
      }
    }
    __syncthreads();

    // acc[c][part] += coef_c (16 rows x 64 codes) E_part (64 codes x this warp's slices).
    for (int kk = 0; kk < kCodeTile; kk += kMmaK) {
#pragma unroll
      for (int part = 0; part < PARTS; ++part) {
        typename Math::B e_frag[S];
#pragma unroll
        for (int s = 0; s < S; ++s) {
          const int col = 8 * (ps + 4 * s);
          if (col < a.dp) {
            e_frag[s] = Math::load_b(
                [&](int k, int cc) { return codes_cur(kk + k, part * a.dp + col + cc); });
          }
        }
#pragma unroll
        for (int type = 0; type < 3; ++type) {
          if (type >= types) break;  // uniform over the block
          const auto c_frag = Math::load_a([&](int r, int k) { return coef_at(type, 16 * pm + r, kk + k); });
#pragma unroll
          for (int s = 0; s < S; ++s) {
            if (8 * (ps + 4 * s) < a.dp) Math::mma(acc[type][part][s], c_frag, e_frag[s]);
          }
        }
      }
    }
    pipeline.end(tile);
  }

  // Row sums of the logits role, and the hard-mode beta partial of the
  // products role (G_zq . y E over this warp's columns), to shared memory.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = 16 * lm + g + 8 * h;
    const T b = sum_over_lanes(b_part[h], kQuadFirst, kQuadLast);
    if (t == 0) sum_at(0, ln, r) = b;
    if constexpr (!FULL) {
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const T qs = sum_over_lanes(q_part[c][h], kQuadFirst, kQuadLast);
        if (t == 0) sum_at(1 + c, ln, r) = qs;
      }
    }
  }
  if (hard_training) {
    T beta_part[2] = {T(0), T(0)};
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int col = 8 * (ps + 4 * s);
      if (col >= a.dp) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        beta_part[i >> 1] += gzq_t(16 * pm + c_row(i), col + c_col(i)) * acc[2][0][s][i];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const T b = sum_over_lanes(beta_part[h], kQuadFirst, kQuadLast);
      if (t == 0) sum_at(4, ps, 16 * pm + g + 8 * h) = b;
    }
  }
  __syncthreads();

  // Per row of the products role: b_pi, beta, then P, Q and the gradients.
  T b_pi[2], beta[2], q_sum[2];
  int64_t n_p[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = 16 * pm + g + 8 * h;
    n_p[h] = row0 + r;
    b_pi[h] = T(0);
    T qs[3] = {T(0), T(0), T(0)};
    beta[h] = T(0);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      b_pi[h] += sum_at(0, w, r);
      if constexpr (!FULL) {
#pragma unroll
        for (int c = 0; c < 3; ++c) qs[c] += sum_at(1 + c, w, r);
      }
      if (hard_training) beta[h] += sum_at(4, w, r);
    }
    if (a.training && !a.hard) beta[h] = n_p[h] < a.n ? a.beta[n_p[h]] : T(0);
    q_sum[h] = qs[0] - b_pi[h] * qs[1] - (hard_training ? inv_t * beta[h] * qs[2] : T(0));
  }
  const bool scalar_weight = !FULL && a.grad_w != nullptr;
  T gw_part[2] = {T(0), T(0)};
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int col = 8 * (ps + 4 * s);
    if (col >= a.dp) break;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int h = i >> 1, r = 16 * pm + c_row(i);
      const int64_t n = n_p[h], d = col + c_col(i);
      if (n >= a.n || d >= a.d) continue;
      const T y_term = hard_training ? inv_t * beta[h] : T(0);
      const T p_val = acc[0][0][s][i] - b_pi[h] * acc[1][0][s][i] - y_term * acc[2][0][s][i];
      const T w = rows_t(r, a.dp + (FULL ? d : 0));
      a.grad_z[n * a.d + d] += T(2) * w * p_val;
      if (a.grad_w != nullptr) {
        const T z = a.z[n * a.d + d];
        if constexpr (FULL) {
          const T q_val = acc[0][PARTS - 1][s][i] - b_pi[h] * acc[1][PARTS - 1][s][i] -
                          y_term * acc[2][PARTS - 1][s][i];
          a.grad_w[n * a.d + d] = T(2) * z * p_val - q_val;
        } else {
          gw_part[h] += T(2) * z * p_val;
        }
      }
    }
  }
  if (scalar_weight) {
    // G_w[n] = sum_d 2 z P - sum_k G_l |e_k|^2: over the quad, then the four slice warps.
    __syncthreads();  // every thread has read sum_at(4, ...)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const T part = sum_over_lanes(gw_part[h], kQuadFirst, kQuadLast);
      if (t == 0) sum_at(4, ps, 16 * pm + g + 8 * h) = part;
    }
    __syncthreads();
    if (ps == 0 && t == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 16 * pm + g + 8 * h;
        T total = T(0);
#pragma unroll
        for (int w = 0; w < 4; ++w) total += sum_at(4, w, r);
        if (n_p[h] < a.n) a.grad_w[n_p[h]] = total - q_sum[h];
      }
    }
  }
  if (ps == 0 && t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (n_p[h] >= a.n) continue;
      a.b_pi[n_p[h]] = b_pi[h];
      if (hard_training) a.beta[n_p[h]] = beta[h];
    }
  }
}

// ---------------------------------------------------------------------------
// G_E (and dL/dg) over a segment of rows.
// ---------------------------------------------------------------------------
template <typename T>
struct BackwardColumnsSmem {
  int rs, gs, cs;
  int64_t codes, rows, gzq, coef, sums, bytes;
  __host__ __device__ explicit BackwardColumnsSmem(int rp, int dp) {
    rs = cs = operand_stride<T>(rp);
    gs = operand_stride<T>(dp);
    codes = 0;
    rows = codes + int64_t{kCodeTile} * cs * sizeof(T);
    gzq = rows + int64_t{stages<T>()} * kBackwardRows * rs * sizeof(T);
    coef = gzq + int64_t{stages<T>()} * kBackwardRows * gs * sizeof(T);
    sums = coef + 2 * int64_t{kBackwardRows} * kCoefStride * sizeof(T);
    bytes = sums + 2 * kCodeTile * sizeof(T);
  }
};

template <typename T, typename Math, bool FULL>
__global__ void __launch_bounds__(kBlockThreads, 1) backward_columns_kernel(SweepArgs<T> a) {
  constexpr int S = column_slices<T>();
  const int warp = threadIdx.x / 32;
  const int g = lane_group(), t = lane_tig();
  const BackwardColumnsSmem<T> layout(a.rp, a.dp);
  unsigned char* smem = dynamic_smem<unsigned char>();
  const OperandTile<T> codes_t{reinterpret_cast<T*>(smem + layout.codes), layout.cs};
  T* rows_s = reinterpret_cast<T*>(smem + layout.rows);
  T* gzq_s = reinterpret_cast<T*>(smem + layout.gzq);
  T* coef_s = reinterpret_cast<T*>(smem + layout.coef);
  T* sums_s = reinterpret_cast<T*>(smem + layout.sums);
  const auto rows_buffer = [&](int buffer) {
    return OperandTile<T>{rows_s + buffer * kBackwardRows * layout.rs, layout.rs};
  };
  const auto gzq_buffer = [&](int buffer) {
    return OperandTile<T>{gzq_s + buffer * kBackwardRows * layout.gs, layout.gs};
  };
  const auto coef_at = [&](int type, int r, int c) -> T& { return coef_s[coef_offset(type * kBackwardRows + r, c)]; };

  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kCodeTile;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * a.rows_per_segment;
  const int64_t row_end = row_begin + a.rows_per_segment < a.n ? row_begin + a.rows_per_segment : a.n;
  const int64_t tiles = ceil_div(row_end - row_begin, kBackwardRows);
  const auto pipeline = tile_pipeline<T>(tiles, [&](int64_t tile, int buffer) {
    const int64_t first = row_begin + tile * kBackwardRows;
    stage_rows(rows_buffer(buffer), a.rows, first, kBackwardRows, row_end, a.rp);
    stage_rows(gzq_buffer(buffer), a.grad_zq, first, kBackwardRows, row_end, a.dp);
  });
  stage_rows(codes_t, a.codes, col0, kCodeTile, a.k, a.rp);
  pipeline.start();

  const bool soft_training = a.training && !a.hard;
  const T inv_t = a.inv_temperature.get();
  const NoiseKey key = a.training ? a.noise.get() : NoiseKey{};
  // Logits role: rows 16 lm .. of the row tile, codes 16 ln .. of the block.
  const int lm = warp % 2, ln = warp / 2;
  const int64_t k0 = col0 + 16 * ln + 4 * t;
  T grad_pi[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) grad_pi[q] = k0 + q < a.k ? a.grad_pi[k0 + q] : T(0);
  T w_sum[4] = {T(0), T(0), T(0), T(0)};  // (N, 1) / no weight: sum_n G_l w_n per code

  // Products role: codes 16 pm .., slices ps, ps + 2, ...
  const int pm = warp % 4, ps = warp / 4;
  T acc_e[S][4], acc_w[S][4];
#pragma unroll
  for (int s = 0; s < S; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      acc_e[s][i] = T(0);
      acc_w[s][i] = T(0);
    }

  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t r0 = row_begin + tile * kBackwardRows;
    const OperandTile<T> rows_cur = rows_buffer(pipeline.buffer(tile));
    const OperandTile<T> gzq_cur = gzq_buffer(pipeline.buffer(tile));
    pipeline.begin(tile);

    T l[1][2][4], gy[1][2][4];
    tile_logits<Math, 1>(rows_cur.rows_from(16 * lm), gzq_cur.rows_from(16 * lm), codes_t.rows_from(16 * ln), a.rp,
                         a.dp, a.training, l, gy);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * lm + g + 8 * h;
      const int64_t n = r0 + r;
      const bool row_ok = n < row_end;
      const T row_term = row_ok ? a.row_term[n] : T(0);
      const T lse_pi = row_ok ? a.row_lse[2 * n] : T(0);
      const T lse_y = row_ok ? a.row_lse[2 * n + 1] : T(0);
      const T b_pi = row_ok ? a.b_pi[n] : T(0);
      const T beta = row_ok && a.training ? a.beta[n] : T(0);
      const int64_t index = row_ok ? a.index[n] : -1;
      const T w_row = rows_cur(r, a.dp);  // (N, 1) weight or 1 (unused for (N, D))
      T noise[4] = {T(0), T(0), T(0), T(0)};
      if (a.training && row_ok && k0 < a.k) lane_gumbel(a, key, n, k0, noise);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = k0 + q;
        const bool valid = row_ok && k < a.k;
        const T x = logit(valid, row_term, frag(l, 0, h, q));
        T grad = exp_shift(x, lse_pi) * (grad_pi[q] - b_pi);
        T weight = T(k == index ? 1 : 0);
        if (a.training) {
          const T y = exp_shift(valid ? (x + noise[q]) * inv_t : neg_inf<T>(), lse_y);
          const T grad_noise = inv_t * y * (frag(gy, 0, h, q) - beta);
          grad += grad_noise;
          if (soft_training) weight = y;
          if (valid && a.grad_gumbel != nullptr) a.grad_gumbel[n * a.k + k] = grad_noise;
        }
        if (!valid) weight = T(0);
        coef_at(0, r, 16 * ln + 4 * t + q) = grad;
        coef_at(1, r, 16 * ln + 4 * t + q) = weight;
        if constexpr (!FULL) w_sum[q] += grad * w_row;
      }
    }
    __syncthreads();

    // acc_e[code] += (-G_l)^T (-2 w z) + c^T G_zq; acc_w[code] += G_l^T w (N, D weight).
    for (int kk = 0; kk < kBackwardRows; kk += kMmaK) {
      const auto neg_grad = Math::load_a([&](int r, int k) { return -coef_at(0, kk + k, 16 * pm + r); });
      const auto weight = Math::load_a([&](int r, int k) { return coef_at(1, kk + k, 16 * pm + r); });
      typename Math::A grad{};
      if constexpr (FULL) grad = Math::load_a([&](int r, int k) { return coef_at(0, kk + k, 16 * pm + r); });
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int col = 8 * (ps + 2 * s);
        if (col >= a.dp) break;  // uniform over the warp
        const auto wz = Math::load_b([&](int k, int c) { return rows_cur(kk + k, col + c); });
        const auto gzq = Math::load_b([&](int k, int c) { return gzq_cur(kk + k, col + c); });
        Math::mma(acc_e[s], neg_grad, wz);
        Math::mma(acc_e[s], weight, gzq);
        if constexpr (FULL) {
          const auto w = Math::load_b([&](int k, int c) { return rows_cur(kk + k, a.dp + col + c); });
          Math::mma(acc_w[s], grad, w);
        }
      }
    }
    pipeline.end(tile);
  }
  cp_async_wait<0>();  // a segment without rows issued its first loads too

  if constexpr (!FULL) {
    // sum_n G_l w_n per code: over the eight groups, then the two row warps in order.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const T total = sum_over_lanes(w_sum[q], kGroupFirst, kGroupLast);
      if (g == 0) sums_s[lm * kCodeTile + 16 * ln + 4 * t + q] = total;
    }
    __syncthreads();
  }
  T* dst = a.partial + static_cast<int64_t>(blockIdx.y) * a.k * a.d;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int col = 8 * (ps + 2 * s);
    if (col >= a.dp) break;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int code = 16 * pm + c_row(i);
      const int64_t k = col0 + code, d = col + c_col(i);
      if (k >= a.k || d >= a.d) continue;
      const T e = codes_t(code, d);
      const T w_total = FULL ? acc_w[s][i] : sums_s[code] + sums_s[kCodeTile + code];
      dst[k * a.d + d] = acc_e[s][i] - T(2) * e * w_total;
    }
  }
}

}  // namespace gmvq::cuda::fused
