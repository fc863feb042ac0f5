// The Python module gmvq_ext._C: importing it registers the ops (static
// initialisers of the TORCH_LIBRARY blocks); build_info() says how it was
// built; take_subnormal_counts() serves the tests.
#include <pybind11/pybind11.h>

#include "cpu/subnormals.h"
#include "cpu/x86_paths.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "gmvq_ext kernels (registered as torch.ops.gmvq.*)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = GMVQ_TORCH_VERSION;
    info["with_cuda"] = static_cast<bool>(GMVQ_WITH_CUDA);
    info["cuda_architectures"] = GMVQ_CUDA_ARCHS;
    // The CPU kernels' x86 paths (AVX2 and AVX-512 noise and exponentials), each
    // taken at run time when the CPU has the instructions.
    info["cpu_x86_paths"] = static_cast<bool>(GMVQ_X86_PATHS);
    return info;
  });
#ifndef GMVQ_CUDA_EMULATION  // the emulation replaces the CPU kernels
  // The subnormal check of the CPU kernels' GEMMs (csrc/cpu/subnormals.h), on
  // with GMVQ_DEBUG_SUBNORMALS=1: (elements checked, subnormal values) since the last call.
  m.def("take_subnormal_counts", [] { return gmvq::cpu::take_subnormal_counts(); });
#endif
}
