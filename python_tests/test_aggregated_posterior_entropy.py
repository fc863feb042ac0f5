"""aggregated_posterior_entropy and its backward op against
reference.aggregated_posterior_entropy (including the gradient of its log clamp)."""

import math

import pytest
import torch

from gmvq_ext import ops, reference
from helpers import ALL_DTYPES, DEVICES, check_against_reference, make_logits


def check(logits, dtype, **options):
    """The op against the reference (helpers.check_against_reference): its outputs,
    0 entropy and 1 q_bar, and the logits gradient."""
    return check_against_reference(lambda impl, x: impl.aggregated_posterior_entropy(x), (logits,), dtype, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_matches_reference(device, dtype):
    check(make_logits(dtype=dtype, device=device), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use", [(0,), (1,)], ids=["entropy-only", "q_bar-only"])
def test_single_outputs(device, use):
    check(make_logits(dtype=torch.float64, device=device), torch.float64, use=use)


@pytest.mark.parametrize("device", DEVICES)
def test_many_rows(device):
    # More rows than one block of the partial column sums.
    check(make_logits(n=1000, k=7, device=device), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_known_values(device):
    k = 8
    uniform_entropy, uniform_q = ops.aggregated_posterior_entropy(torch.zeros(5, k, dtype=torch.float64, device=device))
    torch.testing.assert_close(uniform_entropy.item(), math.log(k), rtol=1e-14, atol=0)
    torch.testing.assert_close(uniform_q, torch.full_like(uniform_q, 1 / k), rtol=1e-14, atol=0)
    # Each row certain of a different code, two rows per code: q_bar uniform over 4 codes.
    logits = torch.full((8, k), -1e4, dtype=torch.float64, device=device)
    logits[torch.arange(8), torch.arange(8) % 4] = 0
    entropy, q_bar = ops.aggregated_posterior_entropy(logits)
    torch.testing.assert_close(entropy.item(), math.log(4), rtol=1e-14, atol=0)
    assert torch.equal(q_bar[4:], torch.zeros(4, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    logits = make_logits(n=6, k=5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(ops.aggregated_posterior_entropy, (logits,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = make_logits(n=6, k=5, device=device)
    torch.library.opcheck(torch.ops.gmvq.aggregated_posterior_entropy.default, (logits.requires_grad_(),))
    _, q_bar = ops.aggregated_posterior_entropy(logits)
    torch.library.opcheck(torch.ops.gmvq.aggregated_posterior_entropy_backward.default,
                          (torch.tensor(0.3, device=device), torch.randn(5, device=device), logits.detach(),
                           q_bar.detach()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_empty_codes_use_the_clamp_gradient(device, dtype):
    # Logits ~1e4: every row is one-hot in value, several codes get q_bar = 0
    # exactly, so log(max(q, 1e-30)) and the clamp's zero gradient are both used.
    logits = make_logits(n=6, k=20, dtype=dtype, device=device, scale=1e4)
    _, q_bar = check(logits, dtype)
    assert (q_bar == 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_but_positive_q_bar(device):
    # q_bar between 0 and the clamp (1e-30) in float64: value uses the clamp,
    # gradient follows the reference's mask.
    logits = torch.tensor([[0.0, -60.0, -72.0, -800.0], [0.0, -60.0, -72.0, -800.0]], dtype=torch.float64,
                          device=device)
    _, q_bar = check(logits, torch.float64)
    assert 0 < q_bar[2] < 1e-30 < q_bar[1]


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_applies_the_clamp_mask(device):
    # The backward op reads q_bar as given. With uniform posteriors (pi = 1/K,
    # not tiny) the entropy gradient at q = 0, q < 1e-30 and q > 1e-30 shows
    # directly: -(log max(q, 1e-30) + [q >= 1e-30]).
    n, k = 3, 4
    q_bar = torch.tensor([0.0, 1e-31, 1e-29, 0.5], dtype=torch.float64, device=device)
    grad_entropy = torch.tensor(0.7, dtype=torch.float64, device=device)
    grad_q_bar = torch.tensor([0.1, -0.2, 0.3, 0.4], dtype=torch.float64, device=device)
    logits = torch.zeros(n, k, dtype=torch.float64, device=device, requires_grad=True)

    q = q_bar.clone().requires_grad_()
    entropy = -(q * torch.log(q.clamp_min(reference.LOG_CLAMP))).sum()
    (grad_q,) = torch.autograd.grad(grad_entropy * entropy + (grad_q_bar * q).sum(), q)
    mask = (q_bar >= reference.LOG_CLAMP).double()
    torch.testing.assert_close(grad_q - grad_q_bar, -grad_entropy * (q_bar.clamp_min(reference.LOG_CLAMP).log() + mask))
    pi = torch.softmax(logits, 1)
    (expected,) = torch.autograd.grad(pi.sum(0) / n, logits, grad_q)

    actual = torch.ops.gmvq.aggregated_posterior_entropy_backward(grad_entropy, grad_q_bar, logits.detach(), q_bar)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    logits = torch.empty(0, 6, device=device, requires_grad=True)
    entropy, q_bar = ops.aggregated_posterior_entropy(logits)
    assert entropy.item() == 0 and torch.equal(q_bar, torch.zeros(6, device=device))
    (grad,) = torch.autograd.grad(entropy + q_bar.sum(), logits)
    assert grad.shape == (0, 6)
    check(logits, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_single_code(device):
    entropy, q_bar = check(make_logits(n=5, k=1, dtype=torch.float64, device=device), torch.float64)
    assert entropy.item() == 0 and q_bar.tolist() == [1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_and_expanded_logits(device, dtype):
    logits = make_logits(n=9, k=7, dtype=dtype, device=device)
    check(logits.t().contiguous().t(), dtype)
    check(logits[:, ::2], dtype)
    check(logits[:1].expand(5, 7), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    logits = make_logits(n=700, k=40, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        entropy, q_bar = ops.aggregated_posterior_entropy(logits)
        runs.append((entropy, q_bar, torch.autograd.grad(entropy + (q_bar * q_bar).sum(), logits)[0]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
