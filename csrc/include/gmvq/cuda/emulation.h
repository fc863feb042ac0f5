// CUDA emulation on CPU threads, for checking the kernels' logic (indexing,
// barriers, shuffles, online statistics) on machines without a GPU.
//
// Only used when GMVQ_CUDA_EMULATION is defined (tools/emulate_cuda.sh): the
// .cu files are then compiled as C++ by the host compiler, every CUDA thread
// of a block becomes a std::thread, __syncthreads a std::barrier, a warp
// shuffle an exchange through memory between two warp barriers, __shared__
// variables function statics (blocks run one after another), and the ops
// register for the CPU dispatch key so the CPU test suites run them. It
// proves nothing about timing, memory coalescing or the real compiler's code:
// only that the algorithm as written gives the right numbers.
#pragma once

#if !defined(GMVQ_CUDA_EMULATION)
#error "emulation.h is only for GMVQ_CUDA_EMULATION builds"
#endif

#include <ATen/ATen.h>
#include <torch/library.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

using std::exp;
using std::fma;
using std::log;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float4 {
  float x, y, z, w;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;

namespace gmvq::emulation {

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> exchange;  // one slot per thread for shuffles
  unsigned char* dynamic_smem = nullptr;
};

inline BlockState*& current_block() {
  static BlockState* state = nullptr;
  return state;
}

inline unsigned char* dynamic_shared_memory() { return current_block()->dynamic_smem; }

inline int linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  const int threads = block.x * block.y * block.z;
  TORCH_CHECK(threads % 32 == 0, "emulation: block size must be whole warps");
  std::vector<unsigned char> dynamic(smem + 64);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState state;
        state.block_barrier = std::make_unique<std::barrier<>>(threads);
        for (int w = 0; w < threads / 32; ++w) state.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        state.exchange.assign(threads, 0);
        // Poison dynamic shared memory: kernels must not read what they did not write.
        std::memset(dynamic.data(), 0xff, dynamic.size());
        state.dynamic_smem = dynamic.data();
        current_block() = &state;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            blockDim = block;
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
        current_block() = nullptr;
      }
    }
  }
}

}  // namespace gmvq::emulation

inline void __syncthreads() { gmvq::emulation::current_block()->block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  auto* state = gmvq::emulation::current_block();
  const int t = gmvq::emulation::linear_thread();
  const int lane = t % 32, warp = t / 32;
  auto& barrier = *state->warp_barriers[warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  barrier.arrive_and_wait();  // earlier reads of the slots are done
  state->exchange[t] = bits;
  barrier.arrive_and_wait();
  const int source_lane = (lane ^ lane_mask) < ((lane / width) + 1) * width ? (lane ^ lane_mask) : lane;
  bits = state->exchange[warp * 32 + source_lane];
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// The CUDA runtime and c10/cuda pieces the host code uses.
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline int cudaGetDevice(int* device) {
  *device = 0;
  return 0;
}
inline int cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 227 * 1024;  // an H100's opt-in limit
  return 0;
}
template <typename F>
int cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return 0;
}
#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline int getCurrentCUDAStream() { return 0; }
}  // namespace c10::cuda

// Register the CUDA kernels under the CPU key, so CPU tensors reach them.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)
