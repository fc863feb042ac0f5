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
