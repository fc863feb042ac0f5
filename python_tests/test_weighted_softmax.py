"""weighted_softmax and weighted_softmax_backward against reference.weighted_softmax,
and one torch.compile test over a chain of the unfused ops."""

import math

import pytest
import torch

from gmvq_ext import ops, reference
from helpers import ALL_DTYPES, DEVICES, make_codebook_inputs, tolerance, upcast

WEIGHTS = [None, "full", "scalar"]


def present(*tensors):
    return [t for t in tensors if t is not None]


def assert_close(actual, expected, dtype, atol_scale=1.0):
    tol = tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * atol_scale)


def check_against_reference(z, weight, codebook, temperature, dtype, seed=0, use=("probs", "lse"), atol_scale=1.0):
    """Values and gradients (random upstream on the outputs in `use`) against autograd through the reference.

    atol_scale widens the absolute tolerance where the terms summed are large
    (a small result then carries their rounding)."""
    inputs = [t.detach().requires_grad_() if t is not None else None for t in (z, weight, codebook)]
    ref_inputs = [upcast(t) for t in inputs]
    outputs = ops.weighted_softmax(*inputs, temperature)
    expected = reference.weighted_softmax(*ref_inputs, temperature)
    acc = reference.accumulation_dtype(dtype)
    for out, ref in zip(outputs, expected):
        assert out.dtype == acc
        assert torch.isfinite(out).all()
        assert_close(out, ref, dtype, atol_scale)

    gen = torch.Generator().manual_seed(seed)
    chosen = [i for i, name in enumerate(("probs", "lse")) if name in use]
    upstream = [torch.randn(outputs[i].shape, generator=gen, dtype=torch.float64) for i in chosen]
    grads = torch.autograd.grad([outputs[i] for i in chosen], present(*inputs),
                                [u.to(outputs[0].device, acc) for u in upstream])
    ref_grads = torch.autograd.grad([expected[i] for i in chosen], present(*ref_inputs),
                                    [u.to(expected[0].device, acc) for u in upstream])
    for grad, ref_grad, source in zip(grads, ref_grads, present(*inputs)):
        assert grad.dtype == source.dtype and grad.shape == source.shape
        assert_close(grad, ref_grad, dtype, atol_scale)
    return outputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
def test_matches_reference(device, dtype, weight):
    check_against_reference(*make_codebook_inputs(dtype=dtype, device=device, weight=weight), 0.7, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("use", [("probs",), ("lse",)], ids=["probs-only", "lse-only"])
def test_temperatures_and_single_outputs(device, temperature, use):
    # Autograd hands None for an unused output: the wiring replaces it by zeros.
    inputs = make_codebook_inputs(dtype=torch.float64, device=device)
    check_against_reference(*inputs, temperature, torch.float64, use=use)


@pytest.mark.parametrize("device", DEVICES)
def test_probs_are_a_distribution_with_that_lse(device):
    z, w, e = make_codebook_inputs(dtype=torch.float64, device=device)
    probs, lse = ops.weighted_softmax(z, w, e, 0.5)
    logits = -ops.codebook_distance(z, w, e) / 0.5
    torch.testing.assert_close(probs.sum(1), torch.ones_like(lse), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, torch.softmax(logits, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
def test_gradcheck(device, weight):
    z, w, e = make_codebook_inputs(n=5, k=4, d=3, dtype=torch.float64, device=device, weight=weight,
                                   requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.weighted_softmax(*t, 0.8), (z, w, e))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", [None, "full"], ids=str)
def test_opcheck(device, weight):
    z, w, e = make_codebook_inputs(n=6, k=4, d=3, device=device, weight=weight)
    temperature = torch.tensor(0.7, device=device)
    torch.library.opcheck(torch.ops.gmvq.weighted_softmax.default,
                          ([t if t is None else t.requires_grad_() for t in (z, w, e)]) + [temperature])
    probs, _ = ops.weighted_softmax(z, w, e, 0.7)
    detached = [t if t is None else t.detach() for t in (z, w, e)]
    torch.library.opcheck(torch.ops.gmvq.weighted_softmax_backward.default,
                          (torch.randn(6, 4, device=device), torch.randn(6, device=device), probs.detach(),
                           *detached, temperature))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 3), (6, 1, 3), (6, 4, 1)], ids=lambda s: "n%d-k%d-d%d" % s)
def test_edge_shapes(device, shape):
    n, k, d = shape
    z, w, e = make_codebook_inputs(n=n, k=k, d=d, dtype=torch.float64, device=device)
    probs, lse = check_against_reference(z, w, e, 1.0, torch.float64)
    assert probs.shape == (n, k) and lse.shape == (n,)
    if k == 1:
        assert torch.equal(probs, torch.ones_like(probs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_and_expanded_inputs(device, dtype):
    z, w, e = make_codebook_inputs(n=8, k=10, d=5, dtype=dtype, device=device)
    check_against_reference(z.t().contiguous().t(), w.t().contiguous().t(), torch.stack([e, -e], 2)[..., 0], 0.5, dtype)
    check_against_reference(z[:1].expand(5, 5), w[:1].expand(5, 5), e, 0.5, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_logits_stay_finite(device, dtype):
    # Distances ~1e4 at temperature 0.1: logits ~1e5, most probabilities exactly 0.
    z, w, e = make_codebook_inputs(dtype=dtype, device=device)
    # Gradients ~1e4 are summed from terms ~1e5: float32 rounds them by ~1e-2.
    probs, lse = check_against_reference(z * 30, w, e * 30, 0.1, dtype, atol_scale=1e3)
    assert (probs == 0).any()
    assert lse.abs().max() > 1e4


@pytest.mark.parametrize("device", DEVICES)
def test_weight_none_equals_ones(device):
    z, _, e = make_codebook_inputs(dtype=torch.float64, device=device, weight=None)
    runs = []
    for weight in (None, torch.ones_like(z), torch.ones_like(z[:, :1])):
        zz, ee = z.clone().requires_grad_(), e.clone().requires_grad_()
        probs, lse = ops.weighted_softmax(zz, weight, ee, 0.5)
        loss = (probs * torch.arange(19.0, dtype=torch.float64, device=device)).sum() + lse.sum()
        runs.append((probs, lse, *torch.autograd.grad(loss, (zz, ee))))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def unfused_chain(z, weight, codebook):
    """A small GM-VQ-like loss built from every unfused op."""
    probs, lse = ops.weighted_softmax(z, weight, codebook, 0.5)
    logits = -ops.codebook_distance(z, weight, codebook)
    sample, indices = ops.gumbel_argmax(logits, 0.7, True, (5, 3))
    entropy, q_bar = ops.aggregated_posterior_entropy(logits)
    z_q = sample @ codebook
    return ((z - z_q) ** 2).sum() + (probs * lse[:, None]).sum() - entropy + q_bar.max(), indices


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_chain_of_unfused_ops(device):
    inputs = make_codebook_inputs(n=12, k=6, d=4, dtype=torch.float32, device=device, requires_grad=True)
    loss, indices = unfused_chain(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(unfused_chain, fullgraph=True)
    compiled_loss, compiled_indices = compiled(*inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, inputs)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled_indices, indices)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert math.isfinite(loss.item())
