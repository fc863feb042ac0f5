"""gumbel_argmax and gumbel_argmax_backward against reference.gumbel_argmax, and the
sampling law of the indices."""

import pytest
import scipy.stats
import torch

from gmvq_ext import ops
from helpers import ALL_DTYPES, DEVICES, check_against_reference, make_logits

SEED, OFFSET = 1234, 2**33 + 7
# Significance of the chi-square test; seeds are fixed, so it cannot flake.
SIGNIFICANCE = 1e-3


def check(logits, temperature, hard, dtype, noise=None):
    """The op against the reference (helpers.check_against_reference), Philox noise keyed by
    (SEED, OFFSET) or the given noise: the sample (bit for bit when hard: exactly one-hot), the
    exact indices, and the gradients of the logits and of given noise."""
    return check_against_reference(lambda impl, x, g: impl.gumbel_argmax(x, temperature, hard, (SEED, OFFSET), g),
                                   (logits, noise), dtype, exact=(0, 1) if hard else (1,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_philox_noise_matches_reference(device, dtype, hard):
    check(make_logits(dtype=dtype, device=device), 0.7, hard, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("noise_dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_given_noise_matches_reference(device, dtype, noise_dtype, hard):
    logits = make_logits(dtype=dtype, device=device)
    noise = -torch.log(-torch.log(torch.rand(logits.shape, dtype=torch.float64))).to(device, noise_dtype)
    check(logits, 1.3, hard, dtype, noise=noise)


@pytest.mark.parametrize("device", DEVICES)
def test_philox_noise_is_the_philox_noise_op(device):
    logits = make_logits(device=device, dtype=torch.float64)
    noise = ops.philox_noise(logits, (SEED, OFFSET), "gumbel")
    for hard in (False, True):
        a = ops.gumbel_argmax(logits, 0.5, hard, (SEED, OFFSET))
        b = ops.gumbel_argmax(logits, 0.5, hard, (0, 0), noise)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0])
def test_temperatures(device, temperature):
    check(make_logits(device=device, dtype=torch.float64), temperature, False, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_hard_is_one_hot_with_the_soft_gradient(device):
    logits = make_logits(device=device, requires_grad=True)
    hard, indices = ops.gumbel_argmax(logits, 0.5, True, (SEED, OFFSET))
    soft, soft_indices = ops.gumbel_argmax(logits, 0.5, False, (SEED, OFFSET))
    assert torch.equal(indices, soft_indices)
    assert torch.equal(hard, torch.nn.functional.one_hot(indices, logits.shape[1]).float())
    assert torch.equal(soft.argmax(1), indices)
    upstream = torch.randn_like(soft)
    assert torch.equal(torch.autograd.grad(hard, logits, upstream)[0], torch.autograd.grad(soft, logits, upstream)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_soft(device):
    logits = make_logits(n=5, k=4, dtype=torch.float64, device=device, requires_grad=True)
    noise = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: ops.gumbel_argmax(l, 0.6, False, (SEED, OFFSET))[0], (logits,))
    assert torch.autograd.gradcheck(lambda l, g: ops.gumbel_argmax(l, 0.6, False, (0, 0), g)[0], (logits, noise))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("with_noise", [False, True], ids=["philox", "noise"])
def test_opcheck(device, hard, with_noise):
    logits = make_logits(n=6, k=5, device=device)
    noise = torch.randn(6, 5, device=device) if with_noise else None
    temperature = torch.tensor(0.7, device=device)
    state = ops.noise_state(SEED, OFFSET, device=device)
    args = (logits.requires_grad_(), temperature, hard, state, noise)
    torch.library.opcheck(torch.ops.gmvq.gumbel_argmax.default, args)
    if hard:  # the backward op does not depend on hard
        torch.library.opcheck(torch.ops.gmvq.gumbel_argmax_backward.default,
                              (torch.randn(6, 5, device=device), logits.detach(), temperature, state, noise))


@pytest.mark.parametrize("device", DEVICES)
def test_indices_follow_the_softmax_law(device):
    # One row of logits repeated: each row is an independent draw (its own
    # Philox elements), so the index counts follow Multinomial(N, softmax(l)).
    row = torch.tensor([1.5, 0.0, -1.0, 0.7, 2.0, -0.3], dtype=torch.float64)
    n = 30000
    logits = row.expand(n, -1).to(device)
    expected = torch.softmax(row, 0) * n
    for seed, offset in [(0, 0), (77, 2**40)]:
        _, indices = ops.gumbel_argmax(logits, 1.0, True, (seed, offset))
        counts = torch.bincount(indices.cpu(), minlength=row.numel()).double()
        assert scipy.stats.chisquare(counts.numpy(), expected.numpy()).pvalue > SIGNIFICANCE
    # A wrong law (uniform) is rejected by the same test: it has the power to fail.
    assert scipy.stats.chisquare(counts.numpy(), torch.full_like(expected, n / row.numel()).numpy()).pvalue < SIGNIFICANCE


@pytest.mark.parametrize("device", DEVICES)
def test_seed_and_offset_select_the_noise(device):
    logits = make_logits(n=64, k=16, device=device)
    base = ops.gumbel_argmax(logits, 1.0, False, (1, 2))[0]
    assert torch.equal(base, ops.gumbel_argmax(logits, 1.0, False, (1, 2))[0])
    assert not torch.equal(base, ops.gumbel_argmax(logits, 1.0, False, (2, 2))[0])
    assert not torch.equal(base, ops.gumbel_argmax(logits, 1.0, False, (1, 3))[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5), (7, 1), (1, 1)], ids=lambda s: "n%d-k%d" % s)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_edge_shapes(device, shape, hard):
    logits = make_logits(*shape, dtype=torch.float64, device=device)
    sample, indices = check(logits, 0.5, hard, torch.float64)
    assert indices.shape == (shape[0],)
    if shape[1] == 1:
        assert torch.equal(sample, torch.ones_like(sample)) and (indices == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_and_expanded_logits(device, dtype):
    logits = make_logits(n=9, k=7, dtype=dtype, device=device)
    transposed = logits.t().contiguous().t()
    noise = torch.randn(7, 9, device=device).t()  # non-contiguous given noise
    for hard in (False, True):
        check(transposed, 0.5, hard, dtype)
        check(transposed, 0.5, hard, dtype, noise=noise)
        # Expanded: identical rows still get their own noise.
        sample, _ = check(logits[:1].expand(5, 7), 0.5, hard, dtype)
        assert not torch.equal(sample[0], sample[1]) or hard


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_large_logits_stay_finite(device, dtype, hard):
    logits = make_logits(dtype=dtype, device=device, scale=1e4)
    sample, _ = check(logits, 0.1, hard, dtype)
    assert torch.isfinite(sample).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lowest_index(device):
    logits = torch.zeros(3, 4, device=device)
    noise = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]], device=device)
    _, indices = ops.gumbel_argmax(logits, 1.0, True, (0, 0), noise)
    assert indices.tolist() == [1, 0, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    logits = make_logits(n=500, k=33, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        sample, indices = ops.gumbel_argmax(logits, 0.5, False, (SEED, OFFSET))
        runs.append((sample, indices, torch.autograd.grad(sample, logits, torch.ones_like(sample) * logits.detach())[0]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
