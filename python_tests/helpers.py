"""The test vocabulary shared by every test file: devices, dtypes, tolerances,
input builders. CUDA appears only where a CUDA device and CUDA kernels exist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import gmvq_ext

HAS_CUDA = torch.cuda.is_available() and gmvq_ext.build_info()["with_cuda"]
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and gmvq_ext built with CUDA")

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


SAMPLE_DATA = _sample_data_dir()


# The folder holding the gmvq_ext this test run imports (site-packages after
# pip install, the checkout for an in-place build). Subprocesses start there
# and put it first on PYTHONPATH, so they import the same build.
PACKAGE_PARENT = Path(gmvq_ext.__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict:
    path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
