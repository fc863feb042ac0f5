"""The GPU session script (dev/gpu_session.sh) rehearsed without a GPU: the
CUDA kernels emulated on CPU threads, tiny shapes. It must run end to end,
exit 0 and write the files the device call brings back, so that on the device
the script itself cannot be what fails. Slow (it builds the emulated kernels
when build/emulation is missing or stale)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = {"session.log", "build.log", "smoke.jsonl", "pytest.log", "junit.xml", "sanitizer.log",
         "bench_unfused.json", "bench_quantize.json"}
OPS = ["philox_noise", "codebook_distance", "weighted_softmax", "gumbel_argmax", "aggregated_posterior_entropy",
       "quantize", "quantize_bitwise_repeat", "headline", "large"]


@pytest.mark.slow
def test_gpu_session_rehearsal_writes_every_file_and_every_line_is_ok(tmp_path):
    env = {**os.environ, "GMVQ_GPU_REHEARSAL": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "GPU_SESSION_BUDGET": os.environ.get("GPU_SESSION_BUDGET", "1500")}
    env.pop("PYTHONPATH", None)  # the session puts the emulated package there itself
    result = subprocess.run(["bash", str(REPO / "dev" / "gpu_session.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    # What the device returns: at most 8 files, at most 2 folders below $OUT.
    everything = [p for p in tmp_path.rglob("*")]
    files = [p for p in everything if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(tmp_path).parts) <= 3 for p in files), files
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert {p.name for p in folder.iterdir()} == FILES
    lines = [json.loads(line) for line in (folder / "smoke.jsonl").read_text().splitlines()]
    failed = [line for line in lines if not line.get("ok")]
    assert not failed, failed
    names = [line["name"] for line in lines]
    for op in OPS:
        assert any(name.startswith(op + "/") for name in names), op
    steps = {name.split("/", 1)[1] for name in names if name.startswith("step/")}
    assert {"environment", "build", "smoke", "pytest", "bench_unfused", "bench_quantize"} <= steps
    assert "sanitizer" in names
    timings = [line for line in lines if line.get("kind") == "timing" and "skipped" not in line]
    assert timings and all(line["median_ms"] > 0 and "peak_mib" in line for line in timings)
    # The test rows ran (not all skipped) and the benchmarks wrote their results.
    junit = (folder / "junit.xml").read_text()
    assert 'tests="0"' not in junit
    assert json.loads((folder / "bench_unfused.json").read_text())["results"]
    assert json.loads((folder / "bench_quantize.json").read_text())["results"]
