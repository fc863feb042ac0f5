# Decide whether the CUDA kernels are built, and provide the compile-only check
# used on machines that have nvcc but no GPU (CI).
include(CheckLanguage)

set(GMVQ_BUILD_CUDA OFF)
if(GMVQ_CUDA STREQUAL "ON" OR (GMVQ_CUDA STREQUAL "AUTO" AND GMVQ_TORCH_CUDA_VERSION) OR GMVQ_CUDA_COMPILE_CHECK)
  check_language(CUDA)
endif()
if(GMVQ_CUDA STREQUAL "ON")
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR "GMVQ_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
  set(GMVQ_BUILD_CUDA ON)
elseif(GMVQ_CUDA STREQUAL "AUTO" AND GMVQ_TORCH_CUDA_VERSION AND CMAKE_CUDA_COMPILER)
  set(GMVQ_BUILD_CUDA ON)
endif()

if(GMVQ_BUILD_CUDA OR GMVQ_CUDA_COMPILE_CHECK)
  # CMake 3.25 knows no C++20 flag for nvcc; torch 2.13 headers need C++17 at least.
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  if(NOT GMVQ_CUDA_ARCHITECTURES)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
        "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f'{c[0]}{c[1]}')"
      OUTPUT_VARIABLE GMVQ_CUDA_ARCHITECTURES OUTPUT_STRIP_TRAILING_WHITESPACE)
  endif()
  set(CMAKE_CUDA_ARCHITECTURES ${GMVQ_CUDA_ARCHITECTURES})
  enable_language(CUDA)
  # A CUDA torch's find_package(Torch) turns its TORCH_CUDA_ARCH_LIST (the
  # variable, else the environment's, else a GPU probe that falls back to a
  # list of six or seven architectures) into -gencode flags in
  # CMAKE_CUDA_FLAGS, on top of the target's architectures. Give it ours, so
  # that its probe never runs; gmvq_drop_torch_gencode_flags then removes
  # whatever it added anyway.
  set(_gmvq_torch_archs "")
  foreach(arch IN LISTS GMVQ_CUDA_ARCHITECTURES)
    string(REGEX REPLACE "-(real|virtual)$" "" arch "${arch}")
    if(arch MATCHES "^([0-9]+)([0-9])([af]?)$")  # 90 -> 9.0, 90a -> 9.0a
      list(APPEND _gmvq_torch_archs "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    endif()
  endforeach()
  if(_gmvq_torch_archs)
    set(TORCH_CUDA_ARCH_LIST "${_gmvq_torch_archs}")
    set(ENV{TORCH_CUDA_ARCH_LIST} "${_gmvq_torch_archs}")
  endif()
  message(STATUS "gmvq_ext: TORCH_CUDA_ARCH_LIST '${_gmvq_torch_archs}' (from GMVQ_CUDA_ARCHITECTURES ${GMVQ_CUDA_ARCHITECTURES})")
endif()
if(GMVQ_BUILD_CUDA)
  set(GMVQ_CUDA_ARCHITECTURES_USED ${GMVQ_CUDA_ARCHITECTURES})
  message(STATUS "gmvq_ext: building CUDA kernels for architectures ${GMVQ_CUDA_ARCHITECTURES}")
else()
  set(GMVQ_CUDA_ARCHITECTURES_USED "")
  message(STATUS "gmvq_ext: CPU-only build (GMVQ_CUDA=${GMVQ_CUDA}, torch CUDA '${GMVQ_TORCH_CUDA_VERSION}')")
endif()

set(GMVQ_NVCC_FLAGS --expt-relaxed-constexpr -O3 -lineinfo)
if(GMVQ_PTXAS_VERBOSE)
  list(APPEND GMVQ_NVCC_FLAGS -Xptxas=-v)
endif()

# After find_package(Torch): the -gencode flags torch appended to
# CMAKE_CUDA_FLAGS are removed, so the target's CUDA_ARCHITECTURES are the
# only architectures built (a macro: it sets the caller's CMAKE_CUDA_FLAGS).
macro(gmvq_drop_torch_gencode_flags)
  string(REGEX MATCHALL "(-gencode[ =]|--generate-code[ =])[^ ]+" _gmvq_torch_gencode "${CMAKE_CUDA_FLAGS}")
  string(REGEX REPLACE "(-gencode[ =]|--generate-code[ =])[^ ]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
  string(REGEX REPLACE "  +" " " CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
  message(STATUS "gmvq_ext: CMAKE_CUDA_FLAGS '${CMAKE_CUDA_FLAGS}' (removed torch's: '${_gmvq_torch_gencode}')")
endmacro()

function(gmvq_configure_cuda_target target)
  # find_package(Torch) resets CMAKE_CUDA_ARCHITECTURES: set them per target.
  # The shared CUDA runtime is the one torch loads (one runtime per process).
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${GMVQ_CUDA_ARCHITECTURES}" CUDA_STANDARD 20
                                             CUDA_RUNTIME_LIBRARY Shared)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:${GMVQ_NVCC_FLAGS}>)
endfunction()

# Every .cu file compiled with nvcc (-c), never linked: catches host and device
# compile errors where there is nvcc but no CUDA torch (the CPU wheel ships the
# c10/cuda and ATen/cuda headers, not the generated CUDA config header).
function(gmvq_add_cuda_compile_check target sources)
  add_library(${target} OBJECT ${sources})
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${GMVQ_CUDA_ARCHITECTURES}" CUDA_STANDARD 20)
  target_include_directories(${target} PRIVATE "${PROJECT_SOURCE_DIR}/csrc/include" ${TORCH_INCLUDE_DIRS})
  target_compile_definitions(${target} PRIVATE C10_CUDA_NO_CMAKE_CONFIGURE_FILE GMVQ_TORCH_VERSION="${GMVQ_TORCH_VERSION}")
  target_compile_options(${target} PRIVATE ${GMVQ_NVCC_FLAGS})
endfunction()
