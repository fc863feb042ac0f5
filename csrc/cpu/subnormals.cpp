// SubnormalsFlushed and the subnormal counters (subnormals.h).
#include "subnormals.h"

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif
#if AT_PARALLEL_OPENMP
#include <omp.h>
#endif

namespace gmvq::cpu {
namespace {

#if defined(__SSE2__)
// MXCSR: FTZ (bit 15) flushes results, DAZ (bit 6) reads operands as 0.
constexpr unsigned kFlushBits = 0x8040;
unsigned read_mode() { return _mm_getcsr(); }
void write_mode(unsigned mode) { _mm_setcsr(mode); }
constexpr bool kCanFlush = true;
#else
constexpr unsigned kFlushBits = 0;
unsigned read_mode() { return 0; }
void write_mode(unsigned) {}
constexpr bool kCanFlush = false;
#endif

// Per thread: how many guards are open on it, and its mode before the first.
thread_local int open_guards = 0;
thread_local unsigned mode_before = 0;

void enter_thread() {
  if (open_guards++ == 0) {
    mode_before = read_mode();
    write_mode(mode_before | kFlushBits);
  }
}

void leave_thread() {
  if (open_guards > 0 && --open_guards == 0) write_mode(mode_before);
}

// fn on every thread of the caller's OpenMP team-to-be: the threads that
// at::parallel_for and the BLAS will use for this op (libgomp keeps a
// caller's pool threads, in order, from one region to the next of the same size).
template <typename Fn>
void on_every_pool_thread(const Fn& fn) {
#if AT_PARALLEL_OPENMP
  if (!at::in_parallel_region() && !omp_in_parallel() && at::get_num_threads() > 1) {
#pragma omp parallel num_threads(at::get_num_threads())
    fn();
    return;
  }
#endif
  fn();  // inside a parallel region, the op's work stays on this thread
}

bool allowed_by_environment() {
  static const bool allow = std::getenv("GMVQ_CPU_ALLOW_SUBNORMALS") != nullptr;
  return allow;
}

std::atomic<int64_t> checked_elements{0};
std::atomic<int64_t> subnormal_values{0};

template <typename Bits>
int64_t subnormals_in(const void* data, int64_t n, Bits exponent_mask) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  int64_t found = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits bits;
    std::memcpy(&bits, bytes + i * sizeof(Bits), sizeof(Bits));
    const Bits magnitude = bits & static_cast<Bits>(~(Bits{1} << (8 * sizeof(Bits) - 1)));
    found += (bits & exponent_mask) == 0 && magnitude != 0;
  }
  return found;
}

}  // namespace

SubnormalsFlushed::SubnormalsFlushed() {
  if (!kCanFlush || allowed_by_environment()) return;
  active_ = true;
  on_every_pool_thread(enter_thread);
}

SubnormalsFlushed::~SubnormalsFlushed() {
  if (active_) on_every_pool_thread(leave_thread);
}

bool counting_subnormals() {
  static const bool on = std::getenv("GMVQ_DEBUG_SUBNORMALS") != nullptr;
  return on;
}

void count_subnormals(const at::Tensor& x) {
  const at::Tensor dense = x.contiguous();  // a copy moves bits; no arithmetic reads them
  int64_t found = 0;
  if (dense.scalar_type() == at::kFloat) {
    found = subnormals_in<uint32_t>(dense.data_ptr(), dense.numel(), 0x7f800000u);
  } else if (dense.scalar_type() == at::kDouble) {
    found = subnormals_in<uint64_t>(dense.data_ptr(), dense.numel(), 0x7ff0000000000000ull);
  }
  checked_elements += dense.numel();
  subnormal_values += found;
}

std::pair<int64_t, int64_t> take_subnormal_counts() {
  return {checked_elements.exchange(0), subnormal_values.exchange(0)};
}

}  // namespace gmvq::cpu
