"""What only a CUDA device shows, beyond the per-op files (which run every op on
CUDA through helpers.DEVICES): both tile paths of the fused quantize against
the package's CPU op, bitwise determinism, noise identical to the CPU bits,
temperature and noise state resident on the device without a host sync (sync
debug mode, CUDA graph capture), the device-side index check, a size whose
N x K matrix would not fit, opcheck and torch.compile on CUDA.

The ops are called through torch.ops.gmvq with the schema of
csrc/registration.cpp. Skipped without a CUDA device and a CUDA build; the
kernels' logic is checked without a GPU by tools/check_emulated_quantize.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import PACKAGE_PARENT, make_codebook_inputs, make_logits, requires_cuda, subprocess_env, tolerance

pytestmark = [requires_cuda]
gmvq = torch.ops.gmvq

WEIGHTS = [None, "full", "scalar"]
MODES = {"hard": (True, True), "soft": (False, True), "eval": (True, False)}
# (N, K, D): no multiple of any tile; several code tiles, row segments and D slices.
SHAPE = (517, 131, 61)
# float32 on both tile paths; float64 always takes the SIMT path.
PATHS = [(torch.float32, "tensor"), (torch.float32, "simt"), (torch.float64, "simt")]


@contextlib.contextmanager
def tiles(path: str):
    """GMVQ_CUDA_TILES for the calls inside (quantize.cu reads it at each call)."""
    old = os.environ.get("GMVQ_CUDA_TILES")
    os.environ["GMVQ_CUDA_TILES"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["GMVQ_CUDA_TILES"]
        else:
            os.environ["GMVQ_CUDA_TILES"] = old


def scalars(temperature=0.7, seed=2**33 + 11, offset=3, device="cpu"):
    return (torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor([seed, offset], dtype=torch.int64, device=device))


def upstream_grads(z, e, seed=1):
    """Random gradients of (z_out, q_bar, latent_reg) on z's device, made before any
    region that must not sync (a host-to-device copy from pageable memory does)."""
    n, d, k = z.shape[0], z.shape[1], e.shape[0]
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    grads = [torch.randn(n, d, generator=gen, dtype=torch.float64).to(z.dtype),
             torch.randn(k, generator=gen, dtype=torch.float64).to(acc),
             torch.randn(n, generator=gen, dtype=torch.float64).to(acc)]
    return [g.to(z.device) for g in grads]


def forward_backward(z, w, e, hard, training, temperature, state, gumbel=None, eps=None, sigma_z2=0.4,
                     upstream=None):
    """quantize, then quantize_backward of the upstream gradients, on the inputs' device."""
    out = gmvq.quantize(z, w, e, temperature, sigma_z2, hard, training, state, gumbel, eps)
    upstream = upstream_grads(z, e) if upstream is None else upstream
    grads = gmvq.quantize_backward(*upstream, z, w, e, out[1], out[4], out[5], temperature, sigma_z2, hard,
                                   training, state, gumbel, eps)
    return list(out), list(grads)


def assert_close(actual, expected, dtype, scale=1.0):
    tol = tolerance(dtype)
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)


def cuda_inputs(shape, dtype, weight, seed=0):
    n, k, d = shape
    return make_codebook_inputs(n=n, k=k, d=d, dtype=dtype, device="cuda", weight=weight, seed=seed)


def to_cpu(tensors):
    return [t if t is None else t.cpu() for t in tensors]


# --------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["uniform", "gumbel", "gaussian"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 19), (129, 1023)])
@pytest.mark.parametrize("state_device", ["cpu", "cuda"])
def test_philox_noise_is_bitwise_the_cpu_noise(distribution, shape, state_device):
    state = torch.tensor([2**40 + 17, 2**33 + 5], device=state_device)
    cuda = gmvq.philox_noise(torch.empty(shape, device="cuda"), state, distribution)
    cpu = gmvq.philox_noise(torch.empty(shape), state.cpu(), distribution)
    assert cuda.dtype == torch.float32 and cuda.shape == shape
    assert torch.equal(cuda.cpu().view(torch.int32), cpu.view(torch.int32))


# --------------------------------------------------------------------------
# The fused quantize on both tile paths against the CPU op
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,path", PATHS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("given_noise", [False, True], ids=["philox", "given"])
def test_quantize_matches_the_cpu_op(dtype, path, weight, mode, given_noise):
    hard, training = MODES[mode]
    z, w, e = cuda_inputs(SHAPE, dtype, weight)
    n, k, d = SHAPE
    temperature, state = scalars()
    gumbel = eps = None
    if given_noise:
        other = torch.tensor([5, 9])
        gumbel = gmvq.philox_noise(torch.empty(n, k), other, "gumbel").to("cuda", dtype)
        eps = gmvq.philox_noise(torch.empty(n, d), other, "gaussian").to("cuda", dtype)
    with tiles(path):
        out, grads = forward_backward(z, w, e, hard, training, temperature, state, gumbel, eps)
    ref_out, ref_grads = forward_backward(*to_cpu([z, w, e]), hard, training, temperature, state, *to_cpu([gumbel, eps]))
    assert torch.equal(out[1].cpu(), ref_out[1])
    scale = max(1.0, d / 8)  # the distance cancels terms of size ~ 2 D
    for name, a, b in zip(["z_out", "indices", "q_bar", "latent_reg", "row_lse", "z_soft"], out, ref_out):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name == "row_lse" and not training:  # eval has no y: only lse_pi is specified
            a, b = a[:, 0], b[:, 0]
        assert_close(a, b, dtype, scale)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype
        magnitude = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        assert_close(a, b, dtype, scale * magnitude)


@pytest.mark.parametrize("path", ["tensor", "simt"])
@pytest.mark.parametrize("mode", list(MODES))
def test_quantize_is_bitwise_deterministic(path, mode):
    z, w, e = cuda_inputs((5000, 1000, 64), torch.float32, "full", seed=3)
    temperature, state = scalars(device="cuda")
    with tiles(path):
        first = forward_backward(z, w, e, *MODES[mode], temperature, state)
        second = forward_backward(z, w, e, *MODES[mode], temperature, state)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# No host sync: device-resident scalars, sync debug mode, CUDA graphs
# --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_device_scalars_without_a_host_sync(mode):
    z, w, e = cuda_inputs((300, 70, 16), torch.float32, "full")
    upstream = upstream_grads(z, e)
    host = forward_backward(z, w, e, *MODES[mode], *scalars(), upstream=upstream)
    device_scalars = scalars(device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        device = forward_backward(z, w, e, *MODES[mode], *device_scalars, upstream=upstream)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(host[0] + host[1], device[0] + device[1]):
        assert torch.equal(a, b)


def test_quantize_forward_and_backward_capture_in_a_cuda_graph():
    z, w, e = cuda_inputs((300, 70, 16), torch.float32, "full")
    temperature, state = scalars(device="cuda")
    upstream = upstream_grads(z, e)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: allocator, kernel attributes
        forward_backward(z, w, e, True, True, temperature, state, upstream=upstream)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward_backward(z, w, e, True, True, temperature, state, upstream=upstream)
    # New values in the same device tensors: the replay reads them.
    temperature.fill_(0.3)
    state[1] += 1
    graph.replay()
    torch.cuda.synchronize()
    eager = forward_backward(z, w, e, True, True, temperature, state, upstream=upstream)
    for a, b in zip(captured[0] + captured[1], eager[0] + eager[1]):
        assert torch.equal(a, b)


def test_out_of_range_index_is_a_device_assertion():
    code = textwrap.dedent("""
        import torch, gmvq_ext
        z, w, e = torch.randn(10, 4, device="cuda"), torch.rand(10, 4, device="cuda") + 0.5, torch.randn(6, 4, device="cuda")
        t, s = torch.tensor(1.0), torch.tensor([1, 2])
        out = torch.ops.gmvq.quantize(z, w, e, t, 0.5, True, False, s, None, None)
        index = out[1].clone()
        index[3] = 6
        torch.ops.gmvq.quantize_backward(torch.ones(10, 4, device="cuda"), torch.ones(6, device="cuda"),
                                         torch.ones(10, device="cuda"), z, w, e, index, out[4], out[5], t, 0.5,
                                         True, False, s, None, None)
        torch.cuda.synchronize()
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE_PARENT, capture_output=True, text=True,
                            env=subprocess_env(), timeout=120)
    assert result.returncode != 0
    assert "indices must lie in [0, K)" in result.stderr or "device-side assert" in result.stderr


# --------------------------------------------------------------------------
# The unfused ops: determinism and device-resident scalars
# --------------------------------------------------------------------------
def test_unfused_ops_are_bitwise_deterministic():
    z, w, e = cuda_inputs((3000, 700, 32), torch.float32, "full", seed=4)
    temperature, state = scalars(0.5, 1, 2, device="cuda")

    def run():
        probs, lse = gmvq.weighted_softmax(z, w, e, temperature)
        sample, index = gmvq.gumbel_argmax(probs.log(), temperature, False, state, None)
        entropy, q_bar = gmvq.aggregated_posterior_entropy(sample)
        grads = gmvq.weighted_softmax_backward(torch.ones_like(probs), torch.ones_like(lse), probs, z, w, e,
                                               temperature)
        return [probs, lse, sample, index, entropy, q_bar, *grads]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# A size whose N x K logits (16 GiB in fp32) are never allocated
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_quantize_large_without_n_by_k_memory():
    n, k, d = 262144, 16384, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, d, device="cuda", generator=gen)
    w = torch.nn.functional.softplus(torch.randn(n, d, device="cuda", generator=gen))
    e = torch.randn(k, d, device="cuda", generator=gen)
    temperature, state = scalars(1.0, 7, 0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, grads = forward_backward(z, w, e, True, True, temperature, state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    print(f"peak {peak / 2**30:.2f} GiB above the inputs")
    for t in out[:1] + grads[:3]:
        assert torch.isfinite(t).all()
    torch.testing.assert_close(out[2].sum().item(), 1.0, rtol=1e-4, atol=1e-4)
    rows = torch.arange(0, n, n // 64, device="cuda")
    small = forward_backward(z[rows], w[rows], e, True, False, temperature, state)[0]
    cpu = forward_backward(*to_cpu([z[rows], w[rows], e]), True, False, temperature.cpu(), state.cpu())[0]
    assert torch.equal(small[1].cpu(), cpu[1])
    # (N, D) temporaries only: an N x K buffer alone would be 16 GiB.
    assert peak < n * k * 4 / 8, f"peak {peak / 2**30:.2f} GiB: an N x K buffer was allocated"


# --------------------------------------------------------------------------
# torch.library machinery on CUDA (needs gmvq_ext's fake kernels and autograd)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
def test_opcheck_on_cuda(weight):
    z, w, e = make_codebook_inputs(n=10, k=6, d=4, device="cuda", weight=weight)
    logits = make_logits(10, 6, device="cuda")
    temperature, state = scalars(0.5, 1, 2, device="cuda")
    cases = [
        (gmvq.codebook_distance.default, (z, w, e)),
        (gmvq.weighted_softmax.default, (z, w, e, temperature)),
        (gmvq.gumbel_argmax.default, (logits, temperature, True, state, None)),
        (gmvq.aggregated_posterior_entropy.default, (logits,)),
        (gmvq.quantize.default, (z, w, e, temperature, 0.5, True, True, state, None, None)),
        (gmvq.quantize.default, (z, w, e, temperature, 0.5, False, True, state, None, None)),
    ]
    for op, args in cases:
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a.dim() > 0 else a for a in args)
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_on_cuda():
    z, w, e = [t.requires_grad_() for t in cuda_inputs((300, 70, 16), torch.float32, "full")]
    temperature, state = scalars(0.9, 3, 4, device="cuda")

    def loss_fn(z, w, e, temperature, state):
        z_out, _, q_bar, latent, _, _ = gmvq.quantize(z, w, e, temperature, 0.5, True, True, state, None, None)
        return z_out.square().mean() + latent.mean() + (q_bar * q_bar.clamp_min(1e-30).log()).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    # New values in the same tensors: no recompile and no sync between the steps.
    for value, offset in [(0.9, 4), (0.5, 5)]:
        temperature.fill_(value)
        state[1] = offset
        grads = torch.autograd.grad(compiled(z, w, e, temperature, state), [z, w, e])
        eager_grads = torch.autograd.grad(loss_fn(z, w, e, temperature, state), [z, w, e])
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b)
