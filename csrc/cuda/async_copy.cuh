// cp.async staging of global rows into shared memory (sm_80+; a plain copy
// before that), 16 bytes per copy. The emulation (dev/emulation/cuda_emulation.h) defers each
// copy to its wait, or performs it on issue, to expose missing waits and
// barriers.
#pragma once

#include "gmvq/cuda/common.cuh"

namespace gmvq::cuda {

// dst[0..16) = src[0..src_bytes), zero-filled after that (src_bytes 0 or 16
// here). Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(GMVQ_CUDA_EMULATION)
  emulation::cp_async_16(dst, src, src_bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src), "r"(src_bytes));
#else
  uint4 value = make_uint4(0, 0, 0, 0);
  if (src_bytes > 0) value = *static_cast<const uint4*>(src);
  *static_cast<uint4*>(dst) = value;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(GMVQ_CUDA_EMULATION)
  emulation::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most `Pending` of this thread's committed groups are in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(GMVQ_CUDA_EMULATION)
  emulation::cp_async_wait(Pending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

// Rows [row0, row0 + rows) of a row-major (total_rows, width) matrix into a
// shared tile: tile(r, c) is where element (r, c) goes, and the 16 bytes from
// a column c that is a multiple of 16 bytes stay together there (a chunk);
// rows past total_rows become zeros. width is a multiple of 16 bytes. All
// threads of the block take part; the caller commits and waits.
template <typename Tile, typename T>
__device__ __forceinline__ void stage_rows(const Tile& tile, const T* src, int64_t row0, int rows,
                                           int64_t total_rows, int width) {
  constexpr int kPerCopy = 16 / static_cast<int>(sizeof(T));
  const int copies_per_row = width / kPerCopy;
  for (int i = threadIdx.x; i < rows * copies_per_row; i += blockDim.x) {
    const int r = i / copies_per_row, c = (i % copies_per_row) * kPerCopy;
    const int64_t row = row0 + r;
    const bool valid = row < total_rows;
    cp_async_16(&tile(r, c), valid ? src + row * width + c : src, valid ? 16 : 0);
  }
}

}  // namespace gmvq::cuda
