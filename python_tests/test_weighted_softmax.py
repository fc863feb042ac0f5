"""weighted_softmax and weighted_softmax_backward against reference.weighted_softmax,
and one torch.compile test over a chain of the unfused ops."""

import math

import pytest
import torch

from gmvq_ext import ops
from helpers import ALL_DTYPES, DEVICES, WEIGHT_MODES, check_against_reference, make_codebook_inputs


def check(inputs, temperature, dtype, **options):
    """The op on inputs = (z, weight, codebook) against the reference (helpers.check_against_reference):
    its outputs, 0 probs and 1 lse, and every gradient. atol_scale widens the absolute tolerance
    where the terms summed are large (a small result then carries their rounding)."""
    return check_against_reference(lambda impl, *t: impl.weighted_softmax(*t, temperature), inputs, dtype, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
def test_matches_reference(device, dtype, weight):
    check(make_codebook_inputs(dtype=dtype, device=device, weight=weight), 0.7, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("use", [(0,), (1,)], ids=["probs-only", "lse-only"])
def test_temperatures_and_single_outputs(device, temperature, use):
    # Autograd hands None for an unused output: the wiring replaces it by zeros.
    inputs = make_codebook_inputs(dtype=torch.float64, device=device)
    check(inputs, temperature, torch.float64, use=use)


@pytest.mark.parametrize("device", DEVICES)
def test_probs_are_a_distribution_with_that_lse(device):
    z, w, e = make_codebook_inputs(dtype=torch.float64, device=device)
    probs, lse = ops.weighted_softmax(z, w, e, 0.5)
    logits = -ops.codebook_distance(z, w, e) / 0.5
    torch.testing.assert_close(probs.sum(1), torch.ones_like(lse), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, torch.softmax(logits, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
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
    probs, lse = check((z, w, e), 1.0, torch.float64)
    assert probs.shape == (n, k) and lse.shape == (n,)
    if k == 1:
        assert torch.equal(probs, torch.ones_like(probs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_and_expanded_inputs(device, dtype):
    z, w, e = make_codebook_inputs(n=8, k=10, d=5, dtype=dtype, device=device)
    check((z.t().contiguous().t(), w.t().contiguous().t(), torch.stack([e, -e], 2)[..., 0]), 0.5, dtype)
    check((z[:1].expand(5, 5), w[:1].expand(5, 5), e), 0.5, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_logits_stay_finite(device, dtype):
    # Distances ~1e4 at temperature 0.1: logits ~1e5, most probabilities exactly 0.
    z, w, e = make_codebook_inputs(dtype=dtype, device=device)
    # Gradients ~1e4 are summed from terms ~1e5: float32 rounds them by ~1e-2.
    probs, lse = check((z * 30, w, e * 30), 0.1, dtype, atol_scale=1e3)
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
