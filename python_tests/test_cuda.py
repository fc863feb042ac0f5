"""CUDA kernels against the float64 CPU reference, and what only CUDA has:
bitwise determinism, noise identical to the CPU bits, the fused quantize at a
size whose N x K matrix would not fit, opcheck and torch.compile on CUDA.

Every test here is skipped without a CUDA device and a CUDA build, except
under tools/emulate_cuda.sh (GMVQ_CUDA_TEST_DEVICE=cpu), which runs the CUDA
kernels' code on CPU threads registered for CPU tensors: then the tests that
need a real GPU (memory, torch.compile on CUDA) are skipped instead."""

from __future__ import annotations

import os

import pytest
import torch

from gmvq_ext import ops, reference
from helpers import ALL_DTYPES, make_codebook_inputs, make_logits, requires_cuda, tolerance

DEVICE = os.environ.get("GMVQ_CUDA_TEST_DEVICE", "cuda")
EMULATED = DEVICE == "cpu"
pytestmark = [] if EMULATED else [requires_cuda]
needs_real_gpu = pytest.mark.skipif(EMULATED, reason="needs a real GPU, not the CPU emulation")

WEIGHTS = [None, "full", "scalar"]
# (N, K, D): one partial tile; several tiles, segments and reduction chunks,
# none of them a multiple of the tile sizes.
SHAPES = [(37, 19, 5), (517, 131, 70)]
MODES = [  # (hard, training)
    (True, True), (False, True), (True, False)]


def to_reference(t):
    """The same values on the CPU in float64, as a new leaf that keeps requires_grad."""
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64).requires_grad_(t.requires_grad)


def leaves(*tensors):
    return [t for t in tensors if t is not None]


def assert_close(actual, expected, dtype, scale=1.0):
    tol = tolerance(dtype)
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)


def check_grads(outputs, ref_outputs, inputs, ref_inputs, dtype, scale=1.0, seed=0):
    """Autograd through the CUDA op against autograd through the reference, random upstream."""
    gen = torch.Generator().manual_seed(seed)
    # Upstream values exactly representable in each kernel output's dtype, so
    # both sides see the same upstream gradient (autograd rounds it to bf16/fp16).
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(k.dtype).double()
                for o, k in zip(ref_outputs, outputs)]
    loss = sum((o.double() * u.to(o.device)).sum() for o, u in zip(outputs, upstream))
    ref_loss = sum((o * u).sum() for o, u in zip(ref_outputs, upstream))
    grads = torch.autograd.grad(loss, leaves(*inputs))
    ref_grads = torch.autograd.grad(ref_loss, leaves(*ref_inputs), allow_unused=True)
    for grad, ref_grad, source in zip(grads, ref_grads, leaves(*inputs)):
        assert grad.device == source.device and grad.dtype == source.dtype and grad.shape == source.shape
        # A float32 noise input keeps float32 precision in its gradient.
        grad_dtype = source.dtype if dtype == torch.float64 else dtype
        ref_grad = torch.zeros_like(grad) if ref_grad is None else ref_grad
        # Gradients are sums over N or K of terms as large as the largest
        # entry: their rounding error scales with it.
        magnitude = max(1.0, ref_grad.abs().max().item()) if ref_grad.numel() else 1.0
        assert_close(grad, ref_grad, grad_dtype, scale * magnitude)


def codebook_inputs(shape, dtype, weight, seed=0):
    n, k, d = shape
    return [t if t is None else t.requires_grad_()
            for t in make_codebook_inputs(n=n, k=k, d=d, dtype=dtype, device=DEVICE, weight=weight, seed=seed)]


# --------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------
@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 19), (129, 1023)])
def test_philox_noise_is_bitwise_the_cpu_noise(gaussian, shape):
    seed, offset = 2**40 + 17, 2**33 + 5
    like = torch.empty(shape)
    cuda = ops.philox_noise(like.to(DEVICE), seed, offset, gaussian)
    cpu = ops.philox_noise(like, seed, offset, gaussian)
    assert cuda.dtype == torch.float32 and cuda.shape == shape and cuda.device.type == DEVICE
    assert torch.equal(cuda.cpu().view(torch.int32), cpu.view(torch.int32))
    if not gaussian:  # (reference.gaussian_noise's CPU torch.sqrt is not always correctly rounded)
        assert torch.equal(cpu.view(torch.int32), reference.gumbel_noise(seed, offset, *shape).view(torch.int32))


# --------------------------------------------------------------------------
# The unfused ops
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_codebook_distance(dtype, weight, shape):
    inputs = codebook_inputs(shape, dtype, weight)
    ref_inputs = [to_reference(t) for t in inputs]
    out = ops.codebook_distance(*inputs)
    ref = reference.codebook_distance(*ref_inputs)
    assert out.device.type == DEVICE and out.dtype == reference.accumulation_dtype(dtype)
    # The GEMM form cancels terms of size |z|^2 + |e|^2 ~ 2 D.
    scale = max(1.0, shape[2] / 8)
    assert_close(out, ref, dtype, scale)
    check_grads([out], [ref], inputs, ref_inputs, dtype, scale)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weighted_softmax(dtype, weight, shape):
    inputs = codebook_inputs(shape, dtype, weight)
    ref_inputs = [to_reference(t) for t in inputs]
    probs, lse = ops.weighted_softmax(*inputs, 0.7)
    ref_probs, ref_lse = reference.weighted_softmax(*ref_inputs, 0.7)
    scale = max(1.0, shape[2] / 8)
    assert_close(probs, ref_probs, dtype, scale)
    assert_close(lse, ref_lse, dtype, scale)
    check_grads([probs, lse], [ref_probs, ref_lse], inputs, ref_inputs, dtype, scale)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("given_noise", [False, True])
@pytest.mark.parametrize("shape", [(37, 19), (300, 1025)], ids=str)
def test_gumbel_argmax(dtype, hard, given_noise, shape):
    logits = make_logits(*shape, dtype=dtype, device=DEVICE, requires_grad=True)
    noise = reference.gumbel_noise(5, 9, *shape).to(DEVICE).requires_grad_() if given_noise else None
    sample, index = ops.gumbel_argmax(logits, 0.6, hard, 5, 9, noise)
    ref_logits, ref_noise = to_reference(logits), to_reference(noise)
    ref_sample, ref_index = reference.gumbel_argmax(ref_logits, 0.6, hard, 5, 9, ref_noise)
    assert torch.equal(index.cpu(), ref_index)
    assert_close(sample, ref_sample, dtype)
    check_grads([sample], [ref_sample], [logits, noise], [ref_logits, ref_noise], dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 19), (1000, 300), (0, 7)], ids=str)
def test_aggregated_posterior_entropy(dtype, shape):
    logits = make_logits(*shape, dtype=dtype, device=DEVICE, requires_grad=True)
    entropy, q_bar = ops.aggregated_posterior_entropy(logits)
    ref_logits = to_reference(logits)
    ref_entropy, ref_q_bar = reference.aggregated_posterior_entropy(ref_logits)
    assert_close(entropy, ref_entropy, dtype)
    assert_close(q_bar, ref_q_bar, dtype)
    if shape[0] > 0:
        check_grads([entropy, q_bar], [ref_entropy, ref_q_bar], [logits], [ref_logits], dtype)


# --------------------------------------------------------------------------
# The fused quantize
# --------------------------------------------------------------------------
def run_quantize(inputs, hard, training, given_noise, use_kernel, seed=11, offset=3, temperature=0.8,
                 sigma_z2=0.4):
    """(outputs, (gumbel_noise, eps_noise)) of the kernel or of the reference on these inputs.

    Given noise is a new float32 leaf each call. Without it, the reference gets
    the kernels' Gaussian noise (the CPU op, bitwise the CUDA one):
    reference.gaussian_noise uses torch.sqrt, which on CPU is not always
    correctly rounded (1 ulp apart in the erfinv tail)."""
    z, w, e = inputs
    n, d, k = z.shape[0], z.shape[1], e.shape[0]
    gumbel = eps = None
    if given_noise:
        gumbel = reference.gumbel_noise(seed + 1, offset, n, k).to(z.device).requires_grad_()
        eps = reference.gaussian_noise(seed + 1, offset, n, d).to(z.device).requires_grad_()
    args = (temperature, sigma_z2, hard, training, seed, offset, gumbel)
    if use_kernel:
        return ops.quantize(z, w, e, *args, eps), (gumbel, eps)
    ref_eps = eps if given_noise else ops.philox_noise(torch.empty(n, d), seed, offset, True).to(z.device)
    return reference.quantize(z, w, e, *args, ref_eps), (gumbel, eps)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=["hard", "soft", "eval"])
@pytest.mark.parametrize("given_noise", [False, True], ids=["philox", "given"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize(dtype, weight, mode, given_noise, shape):
    hard, training = mode
    inputs = codebook_inputs(shape, dtype, weight)
    ref_inputs = [to_reference(t) for t in inputs]
    (z_out, index, q_bar, latent), noise = run_quantize(inputs, hard, training, given_noise, True)
    (ref_z_out, ref_index, ref_q_bar, ref_latent), ref_noise = run_quantize(ref_inputs, hard, training,
                                                                            given_noise, False)
    assert z_out.dtype == dtype and index.dtype == torch.int64
    assert q_bar.dtype == latent.dtype == reference.accumulation_dtype(dtype)
    assert torch.equal(index.cpu(), ref_index)
    scale = max(1.0, shape[2] / 8)
    assert_close(z_out, ref_z_out, dtype, scale)
    assert_close(q_bar, ref_q_bar, dtype, scale)
    assert_close(latent, ref_latent, dtype, scale)
    check_grads([z_out, q_bar, latent], [ref_z_out, ref_q_bar, ref_latent],
                list(inputs) + list(noise), list(ref_inputs) + list(ref_noise), dtype, scale)


def test_quantize_empty_batch():
    z, w, e = codebook_inputs((0, 9, 4), torch.float32, "full")
    z_out, index, q_bar, latent = ops.quantize(z, w, e, 1.0, 0.5, True, True, 0, 0, None, None)
    assert z_out.shape == (0, 4) and index.shape == (0,) and latent.shape == (0,)
    assert torch.equal(q_bar.cpu(), torch.zeros(9))
    (z_out.sum() + q_bar.sum() + latent.sum()).backward()
    assert torch.equal(e.grad.cpu(), torch.zeros(9, 4))


def test_quantize_non_contiguous_inputs():
    z, w, e = codebook_inputs((64, 40, 6), torch.float32, "full")
    z_t = z.detach().t().contiguous().t().requires_grad_()  # column-major
    e_x = e.detach()[:, :1].expand(40, 6).requires_grad_()  # expanded
    out = ops.quantize(z_t, w, e_x, 1.0, 0.5, True, True, 1, 2, None, None)
    ref = reference.quantize(*(to_reference(t) for t in (z_t, w, e_x)), 1.0, 0.5, True, True, 1, 2)
    assert torch.equal(out[1].cpu(), ref[1])
    assert_close(out[0], ref[0], torch.float32)


# --------------------------------------------------------------------------
# Determinism: the same call twice gives the same bits (no float atomics)
# --------------------------------------------------------------------------
def fused_and_grads(inputs, hard, training):
    (z_out, index, q_bar, latent), _ = run_quantize(inputs, hard, training, False, True)
    loss = (z_out.float() * torch.linspace(-1, 1, z_out.numel(), device=DEVICE).view_as(z_out)).sum() \
        + (q_bar * torch.arange(q_bar.numel(), device=DEVICE)).sum() + latent.sum()
    grads = torch.autograd.grad(loss, leaves(*inputs))
    return [z_out, index, q_bar, latent, *grads]


@needs_real_gpu
@pytest.mark.parametrize("mode", MODES, ids=["hard", "soft", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_is_bitwise_deterministic(mode, dtype):
    inputs = codebook_inputs((5000, 1000, 64), dtype, "full", seed=3)
    first = fused_and_grads(inputs, *mode)
    second = fused_and_grads(inputs, *mode)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_real_gpu
def test_unfused_ops_are_bitwise_deterministic():
    z, w, e = codebook_inputs((3000, 700, 32), torch.float32, "full", seed=4)

    def run():
        probs, lse = ops.weighted_softmax(z, w, e, 0.5)
        sample, _ = ops.gumbel_argmax(probs.log(), 0.5, False, 1, 2, None)
        entropy, _ = ops.aggregated_posterior_entropy(sample)
        return [probs, lse, sample, entropy, *torch.autograd.grad(entropy + lse.sum(), [z, w, e])]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# A size whose N x K logits (16 GiB in fp32) are never allocated
# --------------------------------------------------------------------------
@pytest.mark.slow
@needs_real_gpu
def test_quantize_large_without_n_by_k_memory():
    n, k, d = 262144, 16384, 64
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    z = torch.randn(n, d, device=DEVICE, generator=gen).requires_grad_()
    w = torch.nn.functional.softplus(torch.randn(n, d, device=DEVICE, generator=gen)).requires_grad_()
    e = torch.randn(k, d, device=DEVICE, generator=gen).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    z_out, index, q_bar, latent = ops.quantize(z, w, e, 1.0, 0.5, True, True, 7, 0, None, None)
    (z_out.square().mean() + latent.mean() - (q_bar * q_bar.clamp_min(1e-30).log()).sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < n * k * 4 / 50, f"peak {peak / 2**30:.2f} GiB: an N x K buffer was allocated"
    assert torch.isfinite(z_out).all() and torch.isfinite(z.grad).all()
    assert torch.isfinite(w.grad).all() and torch.isfinite(e.grad).all()
    torch.testing.assert_close(q_bar.sum().item(), 1.0, rtol=1e-4, atol=1e-4)
    # Spot-check 64 rows against the reference on the same device.
    rows = torch.arange(0, n, n // 64, device=DEVICE)
    ref = reference.quantize(z[rows].detach(), w[rows].detach(), e.detach(), 1.0, 0.5, True, False, 7, 0)
    eval_out = ops.quantize(z[rows].detach(), w[rows].detach(), e.detach(), 1.0, 0.5, True, False, 7, 0, None, None)
    assert torch.equal(eval_out[1], ref[1])


# --------------------------------------------------------------------------
# torch.library machinery on CUDA
# --------------------------------------------------------------------------
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
def test_opcheck_on_cuda(weight):
    z, w, e = make_codebook_inputs(n=10, k=6, d=4, device=DEVICE, weight=weight)
    logits = make_logits(10, 6, device=DEVICE)
    cases = [
        (torch.ops.gmvq.codebook_distance.default, (z, w, e)),
        (torch.ops.gmvq.weighted_softmax.default, (z, w, e, 0.5)),
        (torch.ops.gmvq.gumbel_argmax.default, (logits, 0.5, True, 1, 2, None)),
        (torch.ops.gmvq.aggregated_posterior_entropy.default, (logits,)),
        (torch.ops.gmvq.quantize.default, (z, w, e, 0.5, 0.5, True, True, 1, 2, None, None)),
        (torch.ops.gmvq.quantize.default, (z, w, e, 0.5, 0.5, False, True, 1, 2, None, None)),
    ]
    for op, args in cases:
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
        torch.library.opcheck(op, args)


@needs_real_gpu
def test_torch_compile_fullgraph_on_cuda():
    z, w, e = codebook_inputs((300, 70, 16), torch.float32, "full")

    def loss_fn(z, w, e):
        z_out, _, q_bar, latent = ops.quantize(z, w, e, 0.9, 0.5, True, True, 3, 4, None, None)
        return z_out.square().mean() + latent.mean() + (q_bar * q_bar.clamp_min(1e-30).log()).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(z, w, e)
    grads = torch.autograd.grad(loss, [z, w, e])
    eager_loss = loss_fn(z, w, e)
    eager_grads = torch.autograd.grad(eager_loss, [z, w, e])
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
