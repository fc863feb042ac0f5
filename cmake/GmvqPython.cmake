# Python, pybind11 and torch, all taken from the interpreter that builds us, so
# the extension is compiled against the torch it will run with.
find_package(Python REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import pybind11, torch; print(pybind11.get_cmake_dir()); print(torch.utils.cmake_prefix_path); print(torch.__version__); print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _gmvq_probe OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _gmvq_probe_result)
if(NOT _gmvq_probe_result EQUAL 0)
  message(FATAL_ERROR "gmvq_ext: no torch (or pybind11) to compile against in ${Python_EXECUTABLE}. "
                      "The kernels must be built against the torch that will run them, in that environment "
                      "and without build isolation:\n"
                      "    pip install torch numpy scikit-build-core pybind11 ninja\n"
                      "    pip install --no-build-isolation .\n"
                      "(pin the torch you want, e.g. torch==2.13.0; an isolated build never sees it)")
endif()
string(REPLACE "\n" ";" _gmvq_probe "${_gmvq_probe}")
list(GET _gmvq_probe 0 pybind11_DIR)
list(GET _gmvq_probe 1 _gmvq_torch_prefix)
list(GET _gmvq_probe 2 GMVQ_TORCH_VERSION)
list(LENGTH _gmvq_probe _gmvq_probe_len)
set(GMVQ_TORCH_CUDA_VERSION "")
if(_gmvq_probe_len GREATER 3)
  list(GET _gmvq_probe 3 GMVQ_TORCH_CUDA_VERSION)
endif()

# Prepend, and pin Torch_DIR: an isolated build environment can otherwise put
# a second torch on the prefix path.
list(PREPEND CMAKE_PREFIX_PATH "${_gmvq_torch_prefix}")
set(Torch_DIR "${_gmvq_torch_prefix}/Torch")
set(Caffe2_DIR "${_gmvq_torch_prefix}/Caffe2")
find_package(pybind11 CONFIG REQUIRED)
message(STATUS "gmvq_ext: torch ${GMVQ_TORCH_VERSION} (CUDA: '${GMVQ_TORCH_CUDA_VERSION}') from ${_gmvq_torch_prefix}")

# at::parallel_for is header code that runs serially unless the including file
# is compiled with OpenMP. torch links libgomp.so.1 and is loaded first, so our
# reference to the same soname binds to torch's runtime: one thread pool.
find_package(OpenMP REQUIRED COMPONENTS CXX)

function(gmvq_configure_torch_target target)
  target_link_libraries(${target} PRIVATE ${TORCH_LIBRARIES} OpenMP::OpenMP_CXX)
  target_include_directories(${target} PRIVATE "${PROJECT_SOURCE_DIR}/csrc/include" ${TORCH_INCLUDE_DIRS})
  separate_arguments(_torch_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
  # -ffp-contract=off: the noise transforms must round step by step (philox.h).
  # -fno-math-errno: sqrt sets no errno, so loops calling it vectorise (no result
  # changes: sqrt is correctly rounded either way, and nothing reads errno).
  # -Wno-psabi: the AVX2 noise code (row_math.h) passes vectors only between
  # inlined, internal functions; GCC still notes the ABI change once per file.
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:${_torch_flags} -ffp-contract=off -fno-math-errno -O3 -Wno-psabi>)
  target_compile_features(${target} PRIVATE cxx_std_20)
  # torch's libraries sit in site-packages/torch/lib beside site-packages/gmvq_ext.
  set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN/../torch/lib" BUILD_WITH_INSTALL_RPATH OFF)
endfunction()
