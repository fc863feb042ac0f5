"""Each unfused gmvq op, forward + backward, against its eager reference.

For every (op, shape, dtype): the median time of forward + backward over
--repeats runs, peak device memory (CUDA), achieved FLOP/s (the GEMM-like
work of the op, where it has any) and bytes/s (the fewest bytes the op must
move: each input read once, each output written once), for the kernel and
for the eager reference (gmvq_ext.reference on the same device), plus the
kernel's largest relative error against the reference. JSON out.

    python benchmarks/bench_unfused.py --device cuda --shapes 65536x1024x64 --dtypes float32,bfloat16
    python benchmarks/bench_unfused.py --device cpu --shapes 512x64x16 --repeats 3 --out /tmp/u.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

try:
    import gmvq_ext
except ModuleNotFoundError:  # run from a source tree built in place (dev/dev_build.sh)
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import gmvq_ext
from gmvq_ext import ops, reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def parse_shape(text: str) -> tuple[int, int, int]:
    n, k, d = (int(x) for x in text.lower().split("x"))
    return n, k, d


def make_inputs(n, k, d, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(n, d, generator=gen).to(device, dtype)
    w = torch.nn.functional.softplus(torch.randn(n, d, generator=gen)).to(device, dtype)
    e = torch.randn(k, d, generator=gen).to(device, dtype)
    logits = (torch.randn(n, k, generator=gen) * 2).to(device, dtype)
    return z, w, e, logits


def op_cases(n, k, d, dtype, device):
    """(name, kernel fn, reference fn, leaf inputs, flops, bytes) per op; fns return output tuples."""
    z, w, e, logits = make_inputs(n, k, d, dtype, device)
    isz = torch.finfo(dtype).bits // 8
    asz = 8 if dtype == torch.float64 else 4
    nk, nd, kd = n * k, n * d, k * d
    codebook_in = (2 * nd + kd) * isz
    temperature = torch.tensor(0.5, device=device)
    key = ops.noise_state(1, 2, device=device)
    return [
        ("codebook_distance", lambda a, b, c: (ops.codebook_distance(a, b, c),),
         lambda a, b, c: (reference.codebook_distance(a, b, c),), (z, w, e),
         # forward: (wz) E^T and w (E*E)^T; backward: G E, G (E*E), G^T (wz), G^T w
         12 * nk * d, codebook_in + nk * asz + nk * asz + codebook_in * 2),
        ("weighted_softmax", lambda a, b, c: ops.weighted_softmax(a, b, c, temperature),
         lambda a, b, c: reference.weighted_softmax(a, b, c, temperature), (z, w, e),
         12 * nk * d, codebook_in + nk * asz + 3 * nk * asz + codebook_in * 2),
        # The ops' schema: temperature a 0-dim tensor, the noise key an int64 [seed, offset].
        ("gumbel_argmax", lambda a: ops.gumbel_argmax(a, temperature, True, key, None)[:1],
         lambda a: reference.gumbel_argmax(a, temperature, True, key, None)[:1], (logits,),
         0, nk * isz + nk * asz + n * 8 + nk * asz + nk * isz),
        ("aggregated_posterior_entropy", lambda a: ops.aggregated_posterior_entropy(a),
         lambda a: reference.aggregated_posterior_entropy(a), (logits,),
         0, nk * isz + k * asz + nk * isz + nk * isz),
    ]


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fwd_bwd(fn, inputs, upstream, device, repeats):
    """Median seconds of forward + backward, and peak memory in bytes (CUDA)."""
    leaves = [t.detach().requires_grad_() for t in inputs]

    def step():
        outputs = fn(*leaves)
        loss = sum((o.float() * u).sum() for o, u in zip(outputs, upstream))
        torch.autograd.grad(loss, leaves)

    step()  # warm-up (and lazy initialisation)
    step()
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else None
    return statistics.median(times), peak


def max_relative_error(fn, ref_fn, inputs):
    with torch.no_grad():
        outs, refs = fn(*inputs), ref_fn(*inputs)
        errs = []
        for o, r in zip(outs, refs):
            o, r = o.double(), r.double()
            errs.append(((o - r).norm() / r.norm().clamp_min(1e-30)).item())
        return max(errs)


def run(args, write=lambda results: None):
    """Every op x shape x dtype; write(results) after each row (a run cut short keeps its rows)."""
    device = args.device
    results = []
    for shape_text in args.shapes.split(","):
        n, k, d = parse_shape(shape_text)
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            for name, fn, ref_fn, inputs, flops, nbytes in op_cases(n, k, d, dtype, device):
                if args.ops and name not in args.ops.split(","):
                    continue
                with torch.no_grad():
                    shapes = [o.shape for o in fn(*inputs)]
                gen = torch.Generator(device="cpu").manual_seed(1)
                upstream = [torch.randn(s, generator=gen).to(device) for s in shapes]
                row = {"op": name, "n": n, "k": k, "d": d, "dtype": dtype_name,
                       "max_rel_error": max_relative_error(fn, ref_fn, inputs)}
                for label, f in (("kernel", fn), ("reference", ref_fn)):
                    try:
                        seconds, peak = time_fwd_bwd(f, inputs, upstream, device, args.repeats)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        row[label] = {"error": "out of memory"}
                        continue
                    row[label] = {"median_s": seconds, "peak_bytes": peak,
                                  "flop_per_s": flops / seconds if flops else None,
                                  "bytes_per_s": nbytes / seconds}
                if "median_s" in row["kernel"] and "median_s" in row.get("reference", {}):
                    row["speedup"] = row["reference"]["median_s"] / row["kernel"]["median_s"]
                results.append(row)
                print(format_row(row), flush=True)
                write(results)
    return results


def format_row(row):
    def ms(side):
        r = row.get(side, {})
        return f"{r['median_s'] * 1e3:9.3f}" if "median_s" in r else f"{r.get('error', '-'):>9}"

    peak = row["kernel"].get("peak_bytes")
    return (f"{row['op']:30s} {row['n']}x{row['k']}x{row['d']:<4} {row['dtype']:9s} kernel {ms('kernel')} ms"
            f"  reference {ms('reference')} ms  speedup {row.get('speedup', float('nan')):6.2f}"
            f"  peak {'-' if peak is None else f'{peak / 2**20:.0f} MiB'}  rel.err {row['max_rel_error']:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated NxKxD (default by device)")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--ops", default="", help="comma-separated subset of the ops")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    if args.shapes is None:
        args.shapes = "65536x1024x64,16384x8192x64" if args.device.startswith("cuda") else "2048x256x32"
    meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
            or platform.machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "torch": torch.__version__, "build": gmvq_ext.build_info(), "repeats": args.repeats}

    def write(results):
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=2)

    write(run(args, write))


if __name__ == "__main__":
    main()
