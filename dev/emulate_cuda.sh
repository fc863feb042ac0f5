#!/usr/bin/env bash
# Check the CUDA kernels' logic without a GPU: compile csrc/cuda/*.cu as C++
# with GMVQ_CUDA_EMULATION (dev/emulation/cuda_emulation.h: CUDA threads
# become CPU threads), registered for the CPU dispatch key and built as
# gmvq_ext._C in a package copy under build/emulation, then run the CPU test
# suites against it: every test that runs ops on CPU tensors now runs the CUDA
# kernels' code. Slow (each CUDA thread is an OS thread): keep the tests small.
# Usage: dev/emulate_cuda.sh [pytest args...]   (default: python_tests -x -q)
#        dev/emulate_cuda.sh --build-only        (print the package directory to put on PYTHONPATH)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
out=$repo/build/emulation
mkdir -p "$out/obj" "$out/pkg/gmvq_ext"
read -r torch_dir torch_version ext_suffix pybind_inc py_inc < <("$python" -c '
import os, sysconfig, torch, pybind11
print(os.path.dirname(torch.__file__), torch.__version__, sysconfig.get_config_var("EXT_SUFFIX"),
      pybind11.get_include(), sysconfig.get_paths()["include"])')
flags=(-std=c++20 -O1 -g0 -fPIC -ffp-contract=off -fno-math-errno -D_GLIBCXX_USE_CXX11_ABI=1 -DGMVQ_CUDA_EMULATION
  -DGMVQ_TORCH_VERSION="\"$torch_version\"" -DGMVQ_WITH_CUDA=0 -DGMVQ_CUDA_ARCHS="\"emulated\""
  -I "$repo/csrc/include" -I "$repo/dev/emulation" -I "$torch_dir/include" -I "$torch_dir/include/torch/csrc/api/include"
  -I "$pybind_inc" -I "$py_inc" -Wno-attributes)
objects=()
for src in "$repo"/csrc/*.cpp "$repo"/csrc/cuda/*.cu; do
  obj="$out/obj/$(basename "$src").o"
  objects+=("$obj")
  # Rebuild when the source or a project header it includes (g++ -MMD) is newer than the object.
  stale=0
  if [[ ! -f $obj || ! -f $obj.d ]]; then
    stale=1
  else
    for dep in $(sed -e 's/^[^:]*://' -e 's/\\$//' "$obj.d"); do
      if [[ $dep == "$repo"/* && $dep -nt $obj ]]; then stale=1; break; fi
    done
  fi
  if ((stale)); then
    echo "compile $(basename "$src")" >&2
    g++ "${flags[@]}" -MMD -MF "$obj.d" -x c++ -c "$src" -o "$obj"
  fi
done
g++ -shared -o "$out/pkg/gmvq_ext/_C$ext_suffix" "${objects[@]}" -L "$torch_dir/lib" -lc10 -ltorch -ltorch_cpu \
  -Wl,-rpath,"$torch_dir/lib" -lpthread
# The Python package (modules and subpackages) beside the emulated _C.
for f in "$repo"/gmvq_ext/*; do
  case $(basename "$f") in _C*.so | _build_info.py | __pycache__) continue ;; esac
  ln -sfn "$f" "$out/pkg/gmvq_ext/"
done
printf 'TORCH_VERSION = "%s"\nTORCH_CUDA_VERSION = ""\nWITH_CUDA = False\nCUDA_ARCHITECTURES = "emulated"\n' \
  "$torch_version" >"$out/pkg/gmvq_ext/_build_info.py"
if [[ ${1:-} == --build-only ]]; then
  echo "$out/pkg"
  exit 0
fi
# Run from outside the tree so that gmvq_ext is the emulated package; test
# paths given relative to the caller's directory (python_tests/test_x.py::t)
# become absolute first.
args=()
for arg in "$@"; do
  if [[ $arg != -* && $arg != /* && -e ${arg%%::*} ]]; then arg=$PWD/$arg; fi
  args+=("$arg")
done
set -- "${args[@]}"
cd "$out"
(($# == 0)) && set -- "$repo/python_tests" -x -q
PYTHONPATH="$out/pkg" "$python" -m pytest -p no:cacheprovider --rootdir "$repo" "$@"
