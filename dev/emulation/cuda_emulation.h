// CUDA emulation on CPU threads, for checking the kernels' logic (indexing,
// barriers, shuffles, online statistics, tensor-core fragments, asynchronous
// copies) on machines without a GPU.
//
// Only used when GMVQ_CUDA_EMULATION is defined (dev/emulate_cuda.sh): the
// .cu files are then compiled as C++ by the host compiler, every CUDA thread
// of a block becomes a std::thread, __syncthreads a std::barrier, a warp
// shuffle an exchange through memory between two warp barriers, __shared__
// variables function statics (blocks run one after another), and the ops
// register for the CPU dispatch key so the CPU test suites run them. It
// proves nothing about timing, memory coalescing or the real compiler's code:
// only that the algorithm as written gives the right numbers.
//
// Tensor cores: mma_m16n8k8_tf32 is a warp collective. Every lane publishes
// the registers it holds; each lane then rebuilds the whole A (16x8) and B
// (8x8) from the lanes' registers with the PTX ISA's fragment layout for
// mma.m16n8k8 .tf32 and computes its own four D elements. A kernel that
// loads a fragment element into the wrong register or lane therefore gets a
// wrong product here, as on the GPU. Operands keep only their tf32 bits (the
// hardware ignores the low 13 bits of each register), and cvt_rna_tf32 rounds
// as cvt.rna.tf32.f32 does (nearest, ties away from zero, 10 mantissa bits),
// leaving junk in those 13 bits (see there).
// The products are exact. How the hardware adds them to the float32
// accumulator is unspecified; GMVQ_EMULATE_MMA_ACCUMULATION picks a model:
//   nearest (the default): the sum runs in float32 in k order, each addition
//     rounded to nearest;
//   truncate: the measured behaviour of V100 and A100 tensor cores (Fasi et
//     al. 2021, "Numerical behavior of NVIDIA tensor cores"), not verified for
//     Hopper: in blocks of four products, each product and the accumulator are
//     aligned to the largest exponent among them and cut to float32's 24 bits
//     there (truncated, not rounded), and the block's sum is truncated to
//     float32 too. Per mma this loses less than 24 units of float32's unit
//     roundoff of the largest term (docs/math.md, "Indices near ties").
// Either way results may differ from a GPU's in the last bits, never in the
// layout.
//
// cp.async: each thread queues its copies; cp_async_commit closes a group and
// cp_async_wait(n) performs all but the newest n groups. With
// GMVQ_EMULATE_CP_ASYNC=early the copies happen when issued instead. "late"
// (the default) exposes a read of a buffer before its wait; "early" exposes a
// copy issued into a buffer that other threads may still be reading. A kernel
// must leave no copy pending when it returns (checked).
#pragma once

#if !defined(GMVQ_CUDA_EMULATION)
#error "cuda_emulation.h is only for GMVQ_CUDA_EMULATION builds"
#endif

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
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
using std::sqrt;

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
  std::vector<uint64_t> exchange;                    // one slot per thread for shuffles
  std::vector<std::array<uint32_t, 6>> mma_exchange;  // one slot per thread: a0..a3, b0, b1
  unsigned char* dynamic_smem = nullptr;
};

// Asynchronous copies of the calling thread (cp.async), in commit groups.
struct PendingCopy {
  void* dst;
  const void* src;
  int src_bytes;  // the rest of the 16 bytes is zero-filled
};
struct AsyncCopies {
  std::vector<PendingCopy> open;
  std::deque<std::vector<PendingCopy>> committed;
};
inline thread_local AsyncCopies async_copies;

inline bool copies_on_issue() {
  static const bool early = [] {
    const char* mode = std::getenv("GMVQ_EMULATE_CP_ASYNC");
    return mode != nullptr && std::string(mode) == "early";
  }();
  return early;
}

inline void perform(const PendingCopy& c) {
  std::memset(c.dst, 0, 16);
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
}

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
        state.mma_exchange.assign(threads, {});
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
            // cp.async copies must be waited for before the kernel returns.
            if (!async_copies.open.empty() || !async_copies.committed.empty()) {
              std::fprintf(stderr, "emulation: a thread returned with cp.async copies pending\n");
              std::abort();
            }
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

namespace gmvq::emulation {

// cvt.rna.tf32.f32: round to nearest with ties away from zero, keeping 10
// mantissa bits. Adding half a tf32 ulp to the magnitude and truncating does
// exactly that, overflow to inf included; NaN and inf pass through. The low 13
// bits of the result register are the tensor cores' don't-care bits, not
// promised to be zero: the emulation leaves x's own low bits there, so a
// kernel that reads the register as a float without clearing them
// (tile_math.cuh tf32_value) gets a wrong 3xTF32 split here.
inline uint32_t cvt_rna_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;
  return ((bits + 0x1000u) & 0xffffe000u) | (bits & 0x1fffu);
}

// The value the tensor core sees in a .tf32 operand register.
inline float tf32_operand(uint32_t bits) {
  bits &= 0xffffe000u;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

enum class MmaAccumulation { kNearest, kTruncate };

inline MmaAccumulation mma_accumulation() {
  static const MmaAccumulation mode = [] {
    const char* env = std::getenv("GMVQ_EMULATE_MMA_ACCUMULATION");
    const std::string name = env == nullptr ? "nearest" : env;
    if (name == "nearest") return MmaAccumulation::kNearest;
    if (name != "truncate") {
      std::fprintf(stderr, "GMVQ_EMULATE_MMA_ACCUMULATION must be nearest or truncate, got %s\n", name.c_str());
      std::abort();
    }
    return MmaAccumulation::kTruncate;
  }();
  return mode;
}

// float32 toward zero: a float64 rounded to nearest, stepped back when that
// rounding moved away from zero.
inline float to_float_toward_zero(double x) {
  float f = static_cast<float>(x);
  if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
  return f;
}

// acc + sum of the products (exact tf32 x tf32 products, in float64), in the
// truncating model: every term cut toward zero to a multiple of the float32
// ulp of the largest one, the exact sum of the cut terms (at most 26
// significant bits: exact in float64) then truncated to float32.
inline float truncating_block(float acc, const double* products, int count) {
  double terms[5] = {acc, 0, 0, 0, 0};
  for (int i = 0; i < count; ++i) terms[i + 1] = products[i];
  double largest = 0;
  for (int i = 0; i <= count; ++i) largest = std::max(largest, std::fabs(terms[i]));
  if (largest == 0 || !std::isfinite(largest)) {
    double sum = terms[0];
    for (int i = 1; i <= count; ++i) sum += terms[i];
    return static_cast<float>(sum);
  }
  int exponent = 0;
  std::frexp(largest, &exponent);  // largest in [2^(exponent - 1), 2^exponent)
  const double quantum = std::ldexp(1.0, exponent - 24);
  double sum = 0;
  for (int i = 0; i <= count; ++i) sum += std::trunc(terms[i] / quantum) * quantum;
  return to_float_toward_zero(sum);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, d (see the
// header comment). PTX ISA fragment layout, groupID = lane / 4,
// threadID_in_group = lane % 4:
//   a0: (row groupID,     col tig)      a1: (row groupID + 8, col tig)
//   a2: (row groupID,     col tig + 4)  a3: (row groupID + 8, col tig + 4)
//   b0: (row tig,     col groupID)      b1: (row tig + 4,     col groupID)
//   c0, c1: (row groupID, cols 2 tig, 2 tig + 1); c2, c3: row groupID + 8.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto* state = current_block();
  const int t = linear_thread();
  const int lane = t % 32, warp = t / 32;
  auto& barrier = *state->warp_barriers[warp];
  barrier.arrive_and_wait();  // the previous mma's reads of the slots are done
  state->mma_exchange[t] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  barrier.arrive_and_wait();
  float A[16][8], B[8][8];
  for (int source = 0; source < 32; ++source) {
    const auto& r = state->mma_exchange[warp * 32 + source];
    const int group = source / 4, tig = source % 4;
    A[group][tig] = tf32_operand(r[0]);
    A[group + 8][tig] = tf32_operand(r[1]);
    A[group][tig + 4] = tf32_operand(r[2]);
    A[group + 8][tig + 4] = tf32_operand(r[3]);
    B[tig][group] = tf32_operand(r[4]);
    B[tig + 4][group] = tf32_operand(r[5]);
  }
  const int group = lane / 4, tig = lane % 4;
  const bool truncate = mma_accumulation() == MmaAccumulation::kTruncate;
  for (int i = 0; i < 4; ++i) {
    const int row = group + 8 * (i / 2), col = 2 * tig + i % 2;
    float sum = d[i];
    if (truncate) {
      double products[8];
      for (int k = 0; k < 8; ++k) products[k] = static_cast<double>(A[row][k]) * B[k][col];
      sum = truncating_block(sum, products, 4);
      sum = truncating_block(sum, products + 4, 4);
    } else {
      for (int k = 0; k < 8; ++k) sum += A[row][k] * B[k][col];  // tf32 products are exact in float32
    }
    d[i] = sum;
  }
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  const PendingCopy copy{dst, src, src_bytes};
  if (copies_on_issue()) {
    perform(copy);
  } else {
    async_copies.open.push_back(copy);
  }
}
inline void cp_async_commit() {
  async_copies.committed.push_back(std::move(async_copies.open));
  async_copies.open.clear();
}
// cp.async.wait_group pending: all but the newest `pending` groups are complete.
inline void cp_async_wait(int pending) {
  while (static_cast<int>(async_copies.committed.size()) > pending) {
    for (const auto& copy : async_copies.committed.front()) perform(copy);
    async_copies.committed.pop_front();
  }
}

}  // namespace gmvq::emulation

// The CUDA runtime and c10/cuda pieces the host code uses.
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrComputeCapabilityMajor };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline int cudaGetDevice(int* device) {
  *device = 0;
  return 0;
}
inline int cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  *value = attribute == cudaDevAttrComputeCapabilityMajor ? 9 : 227 * 1024;  // an H100
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
