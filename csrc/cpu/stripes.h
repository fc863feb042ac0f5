// How the CPU quantize splits its rows over threads, deterministically.
//
// The rows are cut into blocks of B rows (one GEMM each) and the blocks into
// stripes; threads take stripes from a shared counter. A stripe's result never
// depends on which thread ran it or on the thread count, and the stripes'
// partial sums are added in stripe order (OrderedSum), so the op gives the same
// bits run after run and on any number of threads (as far as the BLAS does: a
// lone stripe runs its GEMMs on the BLAS's own threads).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

// at::parallel_for is header code: without -fopenmp it silently runs serially
// (ATen/Parallel-inl.h tests INTRA_OP_PARALLEL, defined only under _OPENMP).
#if !defined(_OPENMP)
#pragma message("gmvq stripes.h built without OpenMP (-fopenmp): the CPU quantize will run on one thread")
#endif

namespace gmvq::cpu {

// B * K of one block: large enough for efficient GEMMs, small enough that the
// block's (B, K) buffers stay in cache. Nothing here depends on the thread count.
constexpr int64_t kTargetBlockElements = int64_t{1} << 16;
constexpr int64_t kMaxBlockElements = int64_t{1} << 21;
constexpr int64_t kMinBlockRows = 128;
// Many stripes: threads that finish early take the last ones, so the tail where
// one thread works alone is short. Not too many with a large codebook: there
// the stripes' own passes over the (K, D) partial and (D + W, K) terms weigh
// more (kPartialBytes bounds the count; git log and benchmarks/results have the
// stripe counts' timings).
constexpr int64_t kStripes = 64;
// Every stripe has a partial sum (q_bar's columns, the codebook gradient) until
// it is added in order (OrderedSum). Usually a few exist at a time, but all of
// them if one thread stalls: with a large codebook, fewer stripes bound that.
constexpr int64_t kPartialBytes = int64_t{64} << 20;

// Rows [row_begin, row_end) of a stripe: whole blocks of rows_per_block rows.
struct Blocking {
  int64_t rows = 0, rows_per_block = 1, blocks = 0, stripes = 0;

  // partial_bytes: one stripe's partial sums.
  Blocking(int64_t n, int64_t k, int64_t partial_bytes) : rows(n) {
    rows_per_block = std::max<int64_t>(1, kTargetBlockElements / k);
    // Large K: at least kMinBlockRows rows per GEMM, within the hard cap on B * K. Each
    // block streams the whole codebook through the cache: with few rows per block
    // that stream, not the arithmetic, sets a code's cost at large K.
    rows_per_block = std::max(rows_per_block,
                              std::min<int64_t>(kMinBlockRows, std::max<int64_t>(1, kMaxBlockElements / k)));
    rows_per_block = std::max<int64_t>(1, std::min(rows_per_block, n));
    blocks = (n + rows_per_block - 1) / rows_per_block;
    const int64_t affordable = std::max<int64_t>(2, kPartialBytes / std::max<int64_t>(1, partial_bytes));
    stripes = std::min({kStripes, blocks, affordable});
  }
  int64_t row_begin(int64_t stripe) const { return std::min(rows, stripe * blocks / stripes * rows_per_block); }
  int64_t row_end(int64_t stripe) const { return row_begin(stripe + 1); }
};

// fn(state, stripe, row_begin, row_end) for every stripe, in parallel. Threads
// take stripes from a shared counter (a thread that the OS delays takes fewer);
// which thread runs a stripe changes nothing in its result. Each thread builds
// one `state = make_state()` (its buffers) for all the stripes it takes: buffers
// made per stripe kept the allocator trimming and refaulting their pages.
// The caller's thread-local state (dispatch keys below autograd, grad mode) is
// installed in every worker: the ATen calls made inside (at::mm_out, ...)
// must dispatch exactly as they would on the calling thread.
template <typename MakeState, typename Fn>
void for_each_stripe(const Blocking& blocking, const MakeState& make_state, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, blocking.stripes, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    int64_t s = next++;
    if (s >= blocking.stripes) return;
    auto state = make_state();
    for (; s < blocking.stripes; s = next++) fn(state, s, blocking.row_begin(s), blocking.row_end(s));
  });
}

// The stripes' partial sums of one tensor, added into `total` in stripe order
// as they come in: the bits of adding all of them in order at the end, with
// only the few partials that arrive early alive at a time. (Keeping all of the
// codebook gradient's until the end costs fresh pages, and their page faults,
// on every call.)
template <typename T>
class OrderedSum {
 public:
  OrderedSum(at::Tensor total, int64_t parts) : total_(std::move(total)), parts_(parts) { total_.zero_(); }

  // A zeroed buffer shaped like the total, for one part.
  at::Tensor take() {
    at::Tensor buffer;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!spare_.empty()) {
        buffer = std::move(spare_.back());
        spare_.pop_back();
      }
    }
    return buffer.defined() ? buffer.zero_() : at::zeros_like(total_);
  }

  // Part `index`, complete; adds every part whose predecessors are all in.
  void give(int64_t index, at::Tensor part) {
    const std::lock_guard<std::mutex> lock(mutex_);
    arrived_.emplace(index, std::move(part));
    for (auto first = arrived_.begin(); first != arrived_.end() && first->first == added_;
         first = arrived_.begin()) {
      const T* source = first->second.template data_ptr<T>();
      T* out = total_.template data_ptr<T>();
      for (int64_t i = 0, n = total_.numel(); i < n; ++i) out[i] += source[i];
      spare_.push_back(std::move(first->second));
      arrived_.erase(first);
      ++added_;
    }
  }

  // Every part was given (the sum is complete).
  bool complete() const { return added_ == parts_; }

 private:
  at::Tensor total_;
  const int64_t parts_;
  std::mutex mutex_;
  int64_t added_ = 0;
  std::map<int64_t, at::Tensor> arrived_;  // early parts by index
  std::vector<at::Tensor> spare_;
};

}  // namespace gmvq::cpu
