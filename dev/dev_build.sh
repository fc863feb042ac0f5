#!/usr/bin/env bash
# Incremental in-place build for development: compiles into build/dev and
# links the library into gmvq_ext/, so `python -m pytest` runs on the tree.
# Usage: dev/dev_build.sh [extra cmake -D options]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$python")" \
  -DGMVQ_CUDA=OFF "$@" >/dev/null
cmake --build build/dev
ln -sf "$(ls "$PWD"/build/dev/_C*.so)" gmvq_ext/
ln -sf "$PWD/build/dev/_build_info.py" gmvq_ext/_build_info.py
