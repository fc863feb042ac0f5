#!/usr/bin/env bash
# One call on the GPU machine yields all the evidence, written under $OUT as it
# goes (a step cut short leaves what it wrote). Run from anywhere:
#   bash dev/gpu_session.sh
#   GMVQ_GPU_REHEARSAL=1 OUT=/tmp/rehearsal bash dev/gpu_session.sh   (no GPU: see below)
# Steps, each with its own time limit inside GPU_SESSION_BUDGET seconds (default
# 570, so that the whole call fits a device timeout of about 590), each logged,
# none stopping the rest:
#   1. the toolchain, before anything is built: nvidia-smi, cmake, gcc, nvcc,
#      ninja, Python and its headers, scikit-build-core, pybind11, torch with
#      its CUDA version and architecture list, TORCH_CUDA_ARCH_LIST
#   2. build and install: the CUDA architecture pinned both ways (GMVQ_CUDA_ARCH,
#      default 90, as GMVQ_CUDA_ARCHITECTURES for CMake and, as 9.0, in
#      TORCH_CUDA_ARCH_LIST for torch's own CMake code), nvcc -Xptxas=-v
#      (GMVQ_PTXAS_VERBOSE) so build.log has every kernel's registers, shared
#      memory and spills; then vector-quantize-pytorch's wheels from
#      build/wheels (dev/fetch_bench_wheels.sh), --no-deps --no-index into a
#      folder of their own, never torch
#   3. dev/gpu_smoke.py: the headline timings first, then the ceilings, then
#      every op against the CPU op and the float64 reference, both tile paths,
#      bitwise repeats
#   4. compute-sanitizer memcheck and racecheck, filtered to the gmvq kernels,
#      on one small case per tile path and every unfused op
#   5. the CUDA rows of the test suite, `pytest -m "not slow" -k cuda`
#   6. with the time left: benchmarks/bench_unfused.py, benchmarks/bench_quantize.py
# Files, in one folder $OUT/<gpu>_<date>/ (the device returns 8 files at most,
# 2 folders deep): session.log build.log smoke.jsonl pytest.log junit.xml
# sanitizer.log bench_unfused.json bench_quantize.json. smoke.jsonl also gets a
# line per step ("step/<name>", ok when it exited 0). Exit status: 0 when every
# step did.
#
# Rehearsal (GMVQ_GPU_REHEARSAL=1), on a machine without a GPU: the same script
# and the same files, on the CUDA kernels emulated on CPU threads
# (dev/emulate_cuda.sh --build-only instead of pip install), tiny shapes, the
# CUDA test rows that run there (cuda_emulated; GMVQ_REHEARSAL_PYTEST_K picks
# them), a recorded skip instead of compute-sanitizer, tiny benchmarks; the
# wheels go to a scratch folder, never into the running environment.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
rehearsal=${GMVQ_GPU_REHEARSAL:-0}
export PYTHONUNBUFFERED=1
budget=${GPU_SESSION_BUDGET:-570}
start=$SECONDS

if [[ $rehearsal == 1 ]]; then
  device=rehearsal
else
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9.\n' '_')
fi
stamp=$(date -u +%Y%m%dT%H%MZ)
dir="${OUT:-$repo/gpu_session_out}/${device:-nogpu}_${stamp}"
mkdir -p "$dir"
log="$dir/session.log"
smoke="$dir/smoke.jsonl"
# Scratch outside $OUT (nothing there may come back as a 9th file): the wheels'
# install folder, the working directory of the tests (so that `import
# gmvq_ext` finds the installed package, not the source tree).
work=$(mktemp -d "${TMPDIR:-/tmp}/gmvq_gpu_session.XXXXXX")
failed=0

say() { echo "[$((SECONDS - start))s] $*" | tee -a "$log"; }
record() {  # record NAME OK(true|false) EXIT SECONDS [NOTE]: one line in smoke.jsonl
  printf '{"name": "step/%s", "ok": %s, "exit": %s, "seconds": %s, "note": "%s"}\n' "$1" "$2" "$3" "$4" "${5:-}" \
    >>"$smoke"
}
# step NAME SECONDS LOGFILE COMMAND...: run with a time limit (SIGINT first, so that
# pytest still writes its report; KILL 15 s later), log and record the status.
step() {
  local name=$1 limit=$2 out=$3
  shift 3
  # A rehearsal runs the CUDA code emulated on the CPU, on a machine that may be
  # shared: three times the device's limits (the budget still caps them).
  ((rehearsal == 1)) && limit=$((limit * 3))
  local left=$((budget - (SECONDS - start) - 15))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    say "== $name: skipped, the session budget is spent"
    record "$name" false 125 0 "skipped: budget spent"
    failed=1
    return 125
  fi
  say "== $name (limit ${limit}s)"
  local began=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$out" 2>&1
  local rc=$?
  local note=""
  ((rc == 124 || rc == 130 || rc == 137)) && note="timed out after ${limit}s"
  say "== $name: exit $rc ${note:+($note)} in $((SECONDS - began))s"
  if ((rc == 0)); then record "$name" true 0 $((SECONDS - began)); else record "$name" false $rc $((SECONDS - began)) "$note"; failed=1; fi
  return $rc
}

# The CUDA architecture, pinned both ways: CMake builds exactly
# GMVQ_CUDA_ARCHITECTURES (and drops any -gencode torch's CMake code adds), and
# torch's CMake code is handed the same list, so it never probes the GPU or
# falls back to its multi-architecture default.
arch=${GMVQ_CUDA_ARCH:-90}
if [[ $arch =~ ^([0-9]+)([0-9])([af]?)$ ]]; then  # 90 -> 9.0, 90a -> 9.0a
  export TORCH_CUDA_ARCH_LIST="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
fi

say "gpu session: device ${device:-none}; date $stamp; repo $repo; budget ${budget}s; rehearsal $rehearsal"

# 1. The toolchain, logged before anything is built (a failed build names its cause).
{
  echo "--- nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "--- host"; uname -a; nproc; free -g 2>/dev/null | head -2; df -h "$work" 2>/dev/null | tail -1
  echo "--- cmake"; cmake --version 2>&1 | head -1
  echo "--- gcc"; gcc --version 2>&1 | head -1; g++ --version 2>&1 | head -1
  echo "--- nvcc ($(command -v nvcc || echo none))"; nvcc --version 2>&1 | tail -2
  echo "--- ninja"; ninja --version 2>&1
  echo "--- python and its headers"
  "$python" -c 'import os, sys, sysconfig; inc = sysconfig.get_paths()["include"]; print("python", sys.version.split()[0], sys.executable); print("headers", inc, "Python.h present:", os.path.exists(os.path.join(inc, "Python.h")))' 2>&1
  echo "--- torch"
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available()); print("arch list", torch.cuda.get_arch_list()); print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch.cuda.get_device_capability() if torch.cuda.is_available() else None)' 2>&1
  echo "--- architectures: GMVQ_CUDA_ARCH $arch, TORCH_CUDA_ARCH_LIST ${TORCH_CUDA_ARCH_LIST:-unset}"
  echo "--- compute-sanitizer"; compute-sanitizer --version 2>&1 | tail -1 || true
  echo "--- packages"
  "$python" -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|scikit-build-core|pybind11|ninja|cmake|pytest|pytest-xdist|pytest-timeout|einops|scipy|vector-quantize-pytorch) ' || true
} >>"$log" 2>&1
record environment true 0 $((SECONDS - start))

# 2. Build and install.
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if [[ $rehearsal == 1 ]]; then
  # The CUDA kernels compiled as C++ for the CPU (incremental, in build/emulation).
  if step build 600 "$dir/build.log" bash "$repo/dev/emulate_cuda.sh" --build-only; then
    export PYTHONPATH="$repo/build/emulation/pkg${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  # No isolation: the build must use the torch that runs the tests.
  step build 220 "$dir/build.log" "$python" -m pip install --no-build-isolation --no-deps -v \
    -Ccmake.define.GMVQ_CUDA=ON -Ccmake.define.GMVQ_CUDA_ARCHITECTURES="$arch" \
    -Ccmake.define.GMVQ_PTXAS_VERBOSE=ON "$repo"
  say "ptxas: $(grep -c 'ptxas info *: Used' "$dir/build.log") kernel reports, $(grep -E 'bytes spill' "$dir/build.log" | grep -vc ' 0 bytes spill stores, 0 bytes spill loads') with spills, $(grep -E 'bytes stack frame' "$dir/build.log" | grep -vEc '(^|[^0-9])0 bytes stack frame') with a stack frame (full lines in build.log)"
fi
cd "$work"
"$python" -c 'import gmvq_ext, json; print("build_info", json.dumps(gmvq_ext.build_info()), gmvq_ext.__file__)' 2>&1 | tee -a "$log"

# Baseline wheels, if carried: into a folder of their own, never torch, never a
# package the environment already has.
site="$work/site"
if compgen -G "$repo/build/wheels/*.whl" >/dev/null; then
  wheels=()
  for wheel in "$repo"/build/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1)
    version=$(basename "$wheel" | cut -d- -f2)
    installed=$("$python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    if [[ ${name,,} == torch || ${name,,} == numpy ]]; then
      say "wheel $name: never installed here"
    elif [[ -n $installed ]] && "$python" -c '
import sys
try:
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.version import Version
sys.exit(Version(sys.argv[1]) < Version(sys.argv[2]))' "$installed" "$version"; then
      say "wheel $name: $installed already installed, kept"
    else
      wheels+=("$wheel")
    fi
  done
  if ((${#wheels[@]})); then
    if "$python" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --target "$site" "${wheels[@]}" >>"$log" 2>&1; then
      say "wheels installed in $site: $(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1; done | tr '\n' ' ')"
      export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site"
    else
      say "wheels: install failed (see above); vector-quantize-pytorch will be skipped"
    fi
  fi
else
  say "no wheels in build/wheels (dev/fetch_bench_wheels.sh): vector-quantize-pytorch is skipped unless installed"
fi

# 3. Smoke: the headline timings, the ceilings, every op on both tile paths (one process).
step smoke 150 "$log" "$python" "$repo/dev/gpu_smoke.py" --out "$smoke"
say "smoke: $(grep -c '"ok": true' "$smoke") ok lines, $(grep -c '"ok": false' "$smoke") failed lines in smoke.jsonl"

# 4. compute-sanitizer on the gmvq kernels only (torch's own kernels are not
#    instrumented: they cost most of an unfiltered run's time), one small case
#    per tile path and every unfused op, with no caching allocator: each
#    tensor its own allocation, so an overrun past it is seen.
if [[ $rehearsal == 1 ]]; then
  echo "rehearsal: compute-sanitizer skipped (no device)" >>"$dir/sanitizer.log"
  printf '{"name": "sanitizer", "ok": true, "skipped": "rehearsal: no device"}\n' >>"$smoke"
elif ! command -v compute-sanitizer >/dev/null; then
  echo "compute-sanitizer not found" >>"$dir/sanitizer.log"
  record sanitizer false 127 0 "compute-sanitizer not found"
  failed=1
else
  filter=()
  if compute-sanitizer --help 2>&1 | grep -q -- '--kernel-name'; then
    filter=(--kernel-name kns=gmvq)
  else
    echo "this compute-sanitizer has no --kernel-name: every kernel is checked" >>"$dir/sanitizer.log"
  fi
  for tool in memcheck racecheck; do
    echo "=== $tool ${filter[*]}" >>"$dir/sanitizer.log"
    step "sanitizer_$tool" 45 "$dir/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
      --tool $tool "${filter[@]}" --error-exitcode 3 --print-limit 20 "$python" "$repo/dev/gpu_smoke.py" --sanitizer-cases
  done
fi

# 5. The CUDA rows of every op's test file, the slow ones left out. Files that
#    need the sample data (shared/data, absent on the device) hold no CUDA
#    test: not collected.
# A file needs the data when it names SAMPLE_DATA or imports another test module
# (test_train's runs, image_folders): those all train on the samples.
ignores=()
for f in "$repo"/python_tests/test_*.py; do
  grep -qE 'SAMPLE_DATA|^from (test_[a-z_]+|image_folders) import' "$f" && ignores+=(--ignore "$f")
done
if [[ $rehearsal == 1 ]]; then
  # The bitwise-repeat rows (the others are the smoke's checks again, or the device-side
  # assert, which failed once in a CI rehearsal for a reason not yet found).
  select=${GMVQ_REHEARSAL_PYTEST_K:-cuda_emulated and bitwise}
  workers=2
else
  select=cuda
  workers=4
fi
# pytest-xdist and pytest-timeout are on the device image; elsewhere (a CI venv
# with the test extras only) the step runs without them rather than failing.
plugin_args=()
"$python" -c 'import xdist' 2>/dev/null && plugin_args+=(-n "$workers")
"$python" -c 'import pytest_timeout' 2>/dev/null && plugin_args+=(--timeout 60)
step pytest 100 "$dir/pytest.log" "$python" -m pytest "$repo/python_tests" -m "not slow" -k "$select" \
  "${plugin_args[@]}" -p no:cacheprovider -rfE --rootdir "$repo" --junitxml="$dir/junit.xml" "${ignores[@]}"
tail -3 "$dir/pytest.log" | tee -a "$log"

# 6. With the time left: the unfused ops, then the rest of bench_quantize (the
#    headline shape's baselines are in smoke.jsonl). Both write their JSON after
#    every row or case.
if [[ $rehearsal == 1 ]]; then
  step bench_unfused 120 "$log" "$python" "$repo/benchmarks/bench_unfused.py" --device cpu --shapes 24x16x8 \
    --dtypes float32 --repeats 1 --out "$dir/bench_unfused.json"
  step bench_quantize 180 "$log" "$python" "$repo/benchmarks/bench_quantize.py" --device cpu --shapes 32x16x8 \
    --dtypes float32 --temperatures 1 --cases fused,reference_noise --repeats 1 --timeout 120 \
    --out "$dir/bench_quantize.json"
else
  step bench_unfused 60 "$log" "$python" "$repo/benchmarks/bench_unfused.py" --device cuda \
    --shapes 65536x1024x64,16384x8192x64 --dtypes float32,bfloat16 --repeats 5 --out "$dir/bench_unfused.json"
  step bench_quantize 600 "$log" "$python" "$repo/benchmarks/bench_quantize.py" --device cuda \
    --shapes 65536x8192x64,262144x16384x64 --dtypes float32,bfloat16 --temperatures 1 \
    --cases fused,reference_noise,reference_compiled,vqtorch --repeats 5 --timeout 60 --out "$dir/bench_quantize.json"
fi

say "done in $((SECONDS - start))s (exit $failed); files in $dir:"
ls -l "$dir" | tee -a "$log"
rm -rf "$work"
exit $failed
