// Run-time scalars as the schemas pass them (registration.cpp): the
// temperature is a 0-dim float tensor and the noise state an int64 tensor
// [seed, offset], each on the CPU or on the inputs' device. A CPU value is
// read on the host (free) and passed by value; a device value is passed as a
// pointer that every kernel thread dereferences once. Nothing waits for the
// device, so a training step that anneals the temperature and advances the
// noise offset on the GPU can be captured in one CUDA graph.
#pragma once

#include <cstdlib>
#include <string>

#include "gmvq/checks.h"
#include "gmvq/cuda/common.cuh"

namespace gmvq::cuda {

// A scalar the kernel reads once per thread.
template <typename T>
struct ScalarArg {
  T value = 0;
  const T* device = nullptr;  // when set, the value lives in device memory
  __device__ __forceinline__ T get() const { return device != nullptr ? *device : value; }
};

// The Philox key (seed, offset).
struct NoiseKey {
  int64_t seed = 0, offset = 0;
  const int64_t* device = nullptr;  // when set, [seed, offset] in device memory
  __device__ __forceinline__ NoiseKey get() const {
    return device != nullptr ? NoiseKey{device[0], device[1], nullptr} : *this;
  }
};

// Whether a scalar tensor is handed to the kernels as a pointer. Under the
// emulation every tensor is on the CPU; GMVQ_EMULATE_DEVICE_SCALARS=1 passes
// them as pointers anyway, so that the kernels' device reads are exercised.
inline bool pass_as_pointer(const at::Tensor& t) {
#if defined(GMVQ_CUDA_EMULATION)
  static const bool emulate = [] {
    const char* flag = std::getenv("GMVQ_EMULATE_DEVICE_SCALARS");
    return flag != nullptr && std::string(flag) == "1";
  }();
  if (emulate) return true;
#endif
  return !t.device().is_cpu();
}

// 1 / temperature in the accumulation dtype: kernels multiply by it instead of
// dividing. A device temperature is inverted by an (asynchronous) ATen kernel
// that this object keeps alive until the launches that read it are queued.
class InverseTemperature {
 public:
  InverseTemperature(const at::Tensor& temperature, at::ScalarType acc) {
    if (pass_as_pointer(temperature)) {
      device_ = at::reciprocal(temperature.to(acc)).contiguous();
    } else {
      host_ = 1.0 / host_temperature(temperature);
    }
  }
  template <typename T>
  ScalarArg<T> arg() const {
    ScalarArg<T> a;
    if (device_.defined()) {
      a.device = device_.data_ptr<T>();
    } else {
      a.value = static_cast<T>(host_);
    }
    return a;
  }

 private:
  double host_ = 1.0;
  at::Tensor device_;
};

// The noise key of a noise_state tensor.
class NoiseArg {
 public:
  explicit NoiseArg(const at::Tensor& noise_state) {
    if (pass_as_pointer(noise_state)) {
      device_ = noise_state.reshape({2}).contiguous();
      key_.device = device_.data_ptr<int64_t>();
    } else {
      const auto s = host_noise_state(noise_state);
      key_.seed = s.seed;
      key_.offset = s.offset;
    }
  }
  NoiseKey key() const { return key_; }

 private:
  NoiseKey key_;
  at::Tensor device_;
};

}  // namespace gmvq::cuda
