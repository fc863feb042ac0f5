"""gmvq::quantize and gmvq::quantize_backward against reference.quantize.

The reference is the specification: forward values are compared output by
output, gradients with autograd through the reference. Low-precision inputs
are compared with the reference run on the same rounded values in float32."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gmvq_ext import ops, reference
from helpers import (CPU_VECTOR_PATHS, CUDA_KERNEL_DEVICES, DEVICES, EMULATED, FLOAT_DTYPES, HAS_CUDA,
                     LOW_PRECISION_DTYPES, PACKAGE_PARENT, WEIGHT_MODES, assert_close, compare_indices, cuda_tiles,
                     distance_scale, logit_error_factor, make_codebook_inputs, near_tie_limit, present,
                     quantize_logits_and_scale, requires_cuda, subprocess_env, tolerance, upcast)

SEED, OFFSET = 1234, 7
TEMPERATURE, SIGMA_Z2 = 0.7, 0.5
# mode -> (hard, training)
MODES = {"train_hard": (True, True), "train_soft": (False, True), "eval": (True, False)}


def kernel(z, weight, codebook, temperature, sigma_z2, hard, training, noise_state, gumbel=None, eps=None,
           noise_scale=1.0):
    """torch.ops.gmvq.quantize itself, all six outputs (the typed wrapper returns four)."""
    return torch.ops.gmvq.quantize(z, weight, codebook, torch.tensor(temperature, dtype=torch.float64), sigma_z2,
                                   hard, training, ops.noise_state(*noise_state), gumbel, eps, noise_scale)


def run(fn, z, weight, codebook, mode, gumbel=None, eps=None, seed=SEED, offset=OFFSET, noise_scale=1.0):
    """(z_out, indices, q_bar, latent_reg, row_lse, z_soft) of `kernel` or `reference.quantize`."""
    hard, training = MODES[mode]
    return fn(z, weight, codebook, TEMPERATURE, SIGMA_Z2, hard, training, (seed, offset), gumbel, eps,
              noise_scale=noise_scale)


def upstream_grads(n, k, d, dtype, device, seed=1):
    """Random upstream gradients for (z_out, q_bar, latent_reg). grad z_out is
    representable in z's dtype so that the kernel (whose z_out has that dtype)
    and the float32 reference see the same values."""
    gen = torch.Generator().manual_seed(seed)
    acc = reference.accumulation_dtype(dtype)
    g_z = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).to(acc)
    g_q = torch.randn(k, generator=gen, dtype=torch.float64).to(acc)
    g_l = torch.randn(n, generator=gen, dtype=torch.float64).to(acc)
    return g_z.to(device), g_q.to(device), g_l.to(device)


def scalar_loss(outputs, grads):
    z_out, _, q_bar, latent_reg = outputs[:4]
    g_z, g_q, g_l = grads
    return (z_out.to(g_z.dtype) * g_z).sum() + (q_bar * g_q).sum() + (latent_reg * g_l).sum()


def grads_of(outputs, grads, inputs):
    """The gradients of scalar_loss for each input: None for an absent one, zeros where it is unused."""
    found = iter(torch.autograd.grad(scalar_loss(outputs, grads), present(*inputs), allow_unused=True))
    result = []
    for t in inputs:
        if t is None:
            result.append(None)
            continue
        g = next(found)
        result.append(torch.zeros_like(t) if g is None else g)
    return result


def explicit_noise(n, k, d, dtype, device, requires_grad):
    gumbel = reference.gumbel_noise((SEED, OFFSET), n, k).to(dtype=dtype, device=device)
    eps = reference.gaussian_noise((SEED, OFFSET), n, d).to(dtype=dtype, device=device)
    return gumbel.requires_grad_(requires_grad), eps.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("noise", ["philox", "explicit"])
def test_matches_reference(device, dtype, weight, mode, noise):
    n, k, d = 37, 19, 5
    z, w, e = make_codebook_inputs(n, k, d, dtype=dtype, device=device, weight=weight, requires_grad=True)
    gumbel, eps = explicit_noise(n, k, d, dtype, device, True) if noise == "explicit" else (None, None)
    inputs = [z, w, e, gumbel, eps]
    grads = upstream_grads(n, k, d, dtype, device)

    got = run(kernel, *inputs[:3], mode, gumbel, eps)
    want = run(reference.quantize, *inputs[:3], mode, gumbel, eps)
    tol = tolerance(dtype)
    acc = reference.accumulation_dtype(dtype)
    assert got[0].dtype == dtype and got[1].dtype == torch.int64
    assert got[2].dtype == got[3].dtype == got[4].dtype == got[5].dtype == acc
    torch.testing.assert_close(got[1], want[1])
    for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]):  # z_out, q_bar, latent_reg, row_lse, z_soft
        torch.testing.assert_close(a, b, **tol)

    for a, b, source in zip(grads_of(got, grads, inputs), grads_of(want, grads, inputs), inputs):
        if source is None:
            continue
        assert a.dtype == source.dtype and a.shape == source.shape
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=str)
@pytest.mark.parametrize("weight", ["full", None], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_low_precision_matches_reference_on_rounded_inputs(device, dtype, weight, mode):
    n, k, d = 37, 19, 5
    z, w, e = make_codebook_inputs(n, k, d, dtype=dtype, device=device, weight=weight, requires_grad=True)
    z32, w32, e32 = upcast(z), upcast(w), upcast(e)
    grads = upstream_grads(n, k, d, dtype, device)

    got = run(kernel, z, w, e, mode)
    want = run(reference.quantize, z32, w32, e32, mode)
    assert got[0].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    torch.testing.assert_close(got[1], want[1])
    # z_out is rounded to the input dtype on the way out: compare it loosely.
    assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(got[2:], want[2:]):  # q_bar, latent_reg, row_lse, z_soft: float32 statistics
        torch.testing.assert_close(a, b, **tolerance(torch.float32))

    for a, b, source in zip(grads_of(got, grads, [z, w, e]), grads_of(want, grads, [z32, w32, e32]), [z, w, e]):
        if source is None:
            continue
        assert a.dtype == dtype
        assert_close(a, b, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_indices_equal_reference_for_the_same_seed(device, mode):
    # float64 inputs: no near ties between the kernel's and the reference's rounding.
    n, k, d = 300, 64, 8
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float64, device=device, weight="full", seed=3)
    for seed, offset in [(0, 0), (2**40 + 5, 3), (SEED, 2**33)]:
        got = run(kernel, z, w, e, mode, seed=seed, offset=offset)[1]
        want = run(reference.quantize, z, w, e, mode, seed=seed, offset=offset)[1]
        assert torch.equal(got, want)
    if MODES[mode][1]:  # training: the noise does move the codes
        assert not torch.equal(run(kernel, z, w, e, mode, seed=1)[1], run(kernel, z, w, e, mode, seed=2)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train_hard", "train_soft"])
def test_explicit_reference_noise_equals_generated_noise(device, mode):
    # Rows spanning several blocks and stripes, K not a multiple of 4 (Philox words).
    n, k, d = 700, 203, 7
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float32, device=device, weight="full", requires_grad=True)
    gumbel, eps = explicit_noise(n, k, d, torch.float32, device, False)
    grads = upstream_grads(n, k, d, torch.float32, device)
    generated = run(kernel, z, w, e, mode)
    generated_grads = grads_of(generated, grads, [z, w, e])
    # The Gumbel noise of reference.py is bit-identical to the kernel's.
    given = run(kernel, z, w, e, mode, gumbel)
    for a, b in zip(generated, given):
        assert torch.equal(a, b)
    for a, b in zip(generated_grads, grads_of(given, grads, [z, w, e])):
        assert torch.equal(a, b)
    # The Gaussian noise too.
    given = run(kernel, z, w, e, mode, gumbel, eps)
    for a, b in zip(generated, given):
        assert torch.equal(a, b)
    for a, b in zip(generated_grads, grads_of(given, grads, [z, w, e])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference_when_stripes_hold_several_blocks(weight, mode):
    # The CPU kernel takes at least 128 rows per block and makes at most 64
    # stripes: 9000 rows make 71 blocks, so some stripes run two (the codebook
    # gradient's per-stripe sums then span blocks). Sums over
    # K = 512 codes lose more than the default float32 tolerance allows, so
    # the check is against the float64 reference (same noise), to 1e-5 of the
    # largest value: the float32 reference's own error is about 1e-6 of it.
    n, k, d = 9000, 512, 4
    z, w, e = make_codebook_inputs(n, k, d, weight=weight, requires_grad=True, seed=7)
    exact = [t if t is None else t.detach().double().requires_grad_() for t in (z, w, e)]
    grads = upstream_grads(n, k, d, torch.float32, "cpu")
    got = run(kernel, z, w, e, mode)
    want = run(reference.quantize, *exact, mode)
    torch.testing.assert_close(got[1], want[1])
    got_grads = grads_of(got, grads, [z, w, e])
    want_grads = grads_of(want, [g.double() for g in grads], exact)
    for a, b in zip(list(got[:1] + got[2:]) + got_grads, list(want[:1] + want[2:]) + want_grads):
        if a is not None:
            largest = b.abs().max().item() if b.numel() else 0.0
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * largest)


_EXP_PATH_SCRIPT = textwrap.dedent("""
    import sys, torch
    from gmvq_ext import ops
    z, w, e, (g_z, g_q, g_l), hard = torch.load(sys.argv[1])
    inputs = [t.requires_grad_() for t in (z, w, e)]
    z_out, indices, q_bar, latent_reg = ops.quantize(z, w, e, 0.7, 0.5, hard, True, (3, 4))
    loss = (z_out * g_z).sum() + (q_bar * g_q).sum() + (latent_reg * g_l).sum()
    torch.save([z_out, indices, q_bar, latent_reg, *torch.autograd.grad(loss, inputs)], sys.argv[2])
""")


@pytest.mark.parametrize("mode", ["train_hard", "train_soft"])
def test_every_cpu_exponential_path_matches_the_reference(mode, tmp_path):
    # The CPU exponentials have a portable copy and fused-multiply-add copies
    # on 8 (AVX2 + FMA) and 16 floats (AVX-512); GMVQ_CPU_EXP_PATH picks one.
    # Each this machine runs must match the float64 reference; K = 300 runs
    # their chained, single-vector and tail code. A copy with FMA must differ
    # from the portable one in some bit, or it did not run.
    n, k, d = 700, 300, 8
    hard, _ = MODES[mode]
    z, w, e = make_codebook_inputs(n, k, d, weight="full", seed=13)
    grads = upstream_grads(n, k, d, torch.float32, "cpu")
    torch.save([z, w, e, grads, hard], tmp_path / "inputs.pt")
    results = {}
    for path in CPU_VECTOR_PATHS:
        out = tmp_path / f"{path}.pt"
        subprocess.run([sys.executable, "-c", _EXP_PATH_SCRIPT, str(tmp_path / "inputs.pt"), str(out)],
                       env=subprocess_env(GMVQ_CPU_EXP_PATH=path), cwd=PACKAGE_PARENT, check=True, timeout=120)
        results[path] = torch.load(out)

    exact = [t.detach().double().requires_grad_() for t in (z, w, e)]
    want = run(reference.quantize, *exact, mode, seed=3, offset=4)
    want = list(want[:4]) + grads_of(want, [g.double() for g in grads], exact)
    for path, got in results.items():
        assert torch.equal(got[1], want[1]), path
        for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    for path in CPU_VECTOR_PATHS[1:]:
        assert any(not torch.equal(a, b) for a, b in zip(results[path], results["portable"])), path


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_ties_go_to_the_lowest_index(device):
    # Small integers: every distance is exact whatever the GEMM's order, so
    # ties are exact too (repeated codes, equal distances); K = 67 spans several
    # 8-wide vectors and a tail. torch.argmax takes the first maximum.
    gen = torch.Generator().manual_seed(3)
    z = torch.randint(-4, 5, (300, 2), generator=gen).float()
    codebook = torch.randint(-4, 5, (67, 2), generator=gen).float()
    want = (-(z[:, None].double() - codebook.double()) ** 2).sum(-1).argmax(1)
    got = run(kernel, z.to(device), None, codebook.to(device), "eval")[1]
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_nan_input_propagates_like_the_reference(device, mode):
    # A NaN in z makes its row's distances NaN; the clamp at 0 must not turn
    # them into perfect matches (a finite q_bar from a NaN input).
    n, k, d = 37, 19, 5
    z, w, e = make_codebook_inputs(n, k, d, device=device, weight="full")
    z[3, 1] = float("nan")
    inputs = [t.requires_grad_() for t in (z, w, e)]
    grads = upstream_grads(n, k, d, torch.float32, device)
    got, want = run(kernel, *inputs, mode), run(reference.quantize, *inputs, mode)
    assert torch.isnan(got[2]).all() and torch.isnan(got[3][3])
    torch.testing.assert_close(got[1], want[1])
    for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]):
        torch.testing.assert_close(a, b, equal_nan=True, **tolerance(torch.float32))
    for a, b in zip(grads_of(got, grads, inputs), grads_of(want, grads, inputs)):
        torch.testing.assert_close(a, b, equal_nan=True, **tolerance(torch.float32))


def test_reference_gaussian_noise_is_bit_identical_to_the_kernels():
    n, k, d = 700, 203, 7
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float32, weight="full")
    _, eps = explicit_noise(n, k, d, torch.float32, "cpu", False)
    assert torch.equal(run(kernel, z, w, e, "train_hard")[0],
                       run(kernel, z, w, e, "train_hard", None, eps)[0])


# ---------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train_soft", "eval"])
@pytest.mark.parametrize("weight", ["full", "scalar"])
def test_gradcheck(device, mode, weight):
    # Hard training is straight-through (its gradient is not the derivative of
    # its piecewise-constant value), so only the soft and eval paths are checked.
    n, k, d = 6, 5, 3
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float64, device=device, weight=weight, requires_grad=True)
    gumbel, eps = explicit_noise(n, k, d, torch.float64, device, True)

    def fn(z, w, e, gumbel=None, eps=None):
        z_out, _, q_bar, latent_reg, _, _ = run(kernel, z, w, e, mode, gumbel, eps)
        return z_out, q_bar, latent_reg

    assert torch.autograd.gradcheck(fn, (z, w, e, gumbel, eps))
    assert torch.autograd.gradcheck(fn, (z, w, e))  # noise from Philox


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise_scale", [0.0, 0.3])
def test_gradcheck_with_a_noise_scale(device, noise_scale):
    n, k, d = 6, 5, 3
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float64, device=device, weight="full", requires_grad=True)
    gumbel, eps = explicit_noise(n, k, d, torch.float64, device, True)

    def fn(z, w, e, gumbel, eps):
        z_out, _, q_bar, latent_reg, _, _ = run(kernel, z, w, e, "train_soft", gumbel, eps, noise_scale=noise_scale)
        return z_out, q_bar, latent_reg

    assert torch.autograd.gradcheck(fn, (z, w, e, gumbel, eps))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("noise_scale", [0.0, 0.5, 2.0])
def test_noise_scale_matches_reference(device, mode, noise_scale):
    """z_out = z_q + noise_scale * s * eps; 0: z_q itself, and eps_noise gets a zero gradient."""
    n, k, d = 37, 19, 5
    z, w, e = make_codebook_inputs(n, k, d, device=device, weight="full", requires_grad=True)
    gumbel, eps = explicit_noise(n, k, d, torch.float32, device, True)
    inputs = [z, w, e, gumbel, eps]
    grads = upstream_grads(n, k, d, torch.float32, device)
    got = run(kernel, z, w, e, mode, gumbel, eps, noise_scale=noise_scale)
    want = run(reference.quantize, z, w, e, mode, gumbel, eps, noise_scale=noise_scale)
    torch.testing.assert_close(got[1], want[1])
    for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]):
        torch.testing.assert_close(a, b, **tolerance(torch.float32))
    got_grads = grads_of(got, grads, inputs)
    for a, b in zip(got_grads, grads_of(want, grads, inputs)):
        torch.testing.assert_close(a, b, **tolerance(torch.float32))

    hard, training = MODES[mode]
    z_q = got[5] if training and not hard else e[got[1]]
    paper = run(kernel, z, w, e, mode, gumbel, eps)  # noise_scale 1
    # The noise is linear in noise_scale; the code and the latent term do not depend on it.
    torch.testing.assert_close(got[0] - z_q, (noise_scale if training else 0.0) * (paper[0] - z_q),
                               **tolerance(torch.float32))
    assert torch.equal(got[1], paper[1]) and torch.equal(got[3], paper[3])
    if noise_scale == 0.0:
        assert torch.equal(got[0], z_q.detach())
        assert torch.count_nonzero(got_grads[4]) == 0


def test_noise_scale_one_is_the_default_bit_for_bit():
    z, w, e = make_codebook_inputs(37, 19, 5, weight="full")
    for mode in MODES:
        default = run(kernel, z, w, e, mode)
        explicit = run(kernel, z, w, e, mode, noise_scale=1.0)
        assert all(torch.equal(a, b) for a, b in zip(default, explicit))


def _opcheck_samples(device):
    samples = itertools.product(MODES, ["full", None], [False, True])
    for number, (mode, weight, noise) in enumerate(samples):
        n, k, d = 9, 6, 4
        z, w, e = make_codebook_inputs(n, k, d, device=device, weight=weight, requires_grad=True)
        gumbel, eps = explicit_noise(n, k, d, torch.float32, device, True) if noise else (None, None)
        hard, training = MODES[mode]
        # Scalars on the CPU and on the device: both are valid, and a compiled step passes the latter.
        scalar_device = "cpu" if noise else device
        temperature = torch.tensor(TEMPERATURE, device=scalar_device)
        state = ops.noise_state(SEED, OFFSET, device=scalar_device)
        noise_scale = (1.0, 0.0, 0.5)[number % 3]
        yield mode, (z, w, e, temperature, SIGMA_Z2, hard, training, state, gumbel, eps, noise_scale)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_quantize(device):
    for _, args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.gmvq.quantize.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_quantize_backward(device):
    for _, args in _opcheck_samples(device):
        z, w, e, temperature, sigma_z2, hard, training, state, gumbel, eps, noise_scale = args
        z, w, e = (t if t is None else t.detach() for t in (z, w, e))
        gumbel, eps = (t if t is None else t.detach() for t in (gumbel, eps))
        _, indices, _, _, row_lse, z_soft = torch.ops.gmvq.quantize(z, w, e, temperature, sigma_z2, hard, training,
                                                                    state, gumbel, eps, noise_scale)
        grads = upstream_grads(z.shape[0], e.shape[0], z.shape[1], z.dtype, device)
        torch.library.opcheck(
            torch.ops.gmvq.quantize_backward.default,
            (*grads, z, w, e, indices, row_lse, z_soft, temperature, sigma_z2, hard, training, state, gumbel, eps,
             noise_scale))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    # The forward is compiled as one graph; AOTAutograd traces quantize_backward
    # into the compiled backward. The temperature and noise state are tensors on
    # the inputs' device: new values in the same tensors (an annealed
    # temperature, the next step's offset) are read by the same compiled graph.
    n, k, d = 33, 12, 6
    z, w, e = make_codebook_inputs(n, k, d, device=device, weight="full", requires_grad=True)

    temperature = torch.tensor(TEMPERATURE, device=device)
    state = ops.noise_state(SEED, OFFSET, device=device)

    def model_loss(z, w, e, temperature, state):
        z_out, indices, q_bar, latent_reg = ops.quantize(z, torch.nn.functional.softplus(w), e, temperature,
                                                         SIGMA_Z2, True, True, state)
        entropy = -(q_bar * q_bar.clamp_min(1e-30).log()).sum()
        return (z_out * z_out).mean() + 0.1 * latent_reg.mean() - entropy, indices

    compiled = torch.compile(model_loss, fullgraph=True)
    steps = []
    for value, offset in [(TEMPERATURE, OFFSET), (0.3, OFFSET + 1)]:
        temperature.fill_(value)
        state[1] = offset
        results = []
        for fn in (model_loss, compiled):
            loss, indices = fn(z, w, e, temperature, state)
            loss.backward()
            results.append((loss.detach(), indices, [t.grad.clone() for t in (z, w, e)]))
            for t in (z, w, e):
                t.grad = None
        (eager_loss, eager_indices, eager_grads), (loss, indices, grads) = results
        torch.testing.assert_close(loss, eager_loss)
        assert torch.equal(indices, eager_indices)
        for g, g_eager in zip(grads, eager_grads):
            torch.testing.assert_close(g, g_eager)
        steps.append(loss)
    assert not torch.equal(steps[0], steps[1])  # the second step did see the new values


# ---------------------------------------------------------------------------
# Determinism, edge cases, memory
# ---------------------------------------------------------------------------
def _forward_backward(z, w, e, mode):
    inputs = [t.detach().clone().requires_grad_() for t in (z, w, e)]
    outputs = run(kernel, *inputs, mode)
    grads = upstream_grads(z.shape[0], e.shape[0], z.shape[1], z.dtype, z.device)
    return list(outputs) + grads_of(outputs, grads, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_deterministic_run_to_run_and_across_thread_counts(device, mode):
    # Large enough for several blocks and stripes (and for the parallel path).
    n, k, d = 3000, 300, 16
    z, w, e = make_codebook_inputs(n, k, d, device=device, weight="full", seed=5)
    first = _forward_backward(z, w, e, mode)
    second = _forward_backward(z, w, e, mode)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _forward_backward(z, w, e, mode)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("noise", [False, True])
def test_empty_batch(device, mode, noise):
    k, d = 5, 3
    z, w, e = make_codebook_inputs(0, k, d, device=device, weight="full", requires_grad=True)
    gumbel, eps = explicit_noise(0, k, d, torch.float32, device, True) if noise else (None, None)
    z_out, indices, q_bar, latent_reg, row_lse, _ = run(kernel, z, w, e, mode, gumbel, eps)
    assert z_out.shape == (0, d) and indices.shape == (0,) and latent_reg.shape == (0,) and row_lse.shape == (0, 2)
    assert torch.equal(q_bar, torch.zeros(k, device=device))
    inputs = [z, w, e, gumbel, eps]
    grads = grads_of((z_out, indices, q_bar, latent_reg), upstream_grads(0, k, d, torch.float32, device), inputs)
    for g, t in zip(grads, inputs):
        if t is not None:
            assert g.shape == t.shape
    assert torch.equal(grads[2], torch.zeros_like(e))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(23, 1, 4), (23, 7, 1), (1, 1, 1)], ids=str)
def test_degenerate_sizes(device, mode, shape):
    n, k, d = shape
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float64, device=device, weight="full", requires_grad=True)
    grads = upstream_grads(n, k, d, torch.float64, device)
    got, want = run(kernel, z, w, e, mode), run(reference.quantize, z, w, e, mode)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))
    for a, b in zip(grads_of(got, grads, [z, w, e]), grads_of(want, grads, [z, w, e])):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_non_contiguous_and_expanded_inputs(device, mode):
    n, k, d = 31, 11, 6
    z, w, e = make_codebook_inputs(n, k, d, dtype=torch.float64, device=device, weight="scalar", seed=2)
    z_t = z.t().contiguous().t().requires_grad_()               # column-major
    w_expanded = w.expand(n, d).detach().requires_grad_()        # stride 0 in D
    e_sliced = torch.cat([e, e], 1)[:, ::2].detach().requires_grad_()  # stride 2
    gumbel, eps = explicit_noise(n, k, d, torch.float64, device, False)
    gumbel_t, eps_t = gumbel.t().contiguous().t(), eps.t().contiguous().t()
    assert not (z_t.is_contiguous() or w_expanded.is_contiguous() or e_sliced.is_contiguous())
    grads = upstream_grads(n, k, d, torch.float64, device)
    inputs = [z_t, w_expanded, e_sliced]
    got = run(kernel, *inputs, mode, gumbel_t, eps_t)
    want = run(reference.quantize, *inputs, mode, gumbel_t, eps_t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance(torch.float64))
    for a, b in zip(grads_of(got, grads, inputs), grads_of(want, grads, inputs)):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, **tolerance(torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_large_magnitude_inputs_stay_finite(device, mode):
    n, k, d = 64, 32, 16
    z, w, e = make_codebook_inputs(n, k, d, device=device, weight="full")
    z, e = (z * 1e3).requires_grad_(), (e * 1e3).requires_grad_()
    w = (w * 1e2).requires_grad_()
    outputs = run(kernel, z, w, e, mode)
    grads = grads_of(outputs, upstream_grads(n, k, d, torch.float32, device), [z, w, e])
    for t in [outputs[0], outputs[2], outputs[3], *grads]:
        assert torch.isfinite(t).all()
    torch.testing.assert_close(outputs[2].sum(), torch.tensor(1.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    z, w, e = make_codebook_inputs(5, 4, 3, device=device)
    with pytest.raises(RuntimeError, match="gumbel_noise must have shape"):
        ops.quantize(z, w, e, 1.0, 0.5, True, True, (0, 0), torch.zeros(5, 5, device=device))
    with pytest.raises(RuntimeError, match="sigma_z2 must be finite and > 0"):
        ops.quantize(z, w, e, 1.0, 0.0)
    for noise_scale in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="noise_scale must be finite and non-negative"):
            ops.quantize(z, w, e, noise_scale=noise_scale)
    with pytest.raises(RuntimeError, match="codebook must have D = 3"):
        ops.quantize(z, w, e[:, :2])
    # CUDA checks the range on the device (an asynchronous assert, no host sync), and so does its
    # emulation on the CPU (the assert aborts the process there).
    if device == "cpu" and not EMULATED:
        indices = torch.full((5,), 4, dtype=torch.int64, device=device)
        g = upstream_grads(5, 4, 3, torch.float32, device)
        row_lse, z_soft = torch.zeros(5, 2, device=device), torch.zeros(0, 3, device=device)
        with pytest.raises(RuntimeError, match="indices must lie in"):
            torch.ops.gmvq.quantize_backward(*g, z, w, e, indices, row_lse, z_soft, torch.tensor(1.0), 0.5, True,
                                             True, ops.noise_state(0, 0), None, None)


def _largest_allocation(fn):
    """Bytes of the largest tensor allocation (or free) torch's CPU allocator
    reported while fn ran: any N x K intermediate, kept or freed, shows up."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(abs(event.cpu_memory_usage) for event in prof.events())


@pytest.mark.parametrize("mode", list(MODES))
def test_no_n_by_k_allocation_in_forward_or_backward(mode):
    # N well above a block's rows (the CPU kernel works in blocks of >= 128 rows x K).
    n, k, d = 16384, 4096, 8
    z, w, e = make_codebook_inputs(n, k, d, weight="full", requires_grad=True)
    grads = upstream_grads(n, k, d, torch.float32, "cpu")
    n_by_k = n * k * 4

    def fused():
        scalar_loss(run(kernel, z, w, e, mode), grads).backward()

    assert _largest_allocation(fused) < n_by_k // 16
    assert torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0
    if mode == "eval":  # the probe does see N x K tensors: the reference materialises them
        small = n // 4
        z_small, w_small = z[:small].detach(), w[:small].detach()
        assert _largest_allocation(lambda: run(reference.quantize, z_small, w_small, e, mode)) >= small * k * 4


_PEAK_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from gmvq_ext import ops

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def step(n, k, d):
        gen = torch.Generator().manual_seed(0)
        z, w = torch.randn(n, d, generator=gen).requires_grad_(), torch.rand(n, d, generator=gen).requires_grad_()
        e = torch.randn(k, d, generator=gen).requires_grad_()
        z_out, _, q_bar, latent_reg = ops.quantize(z, w, e, 0.7, 0.5, True, True, (1, 0))
        (z_out.sum() + q_bar.sum() + latent_reg.sum()).backward()

    n, k, d = (int(v) for v in sys.argv[1:])
    step(64, k, d)  # one-time allocations (BLAS buffers, thread stacks) before the baseline
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    step(n, k, d)
    print(json.dumps(status("VmHWM") - base))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_resident_memory_stays_far_below_n_by_k():
    # Catches N x K buffers the profiler cannot see (std::vector, malloc): the
    # whole process's peak resident memory over forward + backward.
    # N well above a block's rows: the kernel's per-thread block buffers (>= 128 rows x K)
    # are O(K), an N x K float32 tensor is 256 MiB here.
    n, k, d = 16384, 4096, 8
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(n), str(k), str(d)], env=subprocess_env(),
                          cwd=PACKAGE_PARENT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    # Inputs and outputs are O(N D + K D) (~2 MiB here).
    assert peak < n * k * 4 // 4, f"peak resident memory grew by {peak / 2**20:.1f} MiB"


_OUT_OF_MEMORY_SCRIPT = textwrap.dedent("""
    import os, resource, sys
    import torch
    from gmvq_ext import ops

    direction, headroom_mib = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(2)
    n, k, d = 2048, 65536, 8
    gen = torch.Generator().manual_seed(0)
    z, e = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    temperature, state = torch.tensor(0.7), ops.noise_state(1, 0)
    args = (temperature, 0.5, True, True, state, None, None)
    threads_before = len(os.listdir("/proc/self/task"))
    small = torch.ops.gmvq.quantize(z[:64], None, e[:64], *args)  # thread pool and allocator arenas exist
    # Every op's first call starts the whole OpenMP pool (its subnormal guard
    # runs on each pool thread), whatever its size: the full-size call below
    # needs no new thread, whose creation libgomp cannot fail gracefully.
    assert len(os.listdir("/proc/self/task")) >= threads_before + 1, "the warm-up did not start the pool"
    torch.ops.gmvq.quantize_backward(small[0], torch.ones(64), torch.ones(64), z[:64], None, e[:64], small[1],
                                     small[4], small[5], *args)
    out = torch.ops.gmvq.quantize(z, None, e, *args) if direction == "backward" else None
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom_mib * 2**20, hard))
    try:
        if direction == "forward":
            torch.ops.gmvq.quantize(z, None, e, *args)
        else:
            torch.ops.gmvq.quantize_backward(out[0], torch.ones(k), torch.ones(n), z, None, e, out[1], out[4],
                                             out[5], *args)
        result = "no error"
    except RuntimeError as error:
        result = f"RuntimeError: {error}"
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    again = torch.ops.gmvq.quantize(z[:64], None, e[:64], *args)  # the op still works
    assert torch.equal(again[1], small[1])
    print(result)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux address-space limits")
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_out_of_memory_inside_the_kernel_raises(direction):
    # An allocation fails inside a worker thread (its block buffers or a stripe's
    # partial sum, depending on the headroom): the call raises the allocator's
    # error; no crash, no hang, and the process goes on.
    raised = 0
    for headroom_mib in (1, 4, 8, 16):
        done = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY_SCRIPT, direction, str(headroom_mib)],
                              env=subprocess_env(), cwd=PACKAGE_PARENT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        if done.stdout.startswith("RuntimeError:"):
            assert "allocate" in done.stdout, done.stdout
            raised += 1
        else:
            assert done.stdout.strip() == "no error", done.stdout
    assert raised >= 2


@requires_cuda
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_peak_memory_stays_far_below_n_by_k(mode):
    n, k, d = 8192, 8192, 8
    z, w, e = make_codebook_inputs(n, k, d, weight="full", device="cuda", requires_grad=True)
    grads = upstream_grads(n, k, d, torch.float32, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    scalar_loss(run(kernel, z, w, e, mode), grads).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < n * k * 4 // 4


# ---------------------------------------------------------------------------
# The CUDA kernels: both tile paths, bitwise determinism, device-resident
# scalars without a host sync (sync debug mode, CUDA graph capture), the
# device-side index check, a size whose N x K matrix would not fit. The rows
# over CUDA_KERNEL_DEVICES also run on the emulated kernels (helpers.EMULATED).
# ---------------------------------------------------------------------------
# (N, K, D): no multiple of any tile; several row blocks, code tiles and D
# slices. Emulated: one row block, two code tiles, D not a multiple of 8.
TILE_SHAPE = (45, 70, 13) if EMULATED else (517, 131, 61)

# float32 on both tile paths; float64 always takes the SIMT path.
TILE_PATHS = [(torch.float32, "tensor"), (torch.float32, "simt"), (torch.float64, "simt")]
OP_MODES = {"hard": (True, True), "soft": (False, True), "eval": (True, False)}
OP_KEY = (2**33 + 11, 3)


def op_scalars(temperature=0.7, key=OP_KEY, device="cpu"):
    """The ops' temperature (0-dim float32) and noise state tensors."""
    return (torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(list(key), dtype=torch.int64, device=device))


def op_forward_backward(z, w, e, hard, training, temperature, state, gumbel=None, eps=None, sigma_z2=0.4,
                        upstream=None):
    """torch.ops.gmvq.quantize, then quantize_backward of random upstream gradients (made
    beforehand, since a host-to-device copy syncs); outputs and gradients as lists."""
    out = torch.ops.gmvq.quantize(z, w, e, temperature, sigma_z2, hard, training, state, gumbel, eps)
    if upstream is None:
        upstream = upstream_grads(z.shape[0], e.shape[0], z.shape[1], z.dtype, z.device)
    grads = torch.ops.gmvq.quantize_backward(*upstream, z, w, e, out[1], out[4], out[5], temperature, sigma_z2,
                                             hard, training, state, gumbel, eps)
    return list(out), list(grads)


def to_cpu(tensors):
    return [t if t is None else t.cpu() for t in tensors]


def float64_reference(z, w, e, hard, training, temperature, state, upstream, gumbel=None, eps=None,
                      sigma_z2=0.4):
    """Outputs and gradients (z, weight, codebook, gumbel, eps) of reference.quantize in float64 on
    the CPU, given the same inputs (rounded as the op sees them) and upstream gradients."""
    leaves = [t if t is None else t.detach().cpu().double().requires_grad_() for t in (z, w, e, gumbel, eps)]
    out = reference.quantize(*leaves[:3], temperature.item(), sigma_z2, hard, training, to_cpu([state])[0],
                             *leaves[3:])
    grads = grads_of(out, [g.detach().cpu().double() for g in upstream], leaves)
    return [o.detach() for o in out], grads


def near_tie_rows(indices, z, w, e, training, state, gumbel, path, dtype):
    """compare_indices of a kernel's (or the CPU op's, path "cpu") indices against the float64
    reference, with the path's error bound; asserts that every difference is a near tie and that
    near ties stay rare (near_tie_limit). Returns the rows that differ."""
    logits, scale = quantize_logits_and_scale(z, w, e, training, state, gumbel)
    full_weight = w is not None and w.shape[1] == z.shape[1] and z.shape[1] != 1
    row_error = logit_error_factor(path, dtype, z.shape[1], full_weight) * scale.max(1).values
    result = compare_indices(indices, logits, row_error)
    assert not result["unexplained"], result
    assert result["near_ties"] <= near_tie_limit(z.shape[0]), result
    return result["mismatched"]


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype,path", TILE_PATHS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
@pytest.mark.parametrize("mode", list(OP_MODES))
@pytest.mark.parametrize("given_noise", [False, True], ids=["philox", "given"])
def test_tile_paths_match_the_cpu_op_and_the_reference(device, dtype, path, weight, mode, given_noise):
    hard, training = OP_MODES[mode]
    n, k, d = TILE_SHAPE
    z, w, e = make_codebook_inputs(n, k, d, dtype=dtype, device=device, weight=weight)
    temperature, state = op_scalars()
    gumbel = eps = None
    if given_noise:  # another key than the op's: generating instead of reading would show
        gumbel = reference.gumbel_noise((5, 9), n, k).to(device, dtype)
        eps = reference.gaussian_noise((5, 9), n, d).to(device, dtype)
    upstream = upstream_grads(n, k, d, dtype, device)
    with cuda_tiles(path):
        out, grads = op_forward_backward(z, w, e, hard, training, temperature, state, gumbel, eps,
                                         upstream=upstream)
    scale = distance_scale(d)
    names = ["z_out", "indices", "q_bar", "latent_reg", "row_lse", "z_soft"]
    # Indices: equal to the reference's wherever its top-2 gap exceeds the error bound. Rows
    # that took another code at a near tie (and the CPU op's, on a GPU) leave the row-wise
    # comparisons, and the codebook gradient, which sums over every row, is then not compared.
    differing = set(near_tie_rows(out[1], z, w, e, training, state, gumbel, path, dtype))
    expected = []
    if HAS_CUDA:  # the package's CPU op (absent under the emulation)
        cpu = op_forward_backward(*to_cpu([z, w, e]), hard, training, temperature, state, *to_cpu([gumbel, eps]),
                                  upstream=to_cpu(upstream))
        differing |= set(near_tie_rows(cpu[0][1], z, w, e, training, state, gumbel, "cpu", dtype))
        expected.append(cpu)
    ref_out, ref_grads = float64_reference(z, w, e, hard, training, temperature, state, upstream, gumbel, eps)
    expected.append((ref_out, [g if g is not None else torch.zeros(0, dtype=torch.float64) for g in ref_grads]))
    keep = torch.tensor([i not in differing for i in range(n)])
    row_wise = {"z_out", "indices", "latent_reg"}
    for want_out, want_grads in expected:
        for name, a, b in zip(names, out, want_out):
            assert a.shape == b.shape, name
            if name in row_wise:
                a, b = a.cpu()[keep], b.cpu()[keep]
            if name == "indices":
                assert torch.equal(a, b)
                continue
            if name == "row_lse" and not training:  # eval has no y: only lse_pi is specified
                a, b = a[:, 0], b[:, 0]
            assert_close(a, b, dtype, scale=scale)
        for i, (a, b, source) in enumerate(zip(grads, want_grads, [z, w, e, gumbel, eps])):
            if source is None:
                assert a.numel() == 0
                continue
            assert a.shape == source.shape and a.dtype == source.dtype
            if i == 2 and differing:  # the codebook gradient sums every row
                continue
            if i != 2:
                a, b = a.cpu()[keep], b.cpu()[keep]
            magnitude = max(1.0, b.abs().max().item()) if b.numel() else 1.0
            assert_close(a, b, dtype, scale=scale * magnitude)


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("path", ["tensor", "simt"])
@pytest.mark.parametrize("mode", list(OP_MODES))
def test_both_tile_paths_are_bitwise_deterministic(device, path, mode):
    shape = (60, 70, 12) if EMULATED else (5000, 1000, 64)
    z, w, e = make_codebook_inputs(*shape, device=device, weight="full", seed=3)
    temperature, state = op_scalars(device=device)
    upstream = upstream_grads(shape[0], shape[1], shape[2], z.dtype, device)
    with cuda_tiles(path):
        first = op_forward_backward(z, w, e, *OP_MODES[mode], temperature, state, upstream=upstream)
        second = op_forward_backward(z, w, e, *OP_MODES[mode], temperature, state, upstream=upstream)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("mode", list(OP_MODES))
def test_cuda_device_scalars_without_a_host_sync(mode):
    z, w, e = make_codebook_inputs(300, 70, 16, device="cuda", weight="full")
    upstream = upstream_grads(300, 70, 16, z.dtype, "cuda")
    host = op_forward_backward(z, w, e, *OP_MODES[mode], *op_scalars(), upstream=upstream)
    device_scalars = op_scalars(device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        device = op_forward_backward(z, w, e, *OP_MODES[mode], *device_scalars, upstream=upstream)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(host[0] + host[1], device[0] + device[1]):
        assert torch.equal(a, b)


@requires_cuda
def test_cuda_forward_and_backward_capture_in_a_cuda_graph():
    z, w, e = make_codebook_inputs(300, 70, 16, device="cuda", weight="full")
    temperature, state = op_scalars(device="cuda")
    upstream = upstream_grads(300, 70, 16, z.dtype, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: allocator, kernel attributes
        op_forward_backward(z, w, e, True, True, temperature, state, upstream=upstream)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op_forward_backward(z, w, e, True, True, temperature, state, upstream=upstream)
    # New values in the same device tensors: the replay reads them.
    temperature.fill_(0.3)
    state[1] += 1
    graph.replay()
    torch.cuda.synchronize()
    eager = op_forward_backward(z, w, e, True, True, temperature, state, upstream=upstream)
    for a, b in zip(captured[0] + captured[1], eager[0] + eager[1]):
        assert torch.equal(a, b)
    # The replay did use the new values: the old ones give other indices.
    old = op_forward_backward(z, w, e, True, True, *op_scalars(), upstream=upstream)
    assert not torch.equal(old[0][1], captured[0][1])


_BAD_INDEX_SCRIPT = textwrap.dedent("""
    import sys, torch, gmvq_ext
    device = sys.argv[1]
    gen = torch.Generator().manual_seed(0)
    z, w, e = (torch.randn(10, 4, generator=gen), torch.rand(10, 4, generator=gen) + 0.5,
               torch.randn(6, 4, generator=gen))
    z, w, e = z.to(device), w.to(device), e.to(device)
    t, s = torch.tensor(1.0), torch.tensor([1, 2])
    out = torch.ops.gmvq.quantize(z, w, e, t, 0.5, True, False, s, None, None)
    index = out[1].clone()
    index[3] = 6
    torch.ops.gmvq.quantize_backward(torch.ones(10, 4, device=device), torch.ones(6, device=device),
                                     torch.ones(10, device=device), z, w, e, index, out[4], out[5], t, 0.5,
                                     True, False, s, None, None)
    if device == "cuda":
        torch.cuda.synchronize()
    print("no assertion")
""")


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
def test_out_of_range_index_is_a_device_side_assertion(device):
    # The CUDA backward checks the indices where it reads them (no host sync): an
    # asynchronous assert that poisons the context, hence a subprocess.
    result = subprocess.run([sys.executable, "-c", _BAD_INDEX_SCRIPT, device], cwd=PACKAGE_PARENT,
                            capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode != 0, result.stdout
    assert "no assertion" not in result.stdout
    # CUDA: a device-side assert; the emulation (no asynchronous assert) raises the message.
    assert "indices must lie in [0, " in result.stderr or "device-side assert" in result.stderr, result.stderr[-2000:]


@requires_cuda
@pytest.mark.slow
def test_cuda_large_shape_without_n_by_k_memory():
    n, k, d = 262144, 16384, 64
    n_by_k = n * k * 4  # 16 GiB of float32 logits
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, d, device="cuda", generator=gen)
    w = torch.nn.functional.softplus(torch.randn(n, d, device="cuda", generator=gen))
    e = torch.randn(k, d, device="cuda", generator=gen)
    temperature, state = op_scalars(1.0, (7, 0), device="cuda")
    upstream = upstream_grads(n, k, d, z.dtype, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, grads = op_forward_backward(z, w, e, True, True, temperature, state, upstream=upstream)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    print(f"peak {peak / 2**30:.2f} GiB above the inputs; N x K float32 is {n_by_k / 2**30:.0f} GiB")
    # Correct first: finite, q_bar a distribution, sampled rows' eval indices those of the CPU op.
    for t in out[:1] + grads[:3]:
        assert torch.isfinite(t).all()
    torch.testing.assert_close(out[2].sum().item(), 1.0, rtol=1e-4, atol=1e-4)
    rows = torch.arange(0, n, n // 64, device="cuda")
    small = torch.ops.gmvq.quantize(z[rows], w[rows], e, temperature, 0.4, True, False, state, None, None)
    cpu = torch.ops.gmvq.quantize(*to_cpu([z[rows], w[rows], e, temperature]), 0.4, True, False, state.cpu(),
                                  None, None)
    assert torch.equal(small[1].cpu(), cpu[1])
    # Then the memory: (N, D) temporaries only (the forward holds about six of
    # 64 MiB, ~400 MB; the backward ~1 GB), well below one N x K buffer.
    assert peak < n_by_k / 4, f"peak {peak / 2**30:.2f} GiB: an N x K buffer was allocated"
