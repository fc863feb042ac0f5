"""benchmarks/bench_quantize.py at a tiny shape: every case in its own
process, --rounds interleaving the cases, and the table's speed-up being the
median of the per-round ratios."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_quantize.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_quantize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_interleave_cases_and_report_the_median_ratio(tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    result = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "64x16x8", "--cases", "fused,reference_noise",
                             "--temperatures", "0.05", "--repeats", "2", "--rounds", "2", "--timeout", "300", "--out", str(out),
                             "--markdown", str(table)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each round starts at the next case.
    order = [line.split(" round ")[1].split(": ")[0] for line in result.stderr.splitlines() if " round " in line]
    assert order == ["1/2 fused", "1/2 reference_noise", "2/2 reference_noise", "2/2 fused"]
    document = json.loads(out.read_text())
    (row,) = document["results"]
    assert row["temperature"] == 0.05
    # Every result names its CPU: vendor, model and the flags that decide the kernels' speed.
    machine = document["machine"]
    assert machine["cpu_vendor"] and machine["cpu_model"]
    assert set(machine["cpu_flags"]) == {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}
    fused, reference = row["cases"]["fused"], row["cases"]["reference_noise"]
    for case in (fused, reference):
        assert case["status"] == "ok" and len(case["rounds"]) == 2 and len(case["times_s"]) == 4
        assert case["median_s"] == statistics.median(r["median_s"] for r in case["rounds"])
        assert case["peak_bytes"] == max(r["peak_bytes"] for r in case["rounds"])
    ratios = [r["median_s"] / f["median_s"] for f, r in zip(fused["rounds"], reference["rounds"])]
    line = next(line for line in table.read_text().splitlines() if "| reference_noise |" in line)
    assert line.startswith("| 64x16x8 | float32 | 0.05 | reference_noise |")
    assert f"| {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] |" in line
    assert "Rounds: 2." in table.read_text()


def test_a_failed_round_is_kept_and_left_out_of_the_ratios():
    bench = _bench_module()
    ok = {"status": "ok", "median_s": 2.0, "times_s": [2.0], "median_cpu_s": 4.0, "peak_bytes": 10}
    failed = {"status": "timeout", "error": "over --timeout"}
    row = {"cases": {"fused": bench.combine_rounds([dict(ok, median_s=1.0), dict(ok, median_s=1.0)]),
                     "vqtorch": bench.combine_rounds([failed, ok])}}
    assert row["cases"]["vqtorch"]["status"] == "ok" and len(row["cases"]["vqtorch"]["rounds"]) == 2
    assert bench.speedups(row, "vqtorch") == [2.0]
    assert bench.combine_rounds([failed])["status"] == "timeout"
