// Row-wise softmax over an (N, K) matrix, one warp per row, three sweeps
// (values and max, sum of exponentials, normalise), used by the unfused ops:
//   x = sign * input[n, k] (+ Gumbel noise, given or regenerated from Philox)
//   v = x * inv_scale,   out = softmax_k(v),   lse[n] = logsumexp_k(v),
//   index[n] = argmax_k x (ties to the lowest k).
// The sweeps read and write `out` only, so out may alias input.
#pragma once

#include "gmvq/cuda/common.cuh"
#include "gmvq/cuda/scalar_args.cuh"
#include "gmvq/philox.h"

namespace gmvq::cuda {

template <typename T>
struct RowSoftmaxArgs {
  const T* input = nullptr;
  T* out = nullptr;
  T* lse = nullptr;           // optional (N,)
  int64_t* index = nullptr;   // optional (N,)
  const T* noise = nullptr;   // optional given noise (N, K)
  bool philox = false;        // regenerate Gumbel noise from the noise key
  NoiseKey key;
  T sign = 1;
  ScalarArg<T> inv_scale{T(1), nullptr};  // 1 / temperature
  bool one_hot = false;       // write onehot(index) instead of the softmax
  int64_t n = 0, k = 0;
};

constexpr int kRowWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) row_softmax_kernel(RowSoftmaxArgs<T> a) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= a.n) return;  // whole warps leave together
  const T inv_scale = a.inv_scale.get();
  const NoiseKey key = a.philox ? a.key.get() : NoiseKey{};
  const T* in = a.input + row * a.k;
  T* out = a.out + row * a.k;
  // Sweep 1: each lane takes 4 consecutive columns at a time (one Philox call
  // when row * K + k0 is a multiple of 4).
  ArgMax<T> best;
  T m = neg_inf<T>();
  for (int64_t k0 = 4 * lane; k0 < a.k; k0 += 128) {
    rng::Philox4 words{};
    if (a.philox) {
      words = rng::words4(key.seed, key.offset, rng::kGumbelStream, static_cast<uint64_t>(row * a.k + k0));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (k0 + i >= a.k) break;
      T x = a.sign * in[k0 + i];
      if (a.noise != nullptr) {
        x = x + a.noise[row * a.k + k0 + i];
      } else if (a.philox) {
        x = x + static_cast<T>(rng::gumbel_from_bits(words.word[i]));
      }
      const T v = x * inv_scale;
      best.add(x, k0 + i);
      m = v > m ? v : m;
      out[k0 + i] = v;
    }
  }
  best.merge_lanes(32);
  m = max_lanes(m, 32);
  // Sweep 2: the sum of exponentials (lanes read back their own writes).
  T s = 0;
  for (int64_t k0 = 4 * lane; k0 < a.k; k0 += 128) {
    for (int i = 0; i < 4 && k0 + i < a.k; ++i) s += exp_shift(out[k0 + i], m);
  }
  s = sum_lanes(s, 32);
  const T lse = m + log_acc(s);
  // Sweep 3: normalise (or the one-hot of the argmax).
  for (int64_t k0 = 4 * lane; k0 < a.k; k0 += 128) {
    for (int i = 0; i < 4 && k0 + i < a.k; ++i) {
      out[k0 + i] = a.one_hot ? T(k0 + i == best.index ? 1 : 0) : exp_shift(out[k0 + i], lse);
    }
  }
  if (lane == 0) {
    if (a.lse != nullptr) a.lse[row] = lse;
    if (a.index != nullptr) a.index[row] = best.index == INT64_MAX ? 0 : best.index;
  }
}

template <typename T>
void launch_row_softmax(const RowSoftmaxArgs<T>& args) {
  if (args.n == 0) return;
  GMVQ_LAUNCH(row_softmax_kernel<T>, ceil_div(args.n, kRowWarps), kRowWarps * 32, 0,
              c10::cuda::getCurrentCUDAStream(), args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gmvq::cuda
