// What the four codebook sweeps of the fused quantize share (quantize.cu has
// the overview, quantize_args.cuh the arguments): the operand layout,
// shared-memory staging and its pipeline, the launch helpers, the logits of
// one tile in the mma register layout, the Gumbel noise of a lane's four
// codes and the online row statistics.
//
// Operand layout, prepared once per call on the host (O(N D + K D)):
//   dp = D rounded up to 8, rp = 2 dp (weight (N, D)) or dp + 8 (otherwise);
//   rows  (N, rp) = [-2 w z | 0 | w          | 0]   (part 1 starts at column dp)
//   codes (K, rp) = [ E     | 0 | E * E      | 0]   (weight (N, D))
//                   [ E     | 0 | |e_k|^2    | 0]   (weight (N, 1): w_n in part 1 of rows; none: 1)
// so that rows[n] . codes[k] = -2 (w z)_n . e_k + the code term, and
//   l[n, k] = -max(row_term[n] + rows[n] . codes[k], 0),  row_term[n] = sum_d w z^2.
// Part 0 of codes is E itself, the B operand of every product with E; part 0
// of rows is -2 w z and part 1 is w, the row operands of the codebook
// gradient. Zero padding makes every product over whole 8-wide steps exact.
//
// Tiles: a sweep takes 64 codes at a time. In the logits of a tile each warp
// owns 16 rows (the mma M) and 16 P codes; within a group of 16 codes the
// columns of the two n8 products are permuted so that lane tig holds codes
// 4 tig .. 4 tig + 3 for both its rows (group, group + 8): four consecutive
// codes, one Philox block (philox.h words4), and no runtime-indexed arrays.
#pragma once

#include <type_traits>

#include "async_copy.cuh"
#include "gmvq/philox.h"
#include "quantize_args.cuh"
#include "tile_math.cuh"

namespace gmvq::cuda::fused {

// Shared memory has 32 banks of 4 bytes: a warp's access takes one pass when
// its 32 lanes (lane = 4 g + t, g = lane_group, t = lane_tig) hit 32 banks.
//
// Operand tiles (rows, codes, G_zq: OperandTile) are row-major in 16-byte
// chunks (4 floats or 2 doubles, one cp.async each), XOR-swizzled per row:
//   element (r, c) at r stride + ((c / per) ^ swizzle(r)) per + c % per,
//   per = 16 / sizeof(T),  swizzle(r) = (r ^ (r >> 2)) & 3,
// the row padded to whole 64-byte groups of 4 chunks (the XOR stays in its
// group) and the stride 64 bytes past a multiple of 128 (operand_stride). The
// sweeps read these tiles three ways (k0, c0, r0 multiples of 8; sub-tiles
// start at multiples of 16 rows, where the swizzle repeats):
//   A fragments    rows r0 + g, columns k0 + t            (tile_logits: rows, G_zq)
//   B fragments    rows c0 + pair_code(j, g), that is c0 + {0, 1, 4, 5, 8, 9,
//                  12, 13} + 2 j, columns k0 + t           (tile_logits: codes)
//   transposed B   rows k0 + t, columns c0 + g            (the products with E,
//                  E * E, w z, w and G_zq)
// In float a row starts 16 banks after the one before, so chunk q of row r
// lands on the bank group (4 banks) (q ^ m(r)) mod 8, m(r) = 4 (r & 1) +
// swizzle(r): the 8 rows of an A fragment and the 8 of a B fragment have 8
// different masks, and the 4 rows of a transposed fragment put their 2 chunks
// each on 8 different groups. No access of the three is conflicted (padding
// alone, the former stride width + 4, left the B and transposed loads 2-way).
// Doubles (the SIMT path only) read them conflict-free too.
template <typename T>
__host__ __device__ constexpr int operand_stride(int width) {
  constexpr int group = 64 / static_cast<int>(sizeof(T));  // elements of 4 chunks
  const int padded = (width + group - 1) / group * group;
  return padded * static_cast<int>(sizeof(T)) % 128 == 64 ? padded : padded + group;
}

template <typename T>
struct OperandTile {
  static constexpr int kChunkShift = sizeof(T) == 4 ? 2 : 1;  // log2 of the elements per chunk
  T* data;
  int stride;  // operand_stride(width)

  // XOR-ing the chunk index c / per is XOR-ing c with swizzle(r) per.
  __device__ __forceinline__ T& operator()(int r, int c) const {
    return data[r * stride + (c ^ (((r ^ (r >> 2)) & 3) << kChunkShift))];
  }
  // The tile from row r0 on (r0 a multiple of 16).
  __device__ __forceinline__ OperandTile rows_from(int r0) const { return {data + r0 * stride, stride}; }
};

// Coefficient tiles (kCodeTile columns, one row per tile row): element (r, c)
// at r 64 + (c ^ x(r)), x(r) = 5 (r & 3) + 16 ((r ^ (r >> 2)) & 1). They are
// written one element per lane at (row g, column c0 + 4 t + q), read as A
// fragments (row g, column k0 + t) and, in the column sweep, transposed (row
// k0 + t, column c0 + g). x takes 8 different values on the 8 rows g in bits
// {0, 1, 4} (the stores) and in bits {2, 3, 4} (the A loads), and 4 on the 4
// rows k0 + t in bits {3, 4} (the transposed loads): none is conflicted. (A
// padded stride of 68 left the stores 4-way conflicted, the transposed loads 2-way.)
constexpr int kCoefStride = kCodeTile;

__device__ __forceinline__ int coef_offset(int r, int c) {
  return r * kCoefStride + (c ^ (5 * (r & 3) + 16 * ((r ^ (r >> 2)) & 1)));
}

// Operand tiles stream through shared memory double buffered (float) or
// single buffered (double: shared memory is twice as full).
template <typename T>
constexpr int stages() {
  return sizeof(T) == 4 ? 2 : 1;
}

// The cp.async pipeline of a sweep's streamed operand tiles, the same in all
// four sweeps. stage(tile, buffer) issues one tile's copies into one buffer
// (every thread of the block calls it). The sweep issues its resident operands,
// then start() adds tile 0 to the same commit group; per tile:
//   begin(tile)  two stages: issue tile + 1 into the other buffer, wait for
//                this tile's group, leaving the new one in flight; one stage:
//                wait for all; then a barrier (every thread's copies landed);
//   ...compute on buffer(tile)...
//   end(tile)    a barrier (the buffer is free); one stage: issue tile + 1.
template <typename T, typename Stage>
struct TilePipeline {
  static constexpr int kStages = stages<T>();
  int64_t tiles;
  Stage stage;

  __device__ __forceinline__ int buffer(int64_t tile) const { return static_cast<int>(tile % kStages); }
  __device__ __forceinline__ void start() const {
    stage(int64_t{0}, 0);
    cp_async_commit();
  }
  __device__ __forceinline__ void begin(int64_t tile) const {
    if constexpr (kStages == 2) {
      if (tile + 1 < tiles) {
        stage(tile + 1, buffer(tile + 1));
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
  }
  __device__ __forceinline__ void end(int64_t tile) const {
    __syncthreads();
    if constexpr (kStages == 1) {
      if (tile + 1 < tiles) {
        stage(tile + 1, 0);
        cp_async_commit();
      }
    }
  }
};

template <typename T, typename Stage>
__device__ __forceinline__ TilePipeline<T, Stage> tile_pipeline(int64_t tiles, Stage stage) {
  return {tiles, stage};
}

// kernel<<<grid, threads, smem>>>(args) on the current stream, after opting
// the kernel into its dynamic shared memory (a clear error where the device
// has too little).
template <typename Kernel, typename Args>
void launch(Kernel kernel, dim3 grid, int threads, int64_t smem, const Args& args, const char* what) {
  allow_dynamic_smem(kernel, smem, "quantize", what);
  GMVQ_LAUNCH(kernel, grid, threads, smem, c10::cuda::getCurrentCUDAStream(), args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// f(std::true_type{}) or f(std::false_type{}): a run-time flag as a template argument.
template <typename F>
void dispatch_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// f(Math{}) for the tile path: TensorMath (float only) or SimtMath<T>.
template <typename T, typename F>
void dispatch_tiles(Tiles tiles, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (tiles == Tiles::kTensor) {
      f(TensorMath{});
      return;
    }
  }
  f(SimtMath<T>{});
}

// Value q (0..3) of group p, row half h (row group + 8 h) in a [P][2][4]
// set of C fragments: code 16 p + 4 tig + q of the warp's codes.
template <typename T, int P>
__device__ __forceinline__ T& frag(T (&c)[P][2][4], int p, int h, int q) {
  return c[p][q >> 1][2 * h + (q & 1)];
}

// Code (0..15) of column `col` of n8 product j within a group of 16 codes.
__device__ __forceinline__ int pair_code(int j, int col) { return 4 * (col >> 1) + 2 * j + (col & 1); }

// The products of this warp's 16 rows with its 16 P codes:
//   l[p][j]  = rows . codes         over all rp columns,
//   gy[p][j] = grad_zq . E          over the first dp columns (when with_gy),
// rows_w / gzq_w: the tiles from the warp's first row; codes_w: from its first
// code. Call with the whole warp.
template <typename Math, int P, typename T>
__device__ __forceinline__ void tile_logits(const OperandTile<T>& rows_w, const OperandTile<T>& gzq_w,
                                            const OperandTile<T>& codes_w, int rp, int dp, bool with_gy,
                                            T (&l)[P][2][4], T (&gy)[P][2][4]) {
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        l[p][j][i] = T(0);
        gy[p][j][i] = T(0);
      }
  for (int ks = 0; ks < rp; ks += kMmaK) {
    const auto a = Math::load_a([&](int r, int kk) { return rows_w(r, ks + kk); });
    const bool gy_step = with_gy && ks < dp;  // uniform over the warp
    typename Math::A ag{};
    if (gy_step) ag = Math::load_a([&](int r, int kk) { return gzq_w(r, ks + kk); });
#pragma unroll
    for (int p = 0; p < P; ++p) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const auto b = Math::load_b([&](int kk, int col) { return codes_w(16 * p + pair_code(j, col), ks + kk); });
        Math::mma(l[p][j], a, b);
        if (gy_step) Math::mma(gy[p][j], ag, b);
      }
    }
  }
}

// The logit of one element from its product (-inf outside the matrix); a NaN
// distance stays NaN.
template <typename T>
__device__ __forceinline__ T logit(bool valid, T row_term, T product) {
  const T distance = row_term + product;
  return valid ? -(distance < T(0) ? T(0) : distance) : neg_inf<T>();
}

// Gumbel noise of row n, codes k0 .. k0 + 3 (k0 < K): given, or Philox stream
// 0 elements n K + k0 .. + 3 (one Philox block when n K + k0 is a multiple of 4).
template <typename T>
__device__ __forceinline__ void lane_gumbel(const SweepArgs<T>& a, const NoiseKey& key, int64_t n, int64_t k0,
                                            T (&g)[4]) {
  if (a.gumbel != nullptr) {
#pragma unroll
    for (int q = 0; q < 4; ++q) g[q] = k0 + q < a.k ? a.gumbel[n * a.k + k0 + q] : T(0);
    return;
  }
  const rng::Philox4 w =
      rng::words4(key.seed, key.offset, rng::kGumbelStream, static_cast<uint64_t>(n * a.k + k0));
#pragma unroll
  for (int q = 0; q < 4; ++q) g[q] = static_cast<T>(rng::gumbel_from_bits(w.word[q]));
}

// Online log-sum-exp of one row: max m and sum s of exp(x - m).
template <typename T>
struct RunningLse {
  T m = neg_inf<T>();
  T s = T(0);

  // Move to a new maximum (>= m): s is rescaled, and returns the factor.
  __device__ __forceinline__ T rescale(T new_m) {
    const T factor = exp_shift(m, new_m);
    s = s * factor;
    m = new_m;
    return factor;
  }
  __device__ __forceinline__ void merge(T om, T os) {
    const T nm = m > om ? m : om;
    if (nm == neg_inf<T>()) return;
    s = s * exp_shift(m, nm) + os * exp_shift(om, nm);
    m = nm;
  }
  // Merge over the lanes whose index differs in bits first_mask .. last_mask
  // (a butterfly). Each lane's result is the same run after run, but the
  // partners of a step need not agree in the last bit: under FMA contraction
  // merge's sum of two products rounds one product and fuses the other, and
  // each partner rounds the other one. Callers use one lane's result (t == 0).
  __device__ __forceinline__ void merge_lanes(int first_mask, int last_mask) {
    for (int mask = first_mask; mask <= last_mask; mask <<= 1) {
      const T om = __shfl_xor_sync(0xffffffffu, m, mask);
      const T os = __shfl_xor_sync(0xffffffffu, s, mask);
      merge(om, os);
    }
  }
  __device__ __forceinline__ T lse() const { return m + log_acc(s); }
};

// Sum over the lanes that differ in bits first_mask .. last_mask (butterfly).
template <typename T>
__device__ __forceinline__ T sum_over_lanes(T x, int first_mask, int last_mask) {
  for (int mask = first_mask; mask <= last_mask; mask <<= 1) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

template <typename T>
__device__ __forceinline__ T max_over_lanes(T x, int first_mask, int last_mask) {
  for (int mask = first_mask; mask <= last_mask; mask <<= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, x, mask);
    x = o > x ? o : x;
  }
  return x;
}

// Within a quad (the four lanes that share a row of the C layout): masks 1, 2.
constexpr int kQuadFirst = 1, kQuadLast = 2;
// Across the eight groups (lanes that share a column): masks 4, 8, 16.
constexpr int kGroupFirst = 4, kGroupLast = 16;

}  // namespace gmvq::cuda::fused
