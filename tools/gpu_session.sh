#!/usr/bin/env bash
# One call on the GPU machine does everything: build with CUDA, the tests, the
# benchmarks and the device's measured ceilings. Run from the repository root:
#   tools/gpu_session.sh                  (writes under $OUT, else ./gpu_session_out)
# Carry build/wheels (tools/fetch_bench_wheels.sh) for the vector-quantize-pytorch
# baseline. Each step has its own time limit, and all of them together stay
# within GPU_SESSION_BUDGET seconds (default 540, 9 minutes).
# At most 7 files are written (the device tool returns 8 at most), in one folder
# named after the device and the date.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9.\n' '_' )
stamp=$(date -u +%Y%m%dT%H%MZ)
dir="${OUT:-$repo/gpu_session_out}/${device:-nogpu}_${stamp}"
mkdir -p "$dir"
log="$dir/session.log"
start=$SECONDS
budget=${GPU_SESSION_BUDGET:-540}  # seconds for the whole session (the device allows 600 a call)

say() { echo "[$((SECONDS - start))s] $*" | tee -a "$log"; }
# step NAME SECONDS LOGFILE COMMAND...: run with a time limit, log, report status.
step() {
  local name=$1 limit=$2 out=$3
  shift 3
  local left=$((budget - (SECONDS - start)))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then say "== $name: skipped, the session budget is spent"; return 125; fi
  say "== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$out" 2>&1
  local rc=$?
  say "== $name: exit $rc$([[ $rc == 124 ]] && echo ' (timed out)')"
  return $rc
}

say "device: ${device:-none}; date: $stamp; repo: $repo"
{ nvidia-smi; echo; "$python" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; nvcc --version | tail -2; } >>"$log" 2>&1

# 1. Build and install (CUDA is detected from the CUDA torch; no isolation:
#    the build must use the torch that runs the tests).
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
step build 210 "$dir/build.log" "$python" -m pip install --no-build-isolation --no-deps -v "$repo" || {
  say "build failed: see build.log"; tail -40 "$dir/build.log" | tee -a "$log"; exit 1; }
# Tests run from outside the tree so that `import gmvq_ext` finds the installed package.
cd /tmp
"$python" -c 'import gmvq_ext, json; print("build_info", json.dumps(gmvq_ext.build_info()))' 2>&1 | tee -a "$log"

# 2. Baseline wheels, if carried: never torch, never a package already installed.
if compgen -G "$repo/build/wheels/*.whl" >/dev/null; then
  for wheel in "$repo"/build/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1)
    if "$python" -m pip show "$name" >/dev/null 2>&1 || [[ $name == torch ]]; then
      say "wheel $name: already installed, kept"
    else
      "$python" -m pip install -q --no-deps --no-index "$wheel" >>"$log" 2>&1 && say "wheel $name: installed"
    fi
  done
fi

# 3. Tests: every CUDA test (no -x: one session should show every failure),
#    then the whole suite as CI runs it.
step "pytest test_cuda.py" 100 "$dir/pytest.log" "$python" -m pytest "$repo/python_tests/test_cuda.py" -q -rs \
  -p no:cacheprovider --junitxml="$dir/junit_cuda.xml"
step "pytest python_tests -x" 70 "$dir/pytest.log" "$python" -m pytest "$repo/python_tests" -x -q -rs \
  -p no:cacheprovider -m "not slow" --deselect "$repo/python_tests/test_cuda.py"
tail -5 "$dir/pytest.log" | tee -a "$log"

# 4. Measured ceilings (METHOD.md): device-to-device copy bandwidth and
#    matrix-product rates through torch (cuBLAS), on random data.
step ceilings 30 "$dir/ceilings.json" "$python" - <<'PY'
import json, torch
def bench(fn, reps=10):
    fn(); torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record(); torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / reps
out = {"device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count}
src = torch.randn(2**28, device="cuda")  # 1 GiB
dst = torch.empty_like(src)
out["copy_bytes_per_s"] = 2 * src.numel() * 4 / bench(lambda: dst.copy_(src))
del src, dst
for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False), ("tf32", torch.float32, True)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    out[f"gemm_{name}_flop_per_s"] = 2 * 8192**3 / bench(lambda: a @ b, reps=5)
torch.backends.cuda.matmul.allow_tf32 = False
print(json.dumps(out, indent=2))
PY
cat "$dir/ceilings.json" >>"$log"

# 5. Benchmarks.
if [[ -f $repo/benchmarks/bench_quantize.py ]]; then
  step bench_quantize 80 "$log" "$python" "$repo/benchmarks/bench_quantize.py" --device cuda \
    --shapes 65536x1024x64,65536x8192x64,262144x16384x64 --dtypes float32,bfloat16 --repeats 5 \
    --out "$dir/bench_quantize.json"
else
  say "benchmarks/bench_quantize.py not in this tree: skipped"
fi
step bench_unfused 50 "$log" "$python" "$repo/benchmarks/bench_unfused.py" --device cuda \
  --shapes 65536x1024x64,16384x8192x64 --dtypes float32,bfloat16 --repeats 5 --out "$dir/bench_unfused.json"

say "done in $((SECONDS - start))s; files in $dir:"
ls -l "$dir" | tee -a "$log"
