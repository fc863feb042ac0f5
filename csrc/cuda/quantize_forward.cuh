// The two codebook sweeps of the quantize forward (see quantize.cu).
//
// forward_rows_kernel: a block owns 64 rows and streams the codebook in tiles
//   of 64 codes (cp.async, double buffered for float). Per row: the online
//   log-sum-exp of l (lse_pi), of (l + g) / T (lse_y, training), the argmax of
//   l + g (training) or l (eval), and in soft training z_soft = sum_k y e_k,
//   a second product per tile (the tile's y, through shared memory, times E),
//   rescaled flash-style when the running maximum moves. Noise: generated once.
// forward_columns_kernel: a block owns 64 codes and a fixed segment of rows;
//   q_bar partials sum_n exp(l - lse_pi) per code. No noise.
//
// Warps: 4 x 2. In the logits of a tile warp w owns rows 16 (w % 4) .. + 15
// and codes 32 (w / 4) .. + 31; in the z_soft product the same rows and every
// other 8-column slice of D, starting at slice w / 4.
#pragma once

#include "quantize_common.cuh"

namespace gmvq::cuda::fused {

// z_soft accumulator slices of 8 columns per warp: D <= 2 * 8 * 8 = 128.
constexpr int kForwardSlices = 8;

template <typename T>
struct ForwardRowsSmem {
  int rs, cs;
  int64_t rows, codes, coef, tile_max, stats, index, bytes;
  __host__ __device__ ForwardRowsSmem(int rp, bool soft) {
    rs = cs = operand_stride<T>(rp);
    rows = 0;
    codes = rows + int64_t{kForwardRows} * rs * sizeof(T);
    coef = codes + int64_t{stages<T>()} * kCodeTile * cs * sizeof(T);
    tile_max = coef + (soft ? int64_t{kForwardRows} * kCoefStride * sizeof(T) : 0);
    stats = tile_max + (soft ? 2 * kForwardRows * sizeof(T) : 0);
    index = stats + 5 * kForwardRows * sizeof(T);  // m, s of pi and y, the argmax value
    bytes = index + kForwardRows * sizeof(int64_t);
  }
};

// Blocks per SM the sweeps are built for (the second __launch_bounds__
// argument), read off the ptxas report (benchmarks/results/ptxas-sm90.txt) and
// the *Smem sizes, against sm_90's 64K registers and 228 KB of shared memory
// per SM. Two blocks need at most 128 registers a thread and at most about
// 113 KB each. The float row sweep without the soft sample stays within 128
// registers on both tile paths, and its shared memory within 113 KB up to D =
// 64 with an (N, D) weight (D = 128 with a per-row weight): two blocks, so that
// one block's barriers, Philox draws and exponentials overlap the other's
// products; the bound keeps ptxas at 128. The soft sample (its coefficient
// tile and z_soft accumulators) and float64 take more registers than that:
// one block, where a cap would spill. The q_bar sweep needs fewer registers
// than the row sweep and as much shared memory as its hard mode: two in float.
template <typename T, bool SOFT>
constexpr int forward_rows_blocks() {
  return sizeof(T) == 4 && !SOFT ? 2 : 1;
}
template <typename T>
constexpr int forward_columns_blocks() {
  return sizeof(T) == 4 ? 2 : 1;
}

template <typename T, typename Math, bool SOFT>
__global__ void __launch_bounds__(kBlockThreads, forward_rows_blocks<T, SOFT>()) forward_rows_kernel(SweepArgs<T> a) {
  constexpr int P = 2;
  const int warp = threadIdx.x / 32, wm = warp % 4, wn = warp / 4;
  const int g = lane_group(), t = lane_tig();
  const ForwardRowsSmem<T> layout(a.rp, SOFT);
  unsigned char* smem = dynamic_smem<unsigned char>();
  const OperandTile<T> rows_t{reinterpret_cast<T*>(smem + layout.rows), layout.rs};
  T* codes_s = reinterpret_cast<T*>(smem + layout.codes);
  T* coef_s = reinterpret_cast<T*>(smem + layout.coef);
  T* tile_max_s = reinterpret_cast<T*>(smem + layout.tile_max);
  T* stats_s = reinterpret_cast<T*>(smem + layout.stats);
  int64_t* index_s = reinterpret_cast<int64_t*>(smem + layout.index);
  const auto codes_buffer = [&](int buffer) {
    return OperandTile<T>{codes_s + buffer * kCodeTile * layout.cs, layout.cs};
  };

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kForwardRows;
  const int64_t tiles = ceil_div(a.k, kCodeTile);
  const auto pipeline = tile_pipeline<T>(tiles, [&](int64_t tile, int buffer) {
    stage_rows(codes_buffer(buffer), a.codes, tile * kCodeTile, kCodeTile, a.k, a.rp);
  });
  stage_rows(rows_t, a.rows, row0, kForwardRows, a.n, a.rp);
  pipeline.start();

  const T inv_t = a.inv_temperature.get();
  const NoiseKey key = a.training ? a.noise.get() : NoiseKey{};
  int64_t n_of[2];
  T row_term[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    n_of[h] = row0 + 16 * wm + g + 8 * h;
    row_term[h] = n_of[h] < a.n ? a.row_term[n_of[h]] : T(0);
  }
  RunningLse<T> pi_lse[2], y_lse[2];
  ArgMax<T> best[2];
  T acc[kForwardSlices][4];
#pragma unroll
  for (int s = 0; s < kForwardSlices; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[s][i] = T(0);

  for (int64_t tile = 0; tile < tiles; ++tile) {
    const OperandTile<T> codes_cur = codes_buffer(pipeline.buffer(tile));
    pipeline.begin(tile);

    // Logits of the warp's 16 rows x 32 codes.
    T l[P][2][4], unused[P][2][4];
    tile_logits<Math, P>(rows_t.rows_from(16 * wm), rows_t, codes_cur.rows_from(32 * wn), a.rp, a.dp, false, l,
                         unused);
    const int64_t col0 = tile * kCodeTile;
    T y_arg[P][2][4];
    T tile_max[2] = {neg_inf<T>(), neg_inf<T>()};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool row_ok = n_of[h] < a.n;
      T pi_max = neg_inf<T>();
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int64_t k0 = col0 + 32 * wn + 16 * p + 4 * t;
        T noise[4] = {T(0), T(0), T(0), T(0)};
        if (a.training && row_ok && k0 < a.k) lane_gumbel(a, key, n_of[h], k0, noise);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const bool valid = row_ok && k0 + q < a.k;
          T& x = frag(l, p, h, q);
          x = logit(valid, row_term[h], x);
          pi_max = x > pi_max ? x : pi_max;
          const T v = x + noise[q];  // -inf stays -inf
          if (valid) best[h].add(a.training ? v : x, k0 + q);
          T& y = frag(y_arg, p, h, q);
          y = valid && a.training ? v * inv_t : neg_inf<T>();
          tile_max[h] = y > tile_max[h] ? y : tile_max[h];
        }
      }
      pi_lse[h].rescale(pi_max > pi_lse[h].m ? pi_max : pi_lse[h].m);
#pragma unroll
      for (int p = 0; p < P; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) pi_lse[h].s += exp_shift(frag(l, p, h, q), pi_lse[h].m);
    }

    if (a.training) {
      // The y statistics share one maximum per row across the block in soft
      // mode (the z_soft accumulator is scaled by it); else per lane.
      T scale[2];
      if constexpr (SOFT) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          tile_max[h] = max_over_lanes(tile_max[h], kQuadFirst, kQuadLast);
          if (t == 0) tile_max_s[wn * kForwardRows + 16 * wm + g + 8 * h] = tile_max[h];
        }
        __syncthreads();
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = 16 * wm + g + 8 * h;
          const T other = tile_max_s[(1 - wn) * kForwardRows + r];
          tile_max[h] = tile_max[h] > other ? tile_max[h] : other;
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        scale[h] = y_lse[h].rescale(tile_max[h] > y_lse[h].m ? tile_max[h] : y_lse[h].m);
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const T e = exp_shift(frag(y_arg, p, h, q), y_lse[h].m);
            y_lse[h].s += e;
            if constexpr (SOFT) coef_s[coef_offset(16 * wm + g + 8 * h, 32 * wn + 16 * p + 4 * t + q)] = e;
          }
      }
      if constexpr (SOFT) {
        __syncthreads();
        // z_soft[rows] = z_soft * scale + y_tile E_tile, the warp's rows, slices wn, wn + 2, ...
#pragma unroll
        for (int s = 0; s < kForwardSlices; ++s)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[s][i] *= scale[i >> 1];
        for (int kk = 0; kk < kCodeTile; kk += kMmaK) {
          const auto y_frag =
              Math::load_a([&](int r, int k) { return coef_s[coef_offset(16 * wm + r, kk + k)]; });
#pragma unroll
          for (int s = 0; s < kForwardSlices; ++s) {
            const int col = 8 * (wn + 2 * s);
            if (col >= a.dp) break;  // uniform over the warp
            const auto e_frag = Math::load_b([&](int k, int c) { return codes_cur(kk + k, col + c); });
            Math::mma(acc[s], y_frag, e_frag);
          }
        }
      }
    }
    pipeline.end(tile);
  }

  // Merge the statistics: the quad's lanes, then the two code halves (warp
  // wn = 1 hands its rows to warp wn = 0).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    pi_lse[h].merge_lanes(kQuadFirst, kQuadLast);
    y_lse[h].merge_lanes(kQuadFirst, kQuadLast);
    best[h].merge_lanes(4);
    const int r = 16 * wm + g + 8 * h;
    if (wn == 1 && t == 0) {
      stats_s[0 * kForwardRows + r] = pi_lse[h].m;
      stats_s[1 * kForwardRows + r] = pi_lse[h].s;
      stats_s[2 * kForwardRows + r] = y_lse[h].m;
      stats_s[3 * kForwardRows + r] = y_lse[h].s;
      stats_s[4 * kForwardRows + r] = best[h].value;
      index_s[r] = best[h].index;
    }
  }
  __syncthreads();
  if (wn == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * wm + g + 8 * h;
      pi_lse[h].merge(stats_s[0 * kForwardRows + r], stats_s[1 * kForwardRows + r]);
      y_lse[h].merge(stats_s[2 * kForwardRows + r], stats_s[3 * kForwardRows + r]);
      best[h].add(stats_s[4 * kForwardRows + r], index_s[r]);
      const int64_t n = n_of[h];
      if (t == 0 && n < a.n) {
        const T lse_pi = pi_lse[h].lse();
        a.row_lse[2 * n] = lse_pi;
        // Eval has no y: its column repeats lse_pi (documented in quantize.cu).
        a.row_lse[2 * n + 1] = a.training ? y_lse[h].lse() : lse_pi;
        a.index[n] = best[h].index == INT64_MAX ? 0 : best[h].index;
      }
      if constexpr (SOFT) {
        if (t == 0) tile_max_s[r] = y_lse[h].s;  // the row's total (one maximum for the whole row)
      }
    }
  }
  if constexpr (SOFT) {
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kForwardSlices; ++s) {
      const int col = 8 * (wn + 2 * s);
      if (col >= a.dp) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = 16 * wm + c_row(i);
        const int64_t n = row0 + r, d = col + c_col(i);
        if (n < a.n && d < a.d) a.z_soft[n * a.d + d] = acc[s][i] / tile_max_s[r];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// q_bar: column sums of pi over a segment of rows.
// ---------------------------------------------------------------------------

template <typename T>
struct ForwardColumnsSmem {
  int rs, cs;
  int64_t codes, rows, sums, bytes;
  __host__ __device__ explicit ForwardColumnsSmem(int rp) {
    rs = cs = operand_stride<T>(rp);
    codes = 0;
    rows = codes + int64_t{kCodeTile} * cs * sizeof(T);
    sums = rows + int64_t{stages<T>()} * kColumnRows * rs * sizeof(T);
    bytes = sums + 4 * kCodeTile * sizeof(T);
  }
};

template <typename T, typename Math>
__global__ void __launch_bounds__(kBlockThreads, forward_columns_blocks<T>()) forward_columns_kernel(SweepArgs<T> a) {
  constexpr int P = 2;
  const int warp = threadIdx.x / 32, wm = warp % 4, wn = warp / 4;
  const int g = lane_group(), t = lane_tig();
  const ForwardColumnsSmem<T> layout(a.rp);
  unsigned char* smem = dynamic_smem<unsigned char>();
  const OperandTile<T> codes_t{reinterpret_cast<T*>(smem + layout.codes), layout.cs};
  T* rows_s = reinterpret_cast<T*>(smem + layout.rows);
  T* sums_s = reinterpret_cast<T*>(smem + layout.sums);
  const auto rows_buffer = [&](int buffer) {
    return OperandTile<T>{rows_s + buffer * kColumnRows * layout.rs, layout.rs};
  };

  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kCodeTile;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * a.rows_per_segment;
  const int64_t row_end = row_begin + a.rows_per_segment < a.n ? row_begin + a.rows_per_segment : a.n;
  const int64_t tiles = ceil_div(row_end - row_begin, kColumnRows);
  const auto pipeline = tile_pipeline<T>(tiles, [&](int64_t tile, int buffer) {
    stage_rows(rows_buffer(buffer), a.rows, row_begin + tile * kColumnRows, kColumnRows, row_end, a.rp);
  });
  stage_rows(codes_t, a.codes, col0, kCodeTile, a.k, a.rp);
  pipeline.start();

  T sums[P][4];
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) sums[p][q] = T(0);

  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t r0 = row_begin + tile * kColumnRows;
    const OperandTile<T> rows_cur = rows_buffer(pipeline.buffer(tile));
    pipeline.begin(tile);
    T l[P][2][4], unused[P][2][4];
    tile_logits<Math, P>(rows_cur.rows_from(16 * wm), rows_cur, codes_t.rows_from(32 * wn), a.rp, a.dp, false, l,
                         unused);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = r0 + 16 * wm + g + 8 * h;
      const bool row_ok = n < row_end;
      const T row_term = row_ok ? a.row_term[n] : T(0);
      const T lse_pi = row_ok ? a.row_lse[2 * n] : T(0);
#pragma unroll
      for (int p = 0; p < P; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t k = col0 + 32 * wn + 16 * p + 4 * t + q;
          sums[p][q] += exp_shift(logit(row_ok && k < a.k, row_term, frag(l, p, h, q)), lse_pi);
        }
    }
    pipeline.end(tile);
  }
  cp_async_wait<0>();  // a segment without rows issued its first loads too

  // Sum over the eight groups of the warp, then over the four row warps in order.
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const T total = sum_over_lanes(sums[p][q], kGroupFirst, kGroupLast);
      if (g == 0) sums_s[wm * kCodeTile + 32 * wn + 16 * p + 4 * t + q] = total;
    }
  __syncthreads();
  if (threadIdx.x < kCodeTile && col0 + threadIdx.x < a.k) {
    T total = T(0);
#pragma unroll
    for (int w = 0; w < 4; ++w) total += sums_s[w * kCodeTile + threadIdx.x];
    a.partial[blockIdx.y * a.k + col0 + threadIdx.x] = total;
  }
}

}  // namespace gmvq::cuda::fused
