// Shared pieces of the CUDA kernels: the accumulation type on the host side,
// launch bookkeeping, exponentials, the argmax and warp reductions.
//
// Kernels work on acc_t (float, or double for float64 inputs) operands only:
// the host converts z, weight and codebook to the accumulation type first
// (O(N*D + K*D) work), so every kernel template is instantiated for two types
// instead of four and half/bfloat16 inputs cost no extra code.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#if defined(GMVQ_CUDA_EMULATION)
// Host-only build that runs the kernels on CPU threads (dev/emulate_cuda.sh).
#include "cuda_emulation.h"
#define GMVQ_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::gmvq::emulation::launch(kernel, dim3(grid), dim3(block), smem, __VA_ARGS__)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
// kernel<<<grid, block, smem, stream>>>(args...); a macro so that the
// emulation build can run the same launch on CPU threads.
#define GMVQ_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace gmvq::cuda {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A contiguous copy in the accumulation dtype (a no-op when it already is one).
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// Largest dynamic shared memory one block may opt into on the current device.
inline int64_t max_dynamic_smem() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// Dispatch float / double (the two accumulation types) to a generic lambda.
template <typename F>
void dispatch_acc(at::ScalarType acc, F&& f) {
  if (acc == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// The block's dynamic shared memory, 16-byte aligned.
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

// Opt a kernel into `bytes` of dynamic shared memory, failing with a message
// that names the op and the size that needs it when the device has less.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t bytes, const char* op, const char* what) {
  TORCH_CHECK(bytes <= max_dynamic_smem(), op, " (CUDA): ", what, " needs ", bytes,
              " bytes of shared memory per block, more than this GPU has (", max_dynamic_smem(),
              "); use a smaller size or the CPU");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -INFINITY;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// exp(a - m) with exp(-inf - -inf) defined as 0 (an empty partial sum).
template <typename T>
__device__ __forceinline__ T exp_shift(T a, T m) {
  return a == neg_inf<T>() ? T(0) : exp_acc(a - m);
}

// Argmax with ties to the lowest index (torch.argmax's rule); NaN never wins.
template <typename T>
struct ArgMax {
  T value = neg_inf<T>();
  int64_t index = INT64_MAX;

  __device__ __forceinline__ void add(T v, int64_t i) {
    if (v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
  __device__ __forceinline__ void merge_lanes(int width) {
    for (int mask = 1; mask < width; mask <<= 1) {
      const T ov = __shfl_xor_sync(0xffffffffu, value, mask);
      const int64_t oi = __shfl_xor_sync(0xffffffffu, index, mask);
      add(ov, oi);
    }
  }
};

template <typename T>
__device__ __forceinline__ T sum_lanes(T x, int width) {
  for (int mask = 1; mask < width; mask <<= 1) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

template <typename T>
__device__ __forceinline__ T max_lanes(T x, int width) {
  for (int mask = 1; mask < width; mask <<= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, x, mask);
    x = o > x ? o : x;
  }
  return x;
}

}  // namespace gmvq::cuda
