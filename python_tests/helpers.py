"""The test vocabulary shared by every test file: devices, dtypes, tolerances,
input builders. CUDA appears only where a CUDA device and CUDA kernels exist.

A test's CUDA rows carry "cuda" in their id (the DEVICES parameter) or the
`cuda` mark (requires_cuda, CUDA_KERNEL_DEVICES), so `pytest -k cuda` is the
GPU suite and a failure names its op's file.

Under dev/emulate_cuda.sh the CUDA kernels' code, compiled for the CPU,
serves CPU tensors (EMULATED): the CPU rows then run the CUDA kernels, and
the rows over CUDA_KERNEL_DEVICES run there as "cuda_emulated".

The vocabulary, in order:
  devices     DEVICES, CUDA_KERNEL_DEVICES, requires_cuda, CPU_VECTOR_PATHS, cuda_tiles
  dtypes      FLOAT_DTYPES, LOW_PRECISION_DTYPES, ALL_DTYPES; TOLERANCES, tolerance
  inputs      make_codebook_inputs (WEIGHT_MODES), make_logits, upcast, present
  comparing   assert_close, check_against_reference (an op against gmvq_ext.reference)
  quantizers  QUANTIZER_OPTIONS (GMVQ_PAPER), make_quantizer, feature_map
  compiling   graph_recorder, graphs_call
  processes   PACKAGE_PARENT, subprocess_env, free_port, run_ranks; SAMPLE_DATA
The fixture one_thread is in conftest.py."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

import gmvq_ext
from gmvq_ext import build_quantizer, ops, reference
from gmvq_ext.quantizers import QUANTIZERS, AffineVQ, VectorQuantizer

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


# ---------------------------------------------------------------- dtypes
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


def tolerance(dtype: torch.dtype, scale: float = 1.0, atol_scale: float = 1.0) -> dict:
    """rtol and atol of TOLERANCES[dtype], both times scale, atol also times atol_scale
    (for results that sum large terms: a small one then carries their rounding)."""
    tol = TOLERANCES[dtype]
    return dict(rtol=tol["rtol"] * scale, atol=tol["atol"] * scale * atol_scale)


def distance_scale(d: int) -> float:
    """Tolerance factor for values built on a distance, which cancels terms of size ~ 2 D."""
    return max(1.0, d / 8)


# ---------------------------------------------------------------- inputs
# The weight argument of make_codebook_inputs: absent, one per dimension, one per row.
WEIGHT_MODES = [None, "full", "scalar"]


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


def present(*tensors) -> list:
    """The tensors that are not None (the ones autograd can differentiate)."""
    return [t for t in tensors if t is not None]


# ---------------------------------------------------------------- comparing
def assert_close(actual, expected, dtype=None, *, scale=1.0, atol_scale=1.0, **tol):
    """torch.testing.assert_close of both as float64 on the CPU (a low-precision or CUDA
    result against a float32 or float64 CPU reference), to tolerance(dtype, scale,
    atol_scale); `tol` (rtol, atol, equal_nan, msg) overrides it. Without dtype or tol,
    torch's own float64 tolerances. Where the two must also share a dtype and device,
    call torch.testing.assert_close(actual, expected, **tolerance(dtype)) itself."""
    if dtype is not None:
        tol = {**tolerance(dtype, scale, atol_scale), **tol}
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), **tol)


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype with the looser tolerance."""
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return max(a, b, key=order.index)


def check_against_reference(call, inputs, dtype, *, exact=(), use=None, seed=0, atol_scale=1.0):
    """An op against gmvq_ext.reference, forward and backward; returns the op's outputs.

    call(impl, *inputs) is the op's call written once: it runs with impl =
    gmvq_ext.ops on `inputs` (the tensors to differentiate, None for an absent
    optional one) and with impl = gmvq_ext.reference on the same values upcast.
    - Each output has the reference's shape and is finite; a floating one has dtype
      reference.accumulation_dtype(dtype), an integer one the reference's.
    - Integer outputs, and those whose position is in `exact`, equal the reference's
      bit for bit; the others match it to tolerance(dtype), atol times atol_scale.
    - Random float64 upstream gradients (a torch.Generator seeded with `seed`, one
      tensor per output, in order) on the outputs whose positions are in `use` (by
      default every floating output) give each present input a finite gradient of its
      own dtype and shape, matching the reference's to the tolerance of the coarser of
      dtype and the input's dtype (a gradient is rounded to its input's dtype)."""
    inputs = [t if t is None else t.detach().requires_grad_() for t in inputs]
    ref_inputs = [upcast(t) for t in inputs]
    outputs = _as_tuple(call(ops, *inputs))
    expected = _as_tuple(call(reference, *ref_inputs))
    acc = reference.accumulation_dtype(dtype)
    assert len(outputs) == len(expected)
    for i, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.shape == ref.shape, f"output {i}"
        assert out.dtype == (acc if ref.is_floating_point() else ref.dtype), f"output {i}"
        assert torch.isfinite(out).all(), f"output {i}"
        if i in exact or not ref.is_floating_point():
            assert torch.equal(out, ref.detach()), f"output {i}"
        else:
            assert_close(out, ref, dtype, atol_scale=atol_scale)

    use = [i for i, ref in enumerate(expected) if ref.is_floating_point()] if use is None else list(use)
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(outputs[i].shape, generator=gen, dtype=torch.float64) for i in use]
    grads = _grads(outputs, use, upstream, inputs)
    ref_grads = _grads(expected, use, upstream, ref_inputs)
    for grad, ref_grad, source in zip(grads, ref_grads, present(*inputs)):
        assert grad.dtype == source.dtype and grad.shape == source.shape
        assert torch.isfinite(grad).all()
        assert_close(grad, ref_grad, _coarser(dtype, source.dtype), atol_scale=atol_scale)
    return outputs


def _as_tuple(outputs) -> tuple:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def _grads(outputs, use, upstream, inputs):
    """The gradients of the present inputs given upstream[j] on outputs[use[j]] (cast to its dtype)."""
    chosen = [outputs[i] for i in use]
    return torch.autograd.grad(chosen, present(*inputs),
                               [u.to(o.device, o.dtype) for u, o in zip(upstream, chosen)])


# ---------------------------------------------------------------- quantizers
# GaussianMixtureVQ in the paper's settings, with the straight-through hard sample:
# what test_quantizers_gmvq.py's expected values are written for (the package's
# defaults, chosen on validation, are tested there on their own).
GMVQ_PAPER = dict(beta=1.0, sigma_z2=0.5, noise_scale=1.0, temperature_start=2.0, temperature_end=0.1, hard=True)
# The options make_quantizer gives a registered quantizer beyond K and D; dead codes
# are replaced after 2 unused steps, so that the contract's few training forwards replace some.
QUANTIZER_OPTIONS = {
    "gmvq": GMVQ_PAPER,
    "vqvae-replace": dict(replace_after=2),
    "vqvae-l2-replace": dict(replace_after=2),
}


def make_quantizer(name: str, **options):
    """build_quantizer(name) with K = 16, D = 4 and QUANTIZER_OPTIONS[name] (`options` win),
    its parameters drawn after torch.manual_seed(0). A VQ-VAE variant then gets codes at
    the data's scale (a batch uses several of them), kept by its training forward (no
    k-means unless asked), and an affine one a map that is not the identity."""
    torch.manual_seed(0)
    if issubclass(QUANTIZERS[name], VectorQuantizer):
        options.setdefault("kmeans_init", False)
    q = build_quantizer(name, codebook_size=16, dim=4, **{**QUANTIZER_OPTIONS.get(name, {}), **options})
    if isinstance(q, VectorQuantizer):
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            q.codebook.copy_(torch.randn(16, 4, generator=gen))
            if isinstance(q, AffineVQ):
                q.affine_weight.copy_(0.1 * torch.randn(4, generator=gen))
                q.affine_bias.copy_(0.1 * torch.randn(4, generator=gen))
    return q


def feature_map(q, batch=2, height=3, width=4, seed=0, scale=1.0) -> torch.Tensor:
    """A channel-first (B, C, H, W) encoder output for the quantizer q."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q.input_channels, height, width, generator=gen) * scale


# ---------------------------------------------------------------- torch.compile
def graph_recorder(graphs: list, then="aot_eager"):
    """A torch.compile backend that keeps each FX graph dynamo captured, then compiles it
    with the backend `then` ("eager" runs the captured graph as it is)."""
    from torch._dynamo.backends.registry import lookup_backend

    def record(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(then)(gm, example_inputs)

    return record


def graphs_call(graphs, op_name: str) -> bool:
    """Whether any of the recorded graphs calls the op (e.g. "gmvq.quantize")."""
    return any(op_name in str(node.target) for gm in graphs for node in gm.graph.nodes)


# ---------------------------------------------------------------- data and processes
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world_size: int = 2) -> list:
    """worker(rank, world_size) in world_size processes joined by a gloo process group
    on this host; what each returns (tensors, in a torch.save-able object), in rank
    order. The worker must be a module-level function (the processes are spawned)."""
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(_rank_main, args=(world_size, free_port(), out_dir, worker), nprocs=world_size,
                                    join=True)
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(world_size)]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, worker):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        torch.save(worker(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


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
