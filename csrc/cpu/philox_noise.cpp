// philox_noise: the kernels' counter-based noise as a tensor, so tests and
// users can see exactly the draws every kernel uses (bit-identical to
// reference.uniform_noise / gumbel_noise / gaussian_noise), and quantizers can
// draw their own discrete choices from the same generator.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "gmvq/checks.h"
#include "gmvq/philox.h"
#include "philox_fill.h"
#include "subnormals.h"

namespace gmvq {
namespace {

// Elements per parallel chunk: enough work per task to amortise scheduling,
// and a multiple of 4 so most chunks start on a Philox block boundary.
constexpr int64_t kElementsPerChunk = 4096;

at::Tensor philox_noise_cpu(const at::Tensor& like, const at::Tensor& noise_state, c10::string_view distribution) {
  const rng::NoiseDistribution kind = check_philox_noise_inputs(like, noise_state, distribution);
  const NoiseState key = host_noise_state(noise_state);
  auto out = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  float* data = out.data_ptr<float>();
  // Element r * C + c of the stream is out[r][c], so the flat index of the
  // contiguous output is the stream element: fill any range of it directly.
  at::parallel_for(0, out.numel(), kElementsPerChunk, [&](int64_t begin, int64_t end) {
    cpu::row::fill_noise(kind, key.seed, key.offset, static_cast<uint64_t>(begin), end - begin, data + begin);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gmvq, CPU, m) { m.impl("philox_noise", cpu::without_subnormals<&philox_noise_cpu>); }

}  // namespace gmvq
