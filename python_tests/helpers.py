"""The test vocabulary shared by every test file: devices, dtypes, tolerances,
input builders. CUDA appears only where a CUDA device and CUDA kernels exist.

A test's CUDA rows carry "cuda" in their id (the DEVICES parameter) or the
`cuda` mark (requires_cuda, CUDA_KERNEL_DEVICES), so `pytest -k cuda` is the
GPU suite and a failure names its op's file.

Under dev/emulate_cuda.sh the CUDA kernels' code, compiled for the CPU,
serves CPU tensors (EMULATED): the CPU rows then run the CUDA kernels, and
the rows over CUDA_KERNEL_DEVICES run there as "cuda_emulated"."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

import gmvq_ext
from gmvq_ext import reference

BUILD_INFO = gmvq_ext.build_info()
HAS_CUDA = torch.cuda.is_available() and BUILD_INFO["with_cuda"]
# The loaded kernels are the CUDA kernels emulated on CPU threads (dev/emulate_cuda.sh).
EMULATED = BUILD_INFO["cuda_architectures"] == "emulated"
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# Where the CUDA kernels run: a CUDA device, or the CPU under the emulation
# (there the package has no CPU kernels to compare with: such rows compare
# with the reference alone). Empty, so skipped, on a CPU-only build.
CUDA_KERNEL_DEVICES = ([pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)] if HAS_CUDA else
                       [pytest.param("cpu", id="cuda_emulated", marks=pytest.mark.cuda)] if EMULATED else [])
_skip_without_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and gmvq_ext built with CUDA")


def requires_cuda(test):
    """A test that needs a real CUDA device (marked `cuda`, so `pytest -k cuda` selects it)."""
    return pytest.mark.cuda(_skip_without_cuda(test))



def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


# The CPU kernels' vector paths this machine runs (GMVQ_CPU_NOISE_PATH and
# GMVQ_CPU_EXP_PATH pick one; the default is the widest): the portable loops
# always, the AVX2 (with FMA) and AVX-512 intrinsics where the build has the
# x86 paths and the CPU the instructions.
CPU_VECTOR_PATHS = ["portable"] + ([] if not BUILD_INFO["cpu_x86_paths"] else
                                   (["avx2"] if {"avx2", "fma"} <= _cpu_flags() else []) +
                                   (["avx512"] if "avx512f" in _cpu_flags() else []))

FLOAT_DTYPES = [torch.float32, torch.float64]
LOW_PRECISION_DTYPES = [torch.bfloat16, torch.float16]
ALL_DTYPES = FLOAT_DTYPES + LOW_PRECISION_DTYPES

# Kernel vs reference on the same inputs. Low-precision inputs are compared
# with the reference run on the same (rounded) values upcast to float32, so
# only fp32-internal rounding differs.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}


def tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def distance_scale(d: int) -> float:
    """Tolerance factor for values built on a distance, which cancels terms of size ~ 2 D."""
    return max(1.0, d / 8)


@contextlib.contextmanager
def cuda_tiles(path: str):
    """GMVQ_CUDA_TILES for the calls inside: "tensor" (3xTF32 tensor cores) or
    "simt" (FP32 FFMA); the CUDA quantize reads it at each call."""
    old = os.environ.get("GMVQ_CUDA_TILES")
    os.environ["GMVQ_CUDA_TILES"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["GMVQ_CUDA_TILES"]
        else:
            os.environ["GMVQ_CUDA_TILES"] = old


def make_codebook_inputs(n=37, k=19, d=5, dtype=torch.float32, device="cpu", weight="full", seed=0,
                         requires_grad=False):
    """(z, weight, codebook) with codes near the data so softmaxes are not one-hot.

    weight: "full" (N, D), "scalar" (N, 1) or None; always positive."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=gen, dtype=torch.float64)
    w = None
    if weight == "full":
        w = torch.nn.functional.softplus(torch.randn(n, d, generator=gen, dtype=torch.float64))
    elif weight == "scalar":
        w = torch.nn.functional.softplus(torch.randn(n, 1, generator=gen, dtype=torch.float64))
    out = [t if t is None else t.to(dtype=dtype, device=device).requires_grad_(requires_grad)
           for t in (z, w, codebook)]
    return tuple(out)


def make_logits(n=37, k=19, dtype=torch.float32, device="cpu", seed=0, scale=2.0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen, dtype=torch.float64) * scale
    return logits.to(dtype=dtype, device=device).requires_grad_(requires_grad)


def upcast(t):
    """The same values in float32 (float64 stays float64), detached, as a new leaf."""
    if t is None:
        return None
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def _sample_data_dir() -> Path:
    """shared/data beside the checkout (CI: ../shared; a git worktree: ../../shared),
    or $GMVQ_SAMPLE_DATA. Tests that need it fail when it is missing, never skip."""
    root = Path(__file__).resolve().parents[1]
    candidates = [Path(os.environ["GMVQ_SAMPLE_DATA"])] if "GMVQ_SAMPLE_DATA" in os.environ else []
    candidates += [root.parent / "shared" / "data", root.parent.parent / "shared" / "data"]
    for candidate in candidates:
        if (candidate / "cifar10-sample").is_dir():
            return candidate.resolve()
    raise FileNotFoundError(f"sample data (shared/data) not found in any of {[str(c) for c in candidates]}")


def __getattr__(name: str):
    # SAMPLE_DATA is looked up when a test module imports it, not when helpers
    # loads: a file that needs the data fails to collect where it is missing
    # (never skips), and the other files still run (the GPU machine has no data).
    if name == "SAMPLE_DATA":
        return _sample_data_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The folder holding the gmvq_ext this test run imports (site-packages after
# pip install, the checkout for an in-place build). Subprocesses start there
# and put it first on PYTHONPATH, so they import the same build.
PACKAGE_PARENT = Path(gmvq_ext.__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict:
    path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


# Indices near ties (docs/math.md, "Indices near ties"). A float32 kernel's
# logit l[n, k], and l + g, lies within gamma * E[n, k] of the exact value,
# E[n, k] = sum_d w (|z| + |e_k|)^2 + |g[n, k]|, gamma from the path's error
# model. Its argmax must equal the float64 reference's where the reference's
# top-2 gap exceeds twice the row's error; elsewhere another index is a near
# tie: allowed when the code it picks is that close to the maximum, and counted.
def logit_error_factor(path: str, dtype: torch.dtype, d: int, full_weight: bool) -> float:
    """gamma of the CUDA "tensor" path (3xTF32, truncating accumulation), the CUDA "simt" path
    (FFMA chains) or the "cpu" op (a GEMM of depth D + W), in float32 or float64 arithmetic."""
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    dp = -(-d // 8) * 8
    rp = 2 * dp if full_weight else dp + 8  # the CUDA kernels' operand width
    per_path = {"tensor": 12 + 9 * rp, "simt": rp, "cpu": 2 * d if full_weight else d + 1}[path]
    return (per_path + d + 4) * u


def quantize_logits_and_scale(z, w, e, training: bool, state, gumbel=None):
    """The float64 reference's logits of quantize (plus the Gumbel noise in training: `gumbel`, or
    the op's own from `state`) and their error scale E, both (N, K) on the CPU."""
    z64, e64 = z.detach().cpu().double(), e.detach().cpu().double()
    w64 = None if w is None else w.detach().cpu().double()
    logits = -reference.codebook_distance(z64, w64, e64)
    scale = reference.codebook_distance(z64.abs(), w64, -e64.abs())
    if training:
        n, k = logits.shape
        g = gumbel if gumbel is not None else reference.gumbel_noise(state.cpu(), n, k)
        g = g.detach().cpu().double()
        logits, scale = logits + g, scale + g.abs()
    return logits, scale


def near_tie_limit(rows: int) -> float:
    """How many near ties a check accepts: the bound is a worst case, and on the tests'
    inputs under half a percent of the rows lie within it."""
    return max(2, 0.02 * rows)


def compare_indices(indices, logits, row_error) -> dict:
    """A kernel's indices against the argmax of float64 `logits`, given each row's largest logit
    error: {"near_ties": rows whose top-2 gap is at most twice it, "mismatched": the rows that
    differ (a list), "unexplained": those of them that are no near tie or picked a code further
    than twice the error below the maximum}."""
    got = indices.detach().cpu().long()
    top = logits.topk(min(2, logits.shape[1]), dim=1).values
    gap = top[:, 0] - top[:, -1] if logits.shape[1] > 1 else torch.full_like(top[:, 0], float("inf"))
    near = gap <= 2 * row_error
    mismatched = got != logits.argmax(1)
    picked = logits.gather(1, got.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    unexplained = mismatched & (~near | (picked < top[:, 0] - 2 * row_error))
    return {"near_ties": int(near.sum()), "mismatched": mismatched.nonzero()[:, 0].tolist(),
            "unexplained": unexplained.nonzero()[:, 0].tolist()}
