"""Speed and peak memory of the fused gmvq::quantize (forward + backward)
against the plain-PyTorch reference and vector-quantize-pytorch.

Every case (implementation x shape x dtype) runs in a fresh subprocess, so a
crash, an out-of-memory or a timeout is reported for that case alone and peak
memory is measured from a clean process:
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
        minus the memory allocated once the inputs exist.
  CPU:  VmHWM (peak resident set) after resetting it with
        `echo 5 > /proc/self/clear_refs` once the inputs exist, minus VmRSS
        at that moment; i.e. the most memory the case added on top of its inputs.
Times are medians of --repeats runs after --warmup runs (CUDA: events around
each run, synchronised).

--rounds R runs every case R times, in rounds (each round starts at the next
case): on a shared machine whose speed drifts over minutes, a case and the
fused op measured seconds apart are compared, not minutes apart. A case's
time is the median of its per-round medians, its speed-up the median of the
per-round ratios (their range is reported too), its peak memory the largest.

Cases, all training mode with weight (N, D), sigma_z2 0.5, at each of
--temperatures (1 and GM-VQ's final 0.05 by default: at a cold temperature far
more of each row underflows), random upstream gradients on z_out, q_bar and
latent_reg; every case in the process's default floating-point mode (no
flush-to-zero set by the benchmark: what a library does itself is measured):
  fused               torch.ops.gmvq.quantize + its backward, hard straight-through
  reference           reference.quantize generating its own Philox noise (int64 tensor arithmetic)
  reference_noise     reference.quantize given precomputed noise: the fair eager baseline
  reference_compiled  torch.compile(reference.quantize), given precomputed noise
  vqtorch             vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K), training forward +
                      backward of quantized.sum() + loss: Euclidean nearest code (no weight, no
                      Gumbel noise, no q_bar), EMA codebook update, commitment loss; same N, K, D.

Usage:
  python benchmarks/bench_quantize.py --device cpu --shapes 16384x1024x64,16384x8192x64 \\
      --dtypes float32 --temperatures 1,0.05 --repeats 5 --out benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run from a source tree (dev/dev_build.sh) as well as against an installed gmvq_ext.
try:
    import gmvq_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ["fused", "reference", "reference_noise", "reference_compiled", "vqtorch"]
SEED, OFFSET, SIGMA_Z2 = 1, 0, 0.5
# The x86 features that decide the CPU kernels' speed, recorded with every result.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


# ---------------------------------------------------------------------------
# One case, in its own process
# ---------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build_inputs(torch, case, n, k, d, dtype, device):
    from gmvq_ext import reference

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = torch.nn.functional.softplus(torch.randn(n, d, generator=gen)).to(device=device, dtype=dtype)
    weight.requires_grad_()
    codebook = torch.randn(k, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    acc = reference.accumulation_dtype(dtype)
    grads = (torch.randn(n, d, generator=gen).to(device=device, dtype=dtype),
             torch.randn(k, generator=gen).to(device=device, dtype=acc),
             torch.randn(n, generator=gen).to(device=device, dtype=acc))
    noise = (None, None)
    if case in ("reference_noise", "reference_compiled"):
        noise = (reference.gumbel_noise((SEED, OFFSET), n, k, device),
                 reference.gaussian_noise((SEED, OFFSET), n, d, device))
    return z, weight, codebook, grads, noise


def _make_step(torch, case, n, k, d, dtype, device, temperature):
    """A closure running one forward + backward, and the tensors it keeps alive."""
    import gmvq_ext
    from gmvq_ext import reference

    if case == "vqtorch":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=d, codebook_size=k).to(device=device, dtype=dtype).train()
        x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        x.requires_grad_()

        def step():
            quantized, _, loss = vq(x)
            (quantized.sum() + loss).backward()

        return step, (vq, x)

    z, weight, codebook, grads, noise = _build_inputs(torch, case, n, k, d, dtype, device)
    fn = {
        "fused": gmvq_ext.ops.quantize,
        "reference": reference.quantize,
        "reference_noise": reference.quantize,
        "reference_compiled": torch.compile(reference.quantize, dynamic=False),
    }[case]
    # The scalars as the module passes them: tensors on the inputs' device.
    temperature = torch.tensor(temperature, device=device)
    noise_state = gmvq_ext.ops.noise_state(SEED, OFFSET, device=device)

    def step():
        z_out, _, q_bar, latent_reg = fn(z, weight, codebook, temperature, SIGMA_Z2, True, True, noise_state,
                                         *noise)[:4]
        torch.autograd.backward([z_out, q_bar, latent_reg], list(grads))
        for t in (z, weight, codebook):
            t.grad = None

    return step, (z, weight, codebook, grads, noise)


def run_case(case, n, k, d, dtype_name, device, warmup, repeats, temperature=1.0, memory_limit_gb=None) -> dict:
    if memory_limit_gb:  # a shared machine: fail this case (reported as OOM) rather than the machine
        import resource

        limit = int(memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    dtype = getattr(torch, dtype_name)
    step, keep_alive = _make_step(torch, case, n, k, d, dtype, device, temperature)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
        _reset_peak_rss()
    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(repeats):
        cpu_start = time.process_time()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() - base if cuda else _status_kib("VmHWM") * 1024 - base
    del keep_alive
    # CPU seconds of the whole process per run (all threads): less sensitive than
    # wall time to other load on a shared machine, but it counts spin-waiting.
    return {"status": "ok", "median_s": statistics.median(times), "times_s": times,
            "median_cpu_s": None if cuda else statistics.median(cpu_times), "peak_bytes": peak}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------
def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_description() -> dict:
    """Vendor, model and the flags in CPU_FLAGS: Intel and AMD cores differ in
    what costs time (subnormal operands, for one), so every figure names its CPU."""
    fields = _cpuinfo()
    flags = set(fields.get("flags", "").split())
    return {"cpu_vendor": fields.get("vendor_id", platform.machine()),
            "cpu_model": fields.get("model name", platform.processor() or "unknown"),
            "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS}}


def machine_info(device: str) -> dict:
    import torch

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **cpu_description(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": list(os.getloadavg()),
    }
    try:
        import vector_quantize_pytorch  # noqa: F401
        from importlib.metadata import version

        info["vector_quantize_pytorch"] = version("vector-quantize-pytorch")
    except Exception:  # noqa: BLE001 - informational only
        info["vector_quantize_pytorch"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def spawn_case(case, shape, dtype, temperature, args) -> dict:
    n, k, d = shape
    command = [sys.executable, __file__, "--_case", case, "--_shape", f"{n}x{k}x{d}", "--dtypes", dtype,
               "--temperatures", str(temperature), "--device", args.device, "--warmup", str(args.warmup),
               "--repeats", str(args.repeats)]
    if args.memory_limit_gb:
        command += ["--memory-limit-gb", str(args.memory_limit_gb)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over --timeout {args.timeout} s"}
    wall = time.perf_counter() - started
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["process_wall_s"] = wall
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    out_of_memory = done.returncode in (-9, 137) or any(
        "out of memory" in line.lower() or "can't allocate memory" in line.lower() for line in tail)
    return {"status": "oom" if out_of_memory else "error", "returncode": done.returncode, "error": " | ".join(tail)}


def combine_rounds(rounds: list) -> dict:
    """One case's per-round results as one: median time, largest peak, every round kept."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if not ok:
        return dict(rounds[-1], rounds=rounds)
    cpu = [r["median_cpu_s"] for r in ok if r.get("median_cpu_s") is not None]
    return {"status": "ok", "median_s": statistics.median(r["median_s"] for r in ok),
            "times_s": [t for r in ok for t in r["times_s"]],
            "median_cpu_s": statistics.median(cpu) if cpu else None,
            "peak_bytes": max(r["peak_bytes"] for r in ok), "rounds": rounds}


def speedups(row: dict, case: str) -> list:
    """case time / fused time, per round where both ran."""
    fused, other = row["cases"].get("fused"), row["cases"].get(case)
    if not fused or not other:
        return []
    pairs = zip(fused.get("rounds", [fused]), other.get("rounds", [other]))
    return [o["median_s"] / f["median_s"] for f, o in pairs if f["status"] == "ok" and o["status"] == "ok"]


def _fmt_time(r):
    return f"{r['median_s'] * 1e3:.1f}" if r["status"] == "ok" else r["status"].upper()


def _fmt_mem(r):
    return f"{r['peak_bytes'] / 2**20:.0f}" if r["status"] == "ok" else "-"


def markdown_table(results, info) -> str:
    lines = [
        f"Device: {info.get('gpu') or info['cpu_model']} ({info['cpu_vendor']}; flags "
        f"{' '.join(flag if present else 'no-' + flag for flag, present in info['cpu_flags'].items())}; "
        f"{info['cpu_cores']} cores, {info['torch_threads']} torch "
        f"threads), torch {info['torch_version']}, {info['date_utc']}, load average at start "
        f"{info['load_average_1_5_15'][0]:.2f}.",
        "",
        "Forward + backward, training, hard, weight (N, D), at temperature T. Time: median wall ms (CUDA: events); process CPU: "
        "median CPU ms of all the process's threads (CPU runs only); memory: peak MiB above the inputs. "
        "Speed-up = case time / fused time, the median over rounds of the ratio within a round (range in "
        "brackets); memory ratio = fused peak / case peak (same run). Rounds: "
        f"{max((len(c.get('rounds', [c])) for row in results for c in row['cases'].values()), default=1)}.",
        "",
        "| N x K x D | dtype | T | case | time ms | process CPU ms | peak MiB | fused speed-up | fused memory ratio |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results:
        fused = row["cases"].get("fused", {"status": "missing"})
        for case in CASES:
            r = row["cases"].get(case)
            if r is None:
                continue
            speed = mem = "-"
            ratios = speedups(row, case) if case != "fused" else []
            if ratios:
                speed = f"{statistics.median(ratios):.2f}x"
                if len(ratios) > 1:
                    speed += f" [{min(ratios):.2f}-{max(ratios):.2f}]"
            if case != "fused" and r["status"] == "ok" and fused["status"] == "ok":
                if r["peak_bytes"] > 0:
                    mem = f"{fused['peak_bytes'] / r['peak_bytes']:.3f}"
            cpu = f"{r['median_cpu_s'] * 1e3:.0f}" if r.get("median_cpu_s") is not None else "-"
            lines.append(f"| {row['shape']} | {row['dtype']} | {row['temperature']:g} | {case} | {_fmt_time(r)} | {cpu} | {_fmt_mem(r)} | {speed} "
                         f"| {mem} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", default="16384x1024x64", help="comma-separated NxKxD")
    parser.add_argument("--dtypes", default="float32", help="comma-separated torch dtypes")
    parser.add_argument("--temperatures", default="1,0.05", help="comma-separated temperatures")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="run every case this many times, interleaved")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case (its whole subprocess)")
    parser.add_argument("--memory-limit-gb", type=float, help="CPU: address-space limit per case (RLIMIT_AS)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    parser.add_argument("--_shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._case:  # child process: one case
        n, k, d = (int(v) for v in args._shape.split("x"))
        result = run_case(args._case, n, k, d, args.dtypes, args.device, args.warmup, args.repeats,
                          float(args.temperatures), args.memory_limit_gb if args.device == "cpu" else None)
        print("RESULT " + json.dumps(result), flush=True)
        return

    info = machine_info(args.device)
    results = []
    for shape_text in args.shapes.split(","):
        shape = tuple(int(v) for v in shape_text.split("x"))
        for dtype in args.dtypes.split(","):
            for temperature in (float(t) for t in args.temperatures.split(",")):
                row = {"shape": shape_text, "dtype": dtype, "temperature": temperature, "cases": {}}
                results.append(row)
                run_row(args, info, results, row, shape)
    info["load_average_1_5_15_at_end"] = list(os.getloadavg())
    print(write_outputs(args, info, results))


def run_row(args, info: dict, results: list, row: dict, shape: tuple) -> None:
    """Every case of one (shape, dtype, temperature), in --rounds interleaved rounds."""
    cases = args.cases.split(",")
    rounds: dict = {case: [] for case in cases}
    label = f"{row['shape']} {row['dtype']} T={row['temperature']:g}"
    for round_index in range(args.rounds):
        for position in range(len(cases)):
            case = cases[(round_index + position) % len(cases)]
            rounds[case].append(spawn_case(case, shape, row["dtype"], row["temperature"], args))
            r = rounds[case][-1]
            print(f"{label} round {round_index + 1}/{args.rounds} {case}: {_fmt_time(r)} ms, {_fmt_mem(r)} MiB"
                  + ("" if r["status"] == "ok" else f"  ({r.get('error', '')})"), file=sys.stderr, flush=True)
            row["cases"] = {c: combine_rounds(rounds[c]) for c in cases if rounds[c]}
            write_outputs(args, info, results)  # after every case: a run cut short keeps what it measured


def write_outputs(args, info: dict, results: list) -> str:
    table = markdown_table(results, info)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()
                                                                   if not k.startswith("_")},
                                        "results": results}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
