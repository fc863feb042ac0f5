"""The pieces the quantizers share: registry, schedule, k-means, noise, layout, statistics."""

import math

import pytest
import torch

from gmvq_ext import QUANTIZERS, GaussianMixtureVQ, build_quantizer, reference
from gmvq_ext.quantizers import distributed, noise
from gmvq_ext.quantizers.base import usage_statistics
from gmvq_ext.quantizers.kmeans import kmeans
from gmvq_ext.quantizers.schedules import exponential_temperature


def test_registry_names():
    assert set(QUANTIZERS) == {"vqvae", "vqvae-l2", "vqvae-replace", "vqvae-l2-replace", "vqvae-affine", "vqvae-opt",
                               "vqvae-affine-opt", "sqvae", "gumbel", "gmvq", "gmvq-entropy"}
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_quantizer("vq-gan")


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_every_quantizer_has_the_interface_attributes(name):
    q = build_quantizer(name, codebook_size=32, dim=8)
    assert (q.codebook_size, q.code_dim) == (32, 8)
    assert q.input_channels == {"gmvq": 16, "gmvq-entropy": 16, "gumbel": 32}.get(name, 8)
    assert {"seed", "step", "temperature"} <= set(dict(q.named_buffers()))


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
    assert distributed.world_size_and_rank() == (1, 0)
    x = torch.randn(3, requires_grad=True)
    assert distributed.global_weighted_mean(x, 5) is x
    rows = torch.randn(4, 2)
    assert distributed.gather_to_rank0(rows) is rows


def test_bad_layouts_are_rejected():
    q = build_quantizer("vqvae", codebook_size=4, dim=3)
    with pytest.raises(ValueError, match="3 channels"):
        q(torch.randn(2, 4))
    q = build_quantizer("vqvae", codebook_size=4, dim=3, channel_first=True)
    with pytest.raises(ValueError, match="rank >= 2"):
        q(torch.randn(3))


@pytest.mark.parametrize("name", sorted(name for name, cls in QUANTIZERS.items()
                                         if not issubclass(cls, GaussianMixtureVQ)))  # GM-VQ: its own file
def test_compile_fullgraph_in_training(name):
    """Dynamo captures every baseline's training forward whole (aot_eager: tracing, not codegen),
    including the buffer and parameter updates (step counter, dead-code replacement, the codebook step
    of alternating optimisation)."""
    torch._dynamo.reset()
    modules = []
    for _ in range(2):
        torch.manual_seed(0)
        modules.append(build_quantizer(name, codebook_size=16, dim=4).train())
    eager, compiled_module = modules
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for seed in range(2):
        x = torch.randn(2, eager.input_channels, 3, 3, generator=torch.Generator().manual_seed(seed))
        expected, got = eager(x), compiled(x)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[2], expected[2])
    for (key, a), b in zip(eager.state_dict().items(), compiled_module.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
