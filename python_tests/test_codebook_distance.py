"""codebook_distance and codebook_distance_backward against reference.codebook_distance."""

import pytest
import torch

from gmvq_ext import ops
from helpers import ALL_DTYPES, DEVICES, WEIGHT_MODES, check_against_reference, make_codebook_inputs


def check(inputs, dtype, **options):
    """The op on inputs = (z, weight, codebook) against the reference (helpers.check_against_reference):
    value, output dtype and every gradient. atol_scale widens the absolute tolerance for
    inputs whose GEMM-form terms are large: a distance near 0 then carries their rounding."""
    return check_against_reference(lambda impl, *t: impl.codebook_distance(*t), inputs, dtype, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
def test_matches_reference(device, dtype, weight):
    check(make_codebook_inputs(dtype=dtype, device=device, weight=weight), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
def test_gradcheck(device, weight):
    inputs = make_codebook_inputs(n=6, k=4, d=3, dtype=torch.float64, device=device, weight=weight,
                                  requires_grad=True)
    assert torch.autograd.gradcheck(ops.codebook_distance, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
def test_opcheck(device, weight):
    z, w, e = make_codebook_inputs(n=6, k=4, d=3, device=device, weight=weight)
    torch.library.opcheck(torch.ops.gmvq.codebook_distance.default,
                          [t.requires_grad_() if t is not None else None for t in (z, w, e)])
    grad = torch.randn(6, 4, device=device)
    detached = [t if t is None else t.detach() for t in (z, w, e)]
    torch.library.opcheck(torch.ops.gmvq.codebook_distance_backward.default, (grad, *detached))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_gives_empty_grad_for_absent_weight(device):
    z, _, e = make_codebook_inputs(device=device, weight=None)
    grad_z, grad_w, grad_e = torch.ops.gmvq.codebook_distance_backward(torch.ones(37, 19, device=device), z, None, e)
    assert grad_w.numel() == 0 and grad_z.shape == z.shape and grad_e.shape == e.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
def test_clamp_changes_values_only(device, weight):
    # z equal to codes (large, so the GEMM form cancels badly): the distance to
    # its own code is 0 up to rounding, never below, and the gradient is that
    # of the unclamped formula, as in the reference.
    z, w, e = make_codebook_inputs(n=5, k=7, d=4, dtype=torch.float32, device=device, weight=weight)
    z = (e[:5] * 100).contiguous()
    e = e * 100
    distance = ops.codebook_distance(z, w, e)
    assert (distance >= 0).all()
    assert (distance.diagonal() <= 1e-6 * distance.max()).all()
    # Terms of size ~1e4-1e5: float32 rounds them by ~1e-2 (the GEMM form and
    # the reference may round differently below that).
    check((z, w, e), torch.float32, atol_scale=100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 3), (6, 1, 3), (6, 4, 1), (1, 1, 1)], ids=lambda s: "n%d-k%d-d%d" % s)
@pytest.mark.parametrize("weight", WEIGHT_MODES, ids=str)
def test_edge_shapes(device, shape, weight):
    n, k, d = shape
    z, w, e = make_codebook_inputs(n=n, k=k, d=d, dtype=torch.float64, device=device, weight=weight)
    assert ops.codebook_distance(z, w, e).shape == (n, k)
    check((z, w, e), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_and_expanded_inputs(device, dtype):
    z, w, e = make_codebook_inputs(n=8, k=10, d=5, dtype=dtype, device=device)
    transposed_z = z.t().contiguous().t()  # same values, column-major
    sliced_codebook = torch.stack([e, -e], dim=2)[..., 0]  # same values, strides (10, 2)
    assert not transposed_z.is_contiguous() and not sliced_codebook.is_contiguous()
    transposed_w = w.t().contiguous().t()
    check((transposed_z, transposed_w, sliced_codebook), dtype)
    # Expanded: one vector and one weight row repeated (stride 0).
    check((z[:1].expand(5, 5), w[:1].expand(5, 5), e), dtype)
    check((z[:1].expand(5, 5), w[:1, :1].expand(5, 1), e), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ones_shape", ["full", "scalar"])
def test_weight_none_equals_ones(device, ones_shape):
    z, _, e = make_codebook_inputs(dtype=torch.float64, device=device, weight=None)
    ones = torch.ones(z.shape[0], z.shape[1] if ones_shape == "full" else 1, dtype=z.dtype, device=device)
    z1, e1 = z.clone().requires_grad_(), e.clone().requires_grad_()
    z2, e2 = z.clone().requires_grad_(), e.clone().requires_grad_()
    d1 = ops.codebook_distance(z1, None, e1)
    d2 = ops.codebook_distance(z2, ones, e2)
    torch.testing.assert_close(d1, d2, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(d1)
    for g1, g2 in zip(torch.autograd.grad(d1, (z1, e1), upstream), torch.autograd.grad(d2, (z2, e2), upstream)):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_is_the_weighted_squared_distance(device):
    # The definition itself, in float64, independent of the GEMM form.
    z, w, e = make_codebook_inputs(dtype=torch.float64, device=device)
    direct = (w[:, None, :] * (z[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(ops.codebook_distance(z, w, e), direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    z, w, e = make_codebook_inputs(n=300, k=64, d=16, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        d = ops.codebook_distance(z, w, e)
        runs.append((d, *torch.autograd.grad(d, (z, w, e), torch.ones_like(d))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
