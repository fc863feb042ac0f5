#!/usr/bin/env bash
# Download vector-quantize-pytorch (the benchmark's baseline) and every
# dependency it pulls in, as wheels for the GPU machine (CPython 3.12,
# x86-64 manylinux), into build/wheels (ignored by git, carried to the device:
# the device machine has no package registry). torch, whatever torch itself
# requires, and numpy are left out: the device image has them, and a second
# torch must never be installed there.
# Usage: dev/fetch_bench_wheels.sh [version]   (default: the newest)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dest=build/wheels
mkdir -p "$dest"
spec="vector-quantize-pytorch${1:+==$1}"

platform_args=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any)

# Names never fetched: torch, its own requirements, numpy.
skip=$("$python" - <<'PY'
import re
from importlib import metadata
names = {"torch", "numpy", "triton"}
try:
    for req in metadata.requires("torch") or []:
        names.add(re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0])
except metadata.PackageNotFoundError:
    pass
print(" ".join(sorted(n.lower().replace("_", "-") for n in names)))
PY
)

normalise() { echo "$1" | tr 'A-Z_' 'a-z-'; }
declare -A seen=()
queue=("$spec")
while ((${#queue[@]})); do
  req=${queue[0]}
  queue=("${queue[@]:1}")
  name=$(normalise "$(echo "$req" | sed -E 's/[ ;<>=!~\[].*//')")
  [[ -n ${seen[$name]:-} ]] && continue
  seen[$name]=1
  if [[ " $skip " == *" $name "* || $name == nvidia-* ]]; then
    echo "skip $name (torch or what torch brings)"
    continue
  fi
  echo "fetch $req"
  "$python" -m pip download --quiet --no-deps "${platform_args[@]}" -d "$dest" "$req"
  wheel=$(ls -t "$dest"/$(echo "$name" | tr '-' '_')-*.whl 2>/dev/null | head -1 || true)
  [[ -z $wheel ]] && wheel=$(ls -t "$dest"/*.whl | head -1)
  # Requirements of this wheel that apply on the device (Linux x86-64,
  # CPython 3.12), without optional extras.
  while IFS= read -r dep; do
    [[ -n $dep ]] && queue+=("$dep")
  done < <(unzip -p "$wheel" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | "$python" -c '
import sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
for line in sys.stdin:
    req = Requirement(line.strip())
    if req.marker is None or req.marker.evaluate(env):
        print(req.name + str(req.specifier))
')
done
ls -l "$dest"
