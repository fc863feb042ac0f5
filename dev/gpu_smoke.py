"""The GPU session's smoke test and headline numbers, in one process.

Every op of torch.ops.gmvq (simplest first: philox_noise, codebook_distance,
weighted_softmax, gumbel_argmax, aggregated_posterior_entropy, quantize) on
the CUDA device against the package's CPU op and the float64 reference
(gmvq_ext.reference): values, gradients, indices; the noise bit for bit;
quantize on both tile paths (GMVQ_CUDA_TILES=tensor|simt, read at each call)
and twice, bitwise equal. Then the headline: the fused forward + backward at
(65536, 1024, 64) in float32 and bfloat16 with its peak memory, beside the
eager reference, torch.compile of it and vector-quantize-pytorch (when
importable), timed by benchmarks/bench_quantize.py's run_case in this process;
then the fused op alone at (65536, 8192, 64) and (262144, 16384, 64); last the
device's measured ceilings (copy bandwidth, matrix products).

One JSON line per result, flushed at once, into --out (default
./smoke.jsonl): {"name", "ok", ...} with the largest relative errors
(||a - b|| / ||b||) of a check, or "median_ms" and "peak_mib" of a timing. A
check that raises is a line with ok false and the error, and the script goes
on. Exit status 0 when every line is ok, else 1.

Rehearsal (GMVQ_GPU_REHEARSAL=1, or a package built by dev/emulate_cuda.sh):
the CUDA kernels emulated on CPU threads serve CPU tensors, so "cuda" means
the CPU here, there is no CPU op to compare with (the reference alone), the
shapes are tiny and the ceilings are skipped.

  python dev/gpu_smoke.py --out smoke.jsonl
  python dev/gpu_smoke.py --sanitizer-cases   (each kernel once at small shapes, for compute-sanitizer)
"""

from __future__ import annotations

import argparse
import contextlib
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
BUILD_INFO = gmvq_ext.build_info()
EMULATED = BUILD_INFO["cuda_architectures"] == "emulated"
REHEARSAL = EMULATED or os.environ.get("GMVQ_GPU_REHEARSAL") == "1"
DEVICE = "cpu" if REHEARSAL else "cuda"
# Norm-relative error allowed against the float64 reference (and the CPU op).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}
TEMPERATURE, SIGMA_Z2, KEY = 0.7, 0.4, (2**33 + 11, 3)
gmvq = torch.ops.gmvq

# Shapes: (N, K, D). The check shape is no multiple of any tile and has several
# code tiles, row blocks and D slices; its inputs (seed 0, as
# python_tests/helpers.make_codebook_inputs) have a top-2 gap of the perturbed
# logits far above float32 rounding, so indices must agree exactly.
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


@contextlib.contextmanager
def tiles(path: str | None):
    old = os.environ.get("GMVQ_CUDA_TILES")
    if path is not None:
        os.environ["GMVQ_CUDA_TILES"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GMVQ_CUDA_TILES", None)
        else:
            os.environ["GMVQ_CUDA_TILES"] = old


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------
# Inputs (float64 on the CPU; each run casts them)
# --------------------------------------------------------------------------
def codebook_inputs(n, k, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=gen, dtype=torch.float64)
    weight = torch.nn.functional.softplus(torch.randn(n, d, generator=gen, dtype=torch.float64))
    return z, weight, codebook


def logits_input(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen, dtype=torch.float64) * 2.0


def scalars(device, temperature=TEMPERATURE, key=KEY):
    return (torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(list(key), dtype=torch.int64, device=device))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
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


def compare(name, kernel, ref_fn, inputs, grad_mask, dtype, output_names, integer_outputs=()):
    """The kernel on DEVICE against the package's CPU op (not in a rehearsal) and the
    float64 reference: the largest relative error of each output and gradient."""
    out, grads = forward_backward(kernel, inputs, grad_mask, dtype, DEVICE)
    result = {"dtype": str(dtype).replace("torch.", ""), "ok": True}
    rivals = [("reference", ref_fn, torch.float64, "cpu")]
    if not REHEARSAL:
        rivals.insert(0, ("cpu_op", kernel, dtype, "cpu"))
    for rival, fn, rival_dtype, device in rivals:
        # The reference sees the kernel's rounded inputs, upcast.
        rounded = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        want_out, want_grads = forward_backward(fn, rounded, grad_mask, rival_dtype, device)
        errors = {}
        for i, (label, a, b) in enumerate(zip(output_names, out, want_out)):
            if i in integer_outputs:
                mismatches = int((a.cpu() != b.cpu()).sum().item()) if a.shape == b.shape else -1
                errors[f"{label}_mismatches"] = mismatches
                result["ok"] &= mismatches == 0
            else:
                errors[label] = relative_error(a, b)
        for i, (a, b) in enumerate(zip(grads, want_grads)):
            errors[f"grad_{i}"] = relative_error(a, b)
        worst = max([v for k, v in errors.items() if not k.endswith("_mismatches")], default=0.0)
        tol = TOLERANCE[dtype] * (10 if rival == "cpu_op" and dtype == torch.bfloat16 else 1)
        result[f"vs_{rival}"] = errors
        result[f"max_error_vs_{rival}"] = worst
        result["ok"] &= worst <= tol
    result["tolerance"] = TOLERANCE[dtype]
    return result


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
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
    z, w, e = codebook_inputs(n, k, d)
    logits = logits_input(n, k)
    temperature = 0.5
    for dtype in [torch.float32, torch.bfloat16]:
        fields = dict(shape=CHECK_SHAPE)
        log.run(f"codebook_distance/{dtype}".replace("torch.", ""),
                lambda: compare("codebook_distance", gmvq.codebook_distance, reference.codebook_distance,
                                (z, w, e), (True, True, True), dtype, ["distance"]), **fields)

        def softmax(z, w, e, fn):
            return fn(z, w, e, torch.tensor(temperature, device=z.device))

        log.run(f"weighted_softmax/{dtype}".replace("torch.", ""),
                lambda: compare("weighted_softmax", lambda *a: softmax(*a, gmvq.weighted_softmax),
                                lambda *a: softmax(*a, reference.weighted_softmax),
                                (z, w, e), (True, True, True), dtype, ["probs", "lse"]), **fields)
        for hard in [True, False]:
            def gumbel(x, fn, hard=hard):
                state = torch.tensor(list(KEY), device=x.device)
                return fn(x, torch.tensor(temperature, device=x.device), hard, state, None)

            log.run(f"gumbel_argmax/{'hard' if hard else 'soft'}/{dtype}".replace("torch.", ""),
                    lambda: compare("gumbel_argmax", lambda x: gumbel(x, gmvq.gumbel_argmax),
                                    lambda x: gumbel(x, reference.gumbel_argmax), (logits,), (True,), dtype,
                                    ["sample", "indices"], integer_outputs=(1,)), **fields)
        log.run(f"aggregated_posterior_entropy/{dtype}".replace("torch.", ""),
                lambda: compare("aggregated_posterior_entropy", gmvq.aggregated_posterior_entropy,
                                reference.aggregated_posterior_entropy, (logits,), (True,), dtype,
                                ["entropy", "q_bar"]), **fields)


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
    z, w, e = codebook_inputs(n, k, d)
    for dtype, path in QUANTIZE_PATHS:
        for mode, (hard, training) in MODES.items():
            def run(dtype=dtype, path=path, hard=hard, training=training):
                with tiles(path):
                    return compare("quantize", quantize_fn(gmvq.quantize, hard, training),
                                   quantize_fn(reference.quantize, hard, training), (z, w, e), (True, True, True),
                                   dtype, ["z_out", "indices", "q_bar", "latent_reg"], integer_outputs=(1,))

            log.run(f"quantize/{mode}/{path}/{dtype}".replace("torch.", ""), run, shape=CHECK_SHAPE)


def check_determinism(log: Log):
    n, k, d = DETERMINISM_SHAPE
    z, w, e = codebook_inputs(n, k, d, seed=3)
    for path in ["tensor", "simt"]:
        for mode, (hard, training) in MODES.items():
            def run(path=path, hard=hard, training=training):
                with tiles(path):
                    runs = [forward_backward(quantize_fn(gmvq.quantize, hard, training), (z, w, e),
                                             (True, True, True), torch.float32, DEVICE) for _ in range(2)]
                (out1, grads1), (out2, grads2) = runs
                differing = [i for i, (a, b) in enumerate(zip(out1 + grads1, out2 + grads2)) if not torch.equal(a, b)]
                return {"ok": not differing, "differing_tensors": differing}

            log.run(f"quantize_bitwise_repeat/{mode}/{path}", run, shape=DETERMINISM_SHAPE)


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


def timings(log: Log, repeats: int):
    for dtype in ["float32", "bfloat16"]:
        for case in ["fused", "reference_noise", "reference_compiled", "vqtorch"]:
            timing(log, "headline", case, HEADLINE_SHAPE, dtype, repeats)
    for shape in LARGE_SHAPES:
        for dtype in ["float32", "bfloat16"]:
            timing(log, "large", "fused", shape, dtype, repeats)


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
# Small cases for compute-sanitizer: every kernel once, both tile paths
# --------------------------------------------------------------------------
def sanitizer_cases():
    n, k, d = 70, 45, 13
    z, w, e = codebook_inputs(n, k, d)
    logits = logits_input(n, k)
    temperature, state = scalars(DEVICE)
    ran = []
    for dtype in [torch.float32, torch.bfloat16]:
        zz, ww, ee = (t.to(DEVICE, dtype).requires_grad_() for t in (z, w, e))
        for distribution in ["uniform", "gumbel", "gaussian"]:
            gmvq.philox_noise(torch.empty(n, k, device=DEVICE), state, distribution)
        dist = gmvq.codebook_distance(zz, ww, ee)
        torch.autograd.grad(dist.sum(), [zz, ww, ee])
        probs, lse = gmvq.weighted_softmax(zz, ww, ee, temperature)
        torch.autograd.grad(probs.sum() + lse.sum(), [zz, ww, ee])
        x = logits.to(DEVICE, dtype).requires_grad_()
        for hard in [True, False]:
            sample, _ = gmvq.gumbel_argmax(x, temperature, hard, state, None)
            torch.autograd.grad((sample * sample).sum(), [x])
        entropy, q_bar = gmvq.aggregated_posterior_entropy(x)
        torch.autograd.grad(entropy + (q_bar * q_bar).sum(), [x])
        for path in ["tensor", "simt"]:
            for hard, training in MODES.values():
                with tiles(path):
                    out = gmvq.quantize(zz, ww, ee, temperature, SIGMA_Z2, hard, training, state, None, None)
                    loss = (out[0].float() ** 2).sum() + out[2].sum() + out[3].sum()
                    torch.autograd.grad(loss, [zz, ww, ee])
                ran.append(f"quantize/{path}/{hard}/{training}/{dtype}")
        synchronize()
    print(f"sanitizer cases done: {len(ran)} quantize runs and every unfused op, on {DEVICE}", flush=True)


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
    for stage in (check_noise, check_unfused_ops, check_quantize, check_determinism):
        stage(log)
    if not args.skip_timings:
        timings(log, args.repeats)
        ceilings(log)
    print(f"{log.failed} failed line(s) in {args.out}", flush=True)
    return 1 if log.failed else 0


if __name__ == "__main__":
    sys.exit(main())
