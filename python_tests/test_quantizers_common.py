"""The pieces the quantizers share: schedule, k-means, noise, layout, statistics.
The registry and the interface every quantizer promises are tested in test_quantizers_contract.py."""

import math

import pytest
import torch

from gmvq_ext import build_quantizer, reference
from gmvq_ext.quantizers import collectives, noise
from gmvq_ext.quantizers.base import usage_statistics
from gmvq_ext.quantizers.kmeans import kmeans
from gmvq_ext.quantizers.temperature import exponential_temperature


def test_temperature_schedule():
    assert exponential_temperature(0, 1000) == 2.0
    assert exponential_temperature(1000, 1000) == pytest.approx(0.1)
    assert exponential_temperature(5000, 1000) == pytest.approx(0.1)
    r = math.log(20) / 1000
    assert exponential_temperature(300, 1000) == pytest.approx(2.0 * math.exp(-r * 300))
    assert exponential_temperature(7, 10, start=1.0, end=1.0) == 1.0
    with pytest.raises(ValueError):
        exponential_temperature(0, 0)
    with pytest.raises(ValueError):
        exponential_temperature(0, 10, start=0.1, end=2.0)


def test_kmeans_lowers_the_quantisation_error_of_random_rows():
    x = torch.randn(500, 3)
    centroids = kmeans(x, 20, iterations=10, seed=0)
    seeds_only = kmeans(x, 20, iterations=0, seed=0)
    error = lambda c: torch.cdist(x, c).min(1).values.pow(2).mean()
    assert error(centroids) < error(seeds_only)
    assert torch.equal(kmeans(x, 20, iterations=10, seed=0), centroids)
    with pytest.raises(ValueError):
        kmeans(torch.empty(0, 3), 4)


def test_kmeans_plus_plus_handles_identical_rows():
    x = torch.ones(10, 2)
    centroids = kmeans(x, 4, iterations=2)
    assert torch.equal(centroids, torch.ones(4, 2))


def test_random_indices_are_in_range_and_keyed():
    a = noise.random_indices(torch.tensor(1), torch.tensor(0), 1000, 7)
    assert int(a.min()) >= 0 and int(a.max()) < 7 and len(torch.unique(a)) == 7
    assert torch.equal(a, noise.random_indices(torch.tensor(1), torch.tensor(0), 1000, 7))
    assert not torch.equal(a, noise.random_indices(torch.tensor(1), torch.tensor(1), 1000, 7))
    # A key of its own: not the uniform (Gumbel stream) words of the same seed.
    same_key = (reference.uniform_noise((1, 0), 1000, 1).reshape(-1).double() * 7).long()
    assert not torch.equal(a, same_key)


def test_random_indices_are_the_reference_uniforms_scaled():
    seed, offset = torch.tensor(5), torch.tensor(9)
    expected = reference.uniform_noise((5 ^ noise.CHOICE_KEY_XOR, 9), 13, 1).reshape(-1).double() * 1000
    assert torch.equal(noise.random_indices(seed, offset, 13, 1000), expected.long())


def test_usage_statistics():
    q_bar = torch.tensor([0.5, 0.5, 0.0, 0.0])
    indices = torch.tensor([0, 0, 0, 1])
    info = usage_statistics(q_bar, indices, 4)
    assert float(info["perplexity"]) == pytest.approx(2.0)
    expected_hard = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert float(info["perplexity_hard"]) == pytest.approx(expected_hard)
    assert float(info["codes_used"]) == 2


def test_distributed_helpers_are_identity_in_one_process():
    assert collectives.world_size_and_rank() == (1, 0)
    x = torch.randn(3, requires_grad=True)
    assert collectives.global_weighted_mean(x, 5) is x
    rows = torch.randn(4, 2)
    assert collectives.gather_to_rank0(rows) is rows


def test_bad_layouts_are_rejected():
    q = build_quantizer("vqvae", codebook_size=4, dim=3)
    with pytest.raises(ValueError, match="3 channels"):
        q(torch.randn(2, 4))
    q = build_quantizer("vqvae", codebook_size=4, dim=3, channel_first=True)
    with pytest.raises(ValueError, match="rank >= 2"):
        q(torch.randn(3))
