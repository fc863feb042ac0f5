// No subnormal floats on the CPU ops' hot path (docs/math.md, "Subnormal numbers").
//
// Terms far below a row's maximum (posterior probabilities, tempered samples,
// logit gradients at a cold temperature) underflow into the subnormal range,
// and the GEMMs that consume them make more. Intel cores take a microcode
// assist on every subnormal operand or result (about 100 cycles); AMD Zen
// cores barely slow down. So every CPU op runs with flush-to-zero (results)
// and denormals-are-zero (operands) set: a value below the smallest normal
// number (2^-126 in float32, 2^-1022 in float64) is exactly 0 in every op's
// arithmetic, its own loops and the BLAS's alike.
//
// The mode is per thread. The op's work runs on the calling thread and on the
// threads of its OpenMP pool (at::parallel_for, and the BLAS's own threads
// when a GEMM is called outside a parallel region), so the guard sets the mode
// on every thread of that pool for the op's duration and gives each thread its
// own previous mode back afterwards. It also starts the whole pool on an op's
// first call, whatever its size.
//
// GMVQ_CPU_ALLOW_SUBNORMALS=1 leaves the mode alone (the tests show with it
// that the check below sees subnormals without the guard).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace gmvq::cpu {

// Sets flush-to-zero and denormals-are-zero on the caller and its pool (x86;
// elsewhere nothing); the destructor restores each thread's previous mode.
// Guards nest: only the outermost one changes anything.
class SubnormalsFlushed {
 public:
  SubnormalsFlushed();
  ~SubnormalsFlushed();
  SubnormalsFlushed(const SubnormalsFlushed&) = delete;
  SubnormalsFlushed& operator=(const SubnormalsFlushed&) = delete;

 private:
  bool active_ = false;
};

// An op's CPU kernel run under SubnormalsFlushed:
//   m.impl("quantize", &without_subnormals<&quantize_cpu>)
template <auto Kernel>
struct WithoutSubnormals;

template <typename Result, typename... Args, Result (*Kernel)(Args...)>
struct WithoutSubnormals<Kernel> {
  static Result call(Args... args) {
    const SubnormalsFlushed guard;
    return Kernel(std::forward<Args>(args)...);
  }
};

template <auto Kernel>
constexpr auto without_subnormals = &WithoutSubnormals<Kernel>::call;

// --- the check behind the tests ------------------------------------------------------
// With GMVQ_DEBUG_SUBNORMALS=1 in the environment, every GEMM of the CPU
// kernels (gemm.h) counts the subnormal values of its operands and result,
// read by gmvq_ext._C.subnormal_operands(). Off, it costs one branch per GEMM.
bool counting_subnormals();
// Adds x's element count and its subnormal values (read from the bits: under
// denormals-are-zero a comparison would see them as 0) to the counters.
void count_subnormals(const at::Tensor& x);
// (elements checked, subnormal values found) since the last call; resets both.
std::pair<int64_t, int64_t> take_subnormal_counts();

}  // namespace gmvq::cpu
