// The Python module gmvq_ext._C: importing it registers the ops (static
// initialisers of the TORCH_LIBRARY blocks); build_info() says how it was built.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "gmvq_ext kernels (registered as torch.ops.gmvq.*)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = GMVQ_TORCH_VERSION;
    info["with_cuda"] = static_cast<bool>(GMVQ_WITH_CUDA);
    info["cuda_architectures"] = GMVQ_CUDA_ARCHS;
    return info;
  });
}
