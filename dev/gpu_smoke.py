"""The GPU session's headline numbers and smoke test, in one process.

In this order, so that a session cut short keeps what matters most:
1. the headline: the fused forward + backward at (65536, 1024, 64) in
   float32 with its peak memory, beside the eager reference, torch.compile of
   it (float32 only: each compile is a cold build) and vector-quantize-pytorch
   (when importable), timed by benchmarks/bench_quantize.py's run_case in
   this process; then the fused op alone at (65536, 8192, 64) and
   (262144, 16384, 64), whose N x K matrices would not fit;
2. the device's measured ceilings (copy bandwidth, matrix products);
3. every op of torch.ops.gmvq (simplest first: philox_noise,
   codebook_distance, weighted_softmax, gumbel_argmax,
   aggregated_posterior_entropy, quantize) on the CUDA device against the
   package's CPU op and the float64 specification (gmvq_ext.reference):
   values and gradients within the test suite's tolerances
   (python_tests/helpers.py), indices equal except at near ties (docs/math.md,
   "Indices near ties"), the noise bit for bit; quantize on both tile paths
   (GMVQ_CUDA_TILES=tensor|simt, read at each call) and twice, bitwise equal;
4. the bfloat16 timings of the headline shape (fused and eager).

One JSON line per result, flushed at once, into --out (default
./smoke.jsonl): {"name", "ok", ...} with the largest error of a check (as a
multiple of its tolerance, or norm-relative), or "median_ms" and "peak_mib"
of a timing. A check that raises is a line with ok false and the error, and
the script goes on. Exit status 0 when every line is ok, else 1.

Rehearsal (GMVQ_GPU_REHEARSAL=1, or a package built by dev/emulate_cuda.sh):
the CUDA kernels emulated on CPU threads serve CPU tensors, so "cuda" means
the CPU here, there is no CPU op to compare with (the reference alone), the
shapes are tiny and the ceilings are skipped.

  python dev/gpu_smoke.py --out smoke.jsonl
  python dev/gpu_smoke.py --sanitizer-cases   (each kernel once at small shapes, for compute-sanitizer)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

import gmvq_ext
from gmvq_ext import reference

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python_tests"))
from helpers import (compare_indices, cuda_tiles, distance_scale, logit_error_factor,  # noqa: E402
                     make_codebook_inputs, make_logits, near_tie_limit, quantize_logits_and_scale, tolerance)

BUILD_INFO = gmvq_ext.build_info()
EMULATED = BUILD_INFO["cuda_architectures"] == "emulated"
REHEARSAL = EMULATED or os.environ.get("GMVQ_GPU_REHEARSAL") == "1"
DEVICE = "cpu" if REHEARSAL else "cuda"
TEMPERATURE, SIGMA_Z2, KEY = 0.7, 0.4, (2**33 + 11, 3)
gmvq = torch.ops.gmvq

# Shapes: (N, K, D). The check shape is no multiple of any tile and has several
# code tiles, row blocks and D slices (the test suite's TILE_SHAPE).
if REHEARSAL:
    CHECK_SHAPE, DETERMINISM_SHAPE, NOISE_SHAPE = (45, 70, 13), (60, 70, 12), (9, 33)
    # Emulated CUDA threads are OS threads: every launch costs seconds, so the timings run tiny.
    HEADLINE_SHAPE, LARGE_SHAPES = (64, 32, 8), [(96, 40, 8), (128, 48, 8)]
else:
    CHECK_SHAPE, DETERMINISM_SHAPE, NOISE_SHAPE = (517, 131, 61), (5000, 1000, 64), (129, 1023)
    HEADLINE_SHAPE, LARGE_SHAPES = (65536, 1024, 64), [(65536, 8192, 64), (262144, 16384, 64)]


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.failed = 0
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        self.failed += not record.get("ok", False)
        line = json.dumps(record, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(("ok   " if record.get("ok") else "FAIL ") + line, flush=True)

    def run(self, name: str, fn, **fields) -> None:
        """One check: fn returns a dict of fields with "ok"; an exception is a failed line."""
        started = time.perf_counter()
        try:
            record = {"name": name, **fields, **fn()}
        except Exception as exc:  # noqa: BLE001  (recorded; the next check runs)
            record = {"name": name, **fields, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "traceback": traceback.format_exc(limit=6)[-3000:]}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        record["seconds"] = round(time.perf_counter() - started, 3)
        self.write(record)


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def scalars(device, temperature=TEMPERATURE, key=KEY):
    return (torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(list(key), dtype=torch.int64, device=device))


# --------------------------------------------------------------------------
# Timings (benchmarks/bench_quantize.py's run_case, in this process)
# --------------------------------------------------------------------------
def bench_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_quantize
    finally:
        sys.path.pop(0)
    return bench_quantize


def timing(log: Log, label: str, case: str, shape, dtype: str, repeats: int):
    bench = bench_module()
    n, k, d = shape

    def run():
        if case == "vqtorch":
            try:
                import vector_quantize_pytorch  # noqa: F401
            except Exception as exc:  # noqa: BLE001
                return {"ok": True, "skipped": f"vector_quantize_pytorch not importable: {exc}"}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        result = bench.run_case(case, n, k, d, dtype, DEVICE, warmup=1, repeats=repeats)
        return {"ok": result["status"] == "ok" and math.isfinite(result["median_s"]),
                "median_ms": result["median_s"] * 1e3, "times_ms": [t * 1e3 for t in result["times_s"]],
                "peak_mib": result["peak_bytes"] / 2**20}

    log.run(f"{label}/{case}", run, kind="timing", shape="x".join(map(str, shape)), dtype=dtype, device=DEVICE)


def headline(log: Log, repeats: int):
    for case in ["fused", "reference_noise", "reference_compiled", "vqtorch"]:
        timing(log, "headline", case, HEADLINE_SHAPE, "float32", repeats)
    for shape in LARGE_SHAPES:
        timing(log, "large", "fused", shape, "float32", repeats)


def bfloat16_timings(log: Log, repeats: int):
    for case in ["fused", "reference_noise"]:
        timing(log, "headline_bf16", case, HEADLINE_SHAPE, "bfloat16", repeats)


def ceilings(log: Log):
    if DEVICE != "cuda":
        log.write({"name": "ceilings", "ok": True, "skipped": "rehearsal: no device"})
        return

    def bench(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / reps

    def copy():
        src = torch.randn(2**28, device="cuda")  # 1 GiB
        dst = torch.empty_like(src)
        rate = 2 * src.numel() * 4 / bench(lambda: dst.copy_(src))
        return {"ok": True, "bytes_per_s": rate}

    log.run("ceilings/copy", copy)
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False),
                              ("tf32", torch.float32, True)):
        def gemm(dtype=dtype, tf32=tf32):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
                b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
                return {"ok": True, "flop_per_s": 2 * 8192**3 / bench(lambda: a @ b, reps=5)}
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False

        log.run(f"ceilings/gemm_{name}", gemm)


# --------------------------------------------------------------------------
# Correctness: the kernel on DEVICE against the CPU op and the specification
# --------------------------------------------------------------------------
def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - b|| / ||b|| (inf for different shapes or a non-finite result)."""
    a, b = actual.detach().cpu().double(), expected.detach().cpu().double()
    if a.shape != b.shape:
        return math.inf
    if b.numel() == 0:
        return 0.0
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def forward_backward(fn, inputs, grad_mask, dtype, device, seed=1):
    """fn(*inputs) on copies of inputs (cast to dtype, on device); the float outputs'
    gradients of sum(out * random upstream) with respect to the inputs in grad_mask."""
    leaves = []
    for t, wants_grad in zip(inputs, grad_mask):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(device=device, dtype=dtype).requires_grad_(wants_grad)
        elif isinstance(t, torch.Tensor):
            t = t.to(device)
        leaves.append(t)
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        if o.is_floating_point() and o.requires_grad:
            upstream = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
            loss = loss + (o * upstream).sum()
    wanted = [t for t, g in zip(leaves, grad_mask) if g]
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted and torch.is_tensor(loss) else []
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted)]
    synchronize()
    return [o.detach() for o in outputs], [g.detach() for g in grads]


class Spec:
    """What compare() needs to know of an op beyond its two implementations."""

    def __init__(self, outputs, scale=1.0, indices=None, row_outputs=(), row_grads=(), summed_grads=()):
        self.outputs = outputs            # output names; "indices" is the integer output, if any
        self.scale = scale                # tolerance factor (helpers.distance_scale for distance ops)
        self.indices = indices            # path -> (logits (N, K) float64, row error (N,)), for near ties
        self.row_outputs = row_outputs    # outputs and gradients with a row per input row: compared
        self.row_grads = row_grads        # without the rows whose index differs at a near tie
        self.summed_grads = summed_grads  # gradients summed over every row: skipped then


def compare(kernel, ref_fn, inputs, grad_mask, dtype, spec: Spec, path: str = "tensor"):
    """The kernel on DEVICE (tile path `path`) against the package's CPU op (not in a rehearsal)
    and the float64 reference: each output's and gradient's norm-relative error, as a multiple of
    the suite's tolerance for the dtype (at most 1 is ok); indices through helpers.compare_indices."""
    out, grads = forward_backward(kernel, inputs, grad_mask, dtype, DEVICE)
    rtol = tolerance(dtype)["rtol"] * spec.scale
    result = {"dtype": str(dtype).replace("torch.", ""), "ok": True, "tolerance": rtol}
    rivals = [("reference", ref_fn, torch.float64, "cpu", None)]
    if not REHEARSAL:
        rivals.insert(0, ("cpu_op", kernel, dtype, "cpu", "cpu"))
    differing = set()
    if spec.indices is not None:
        position = spec.outputs.index("indices")
        logits, row_error = spec.indices(path)
        found = compare_indices(out[position], logits, row_error)
        result["indices"] = {key: (len(v) if isinstance(v, list) else v) for key, v in found.items()}
        result["ok"] &= not found["unexplained"] and found["near_ties"] <= near_tie_limit(logits.shape[0])
        differing |= set(found["mismatched"])
    for rival, fn, rival_dtype, device, index_path in rivals:
        # The reference sees the kernel's rounded inputs, upcast.
        rounded = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        want_out, want_grads = forward_backward(fn, rounded, grad_mask, rival_dtype, device)
        if spec.indices is not None and index_path is not None:
            logits, row_error = spec.indices(index_path)
            found = compare_indices(want_out[spec.outputs.index("indices")], logits, row_error)
            differing |= set(found["mismatched"])
        n_rows = inputs[0].shape[0]
        keep = torch.tensor([i not in differing for i in range(n_rows)])
        errors = {}
        for label, a, b in zip(spec.outputs, out, want_out):
            if label in spec.row_outputs:
                a, b = a.cpu()[keep], b.cpu()[keep]
            if label == "indices":
                errors["indices_differing"] = int((a.cpu() != b.cpu()).sum())
                result["ok"] &= errors["indices_differing"] == 0
            else:
                errors[label] = relative_error(a, b) / rtol
        for i, (a, b) in enumerate(zip(grads, want_grads)):
            if i in spec.summed_grads and differing:
                errors[f"grad_{i}"] = "skipped: near-tie rows"
                continue
            if i in spec.row_grads:
                a, b = a.cpu()[keep], b.cpu()[keep]
            errors[f"grad_{i}"] = relative_error(a, b) / rtol
        worst = max([v for v in errors.values() if isinstance(v, float)], default=0.0)
        result[f"vs_{rival}"] = errors
        result[f"worst_vs_{rival}"] = worst
        result["ok"] &= worst <= 1.0
    result["rows_left_out"] = len(differing)
    return result


def check_noise(log: Log):
    for distribution in ["uniform", "gumbel", "gaussian"]:
        def run(distribution=distribution):
            state = torch.tensor([2**40 + 17, 2**33 + 5])
            device_noise = gmvq.philox_noise(torch.empty(NOISE_SHAPE, device=DEVICE), state.to(DEVICE),
                                             distribution).cpu()
            bits = device_noise.view(torch.int32)
            want = reference.philox_noise(torch.empty(NOISE_SHAPE), state, distribution)
            result = {"ok": True, "differing_vs_reference": int((bits != want.view(torch.int32)).sum())}
            if not REHEARSAL:
                cpu = gmvq.philox_noise(torch.empty(NOISE_SHAPE), state, distribution)
                result["differing_vs_cpu_op"] = int((bits != cpu.view(torch.int32)).sum())
            result["ok"] = all(v == 0 for k, v in result.items() if k.startswith("differing"))
            return result

        log.run(f"philox_noise/{distribution}", run, shape=NOISE_SHAPE)


def check_unfused_ops(log: Log):
    n, k, d = CHECK_SHAPE
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float64, weight="full")
    logits = make_logits(n, k, dtype=torch.float64)
    temperature = 0.5
    distance = Spec(["distance"], scale=distance_scale(d))
    for dtype in [torch.float32, torch.bfloat16]:
        fields = dict(shape=CHECK_SHAPE)
        log.run(f"codebook_distance/{dtype}".replace("torch.", ""),
                lambda: compare(gmvq.codebook_distance, reference.codebook_distance, (z, w, e), (True, True, True),
                                dtype, distance), **fields)

        def softmax(z, w, e, fn):
            return fn(z, w, e, torch.tensor(temperature, device=z.device))

        log.run(f"weighted_softmax/{dtype}".replace("torch.", ""),
                lambda: compare(lambda *a: softmax(*a, gmvq.weighted_softmax),
                                lambda *a: softmax(*a, reference.weighted_softmax), (z, w, e), (True, True, True),
                                dtype, Spec(["probs", "lse"], scale=distance_scale(d))), **fields)
        # v = l + g is one float32 addition: an error of u |v| at most.
        x = logits.to(dtype).double()
        g = reference.gumbel_noise(KEY, n, k).double()
        row_error = 2.0**-24 * (x.abs() + g.abs()).max(1).values
        gumbel_spec = Spec(["sample", "indices"], indices=lambda path: (x + g, row_error),
                           row_outputs=("sample", "indices"), row_grads=(0,))
        for hard in [True, False]:
            def gumbel(x, fn, hard=hard):
                state = torch.tensor(list(KEY), device=x.device)
                return fn(x, torch.tensor(temperature, device=x.device), hard, state, None)

            log.run(f"gumbel_argmax/{'hard' if hard else 'soft'}/{dtype}".replace("torch.", ""),
                    lambda: compare(lambda x: gumbel(x, gmvq.gumbel_argmax),
                                    lambda x: gumbel(x, reference.gumbel_argmax), (logits,), (True,), dtype,
                                    gumbel_spec), **fields)
        log.run(f"aggregated_posterior_entropy/{dtype}".replace("torch.", ""),
                lambda: compare(gmvq.aggregated_posterior_entropy, reference.aggregated_posterior_entropy, (logits,),
                                (True,), dtype, Spec(["entropy", "q_bar"])), **fields)


MODES = {"hard": (True, True), "soft": (False, True), "eval": (True, False)}
# float32 on both tile paths; float64 always takes the SIMT path; bfloat16 inputs.
QUANTIZE_PATHS = [(torch.float32, "tensor"), (torch.float32, "simt"), (torch.float64, "simt"),
                  (torch.bfloat16, "tensor")]


def quantize_fn(op, hard, training):
    def fn(z, w, e):
        temperature, state = scalars(z.device)
        if op is reference.quantize:  # the op's float32 temperature, not the Python 0.7 (1.7e-8 apart)
            out = op(z, w, e, temperature.cpu(), SIGMA_Z2, hard, training, state.cpu())
        else:
            out = op(z, w, e, temperature, SIGMA_Z2, hard, training, state, None, None)
        return tuple(out[:4])

    return fn


def check_quantize(log: Log):
    n, k, d = CHECK_SHAPE
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float64, weight="full")
    for dtype, path in QUANTIZE_PATHS:
        for mode, (hard, training) in MODES.items():
            def run(dtype=dtype, path=path, hard=hard, training=training):
                rounded = [t.to(dtype) for t in (z, w, e)]
                logits, scale = quantize_logits_and_scale(*rounded, training, scalars("cpu")[1])

                def indices(index_path):
                    return logits, logit_error_factor(index_path, dtype, d, True) * scale.max(1).values

                spec = Spec(["z_out", "indices", "q_bar", "latent_reg"], scale=distance_scale(d), indices=indices,
                            row_outputs=("z_out", "indices", "latent_reg"), row_grads=(0, 1), summed_grads=(2,))
                with cuda_tiles(path):
                    return compare(quantize_fn(gmvq.quantize, hard, training),
                                   quantize_fn(reference.quantize, hard, training), (z, w, e), (True, True, True),
                                   dtype, spec, path)

            log.run(f"quantize/{mode}/{path}/{dtype}".replace("torch.", ""), run, shape=CHECK_SHAPE)


def check_determinism(log: Log):
    n, k, d = DETERMINISM_SHAPE
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float64, weight="full", seed=3)
    for path in ["tensor", "simt"]:
        for mode, (hard, training) in MODES.items():
            def run(path=path, hard=hard, training=training):
                with cuda_tiles(path):
                    runs = [forward_backward(quantize_fn(gmvq.quantize, hard, training), (z, w, e),
                                             (True, True, True), torch.float32, DEVICE) for _ in range(2)]
                (out1, grads1), (out2, grads2) = runs
                differing = [i for i, (a, b) in enumerate(zip(out1 + grads1, out2 + grads2)) if not torch.equal(a, b)]
                return {"ok": not differing, "differing_tensors": differing}

            log.run(f"quantize_bitwise_repeat/{mode}/{path}", run, shape=DETERMINISM_SHAPE)


# --------------------------------------------------------------------------
# Small cases for compute-sanitizer: every unfused op once, and per tile path
# one quantize shape, forward and backward, in hard and soft training (the
# soft forward is a kernel of its own).
# --------------------------------------------------------------------------
def sanitizer_cases():
    n, k, d = 70, 45, 13
    z, w, e = (t.to(DEVICE).requires_grad_() for t in make_codebook_inputs(n, k, d, weight="full"))
    x = make_logits(n, k, device=DEVICE, requires_grad=True)
    temperature, state = scalars(DEVICE)
    for distribution in ["uniform", "gumbel", "gaussian"]:
        gmvq.philox_noise(torch.empty(n, k, device=DEVICE), state, distribution)
    torch.autograd.grad(gmvq.codebook_distance(z, w, e).sum(), [z, w, e])
    probs, lse = gmvq.weighted_softmax(z, w, e, temperature)
    torch.autograd.grad(probs.sum() + lse.sum(), [z, w, e])
    sample, _ = gmvq.gumbel_argmax(x, temperature, False, state, None)
    torch.autograd.grad((sample * sample).sum(), [x])
    entropy, q_bar = gmvq.aggregated_posterior_entropy(x)
    torch.autograd.grad(entropy + (q_bar * q_bar).sum(), [x])
    ran = []
    for path in ["tensor", "simt"]:
        for hard in [True, False]:
            with cuda_tiles(path):
                out = gmvq.quantize(z, w, e, temperature, SIGMA_Z2, hard, True, state, None, None)
                loss = (out[0] ** 2).sum() + out[2].sum() + out[3].sum()
                torch.autograd.grad(loss, [z, w, e])
            ran.append(f"quantize/{path}/{'hard' if hard else 'soft'}")
    synchronize()
    print(f"sanitizer cases done on {DEVICE}: every unfused op, {', '.join(ran)}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("smoke.jsonl"))
    parser.add_argument("--repeats", type=int, default=10 if not REHEARSAL else 1)
    parser.add_argument("--sanitizer-cases", action="store_true")
    parser.add_argument("--skip-timings", action="store_true")
    args = parser.parse_args(argv)
    if args.sanitizer_cases:
        sanitizer_cases()
        return 0
    log = Log(args.out)
    info = {"name": "environment", "ok": True, "rehearsal": REHEARSAL, "device": DEVICE, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "build_info": BUILD_INFO, "python": sys.version.split()[0],
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "tiles_env": os.environ.get("GMVQ_CUDA_TILES")}
    if not REHEARSAL and not (torch.cuda.is_available() and BUILD_INFO["with_cuda"]):
        info.update(ok=False, error="no CUDA device or gmvq_ext built without CUDA")
    log.write(info)
    if not args.skip_timings:
        headline(log, args.repeats)
        ceilings(log)
    for stage in (check_noise, check_unfused_ops, check_quantize, check_determinism):
        stage(log)
    if not args.skip_timings:
        bfloat16_timings(log, args.repeats)
    print(f"{log.failed} failed line(s) in {args.out}", flush=True)
    return 1 if log.failed else 0


if __name__ == "__main__":
    sys.exit(main())
