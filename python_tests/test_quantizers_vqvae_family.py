"""The quantizer contract for every VQ-VAE variant of the paper's Table 1:
one parametrized test per check, one factory for every registered name.
Each variant's own behaviour is tested in test_quantizers_<variant>.py."""

import pytest
import torch

import quantizer_contract as contract
from gmvq_ext.quantizers import (QUANTIZERS, AffineAlternatingVQ, AffineVQ, AlternatingVQ, DeadCodeReplacementVQ,
                                 NormalizedDeadCodeReplacementVQ, NormalizedVQ, VectorQuantizer, build_quantizer)

FAMILY = {
    "vqvae": VectorQuantizer,
    "vqvae-l2": NormalizedVQ,
    "vqvae-replace": DeadCodeReplacementVQ,
    "vqvae-l2-replace": NormalizedDeadCodeReplacementVQ,
    "vqvae-affine": AffineVQ,
    "vqvae-opt": AlternatingVQ,
    "vqvae-affine-opt": AffineAlternatingVQ,
}
# Replacement after 2 unused steps, so that the contract's few training forwards replace codes.
OPTIONS = {"vqvae-replace": dict(replace_after=2), "vqvae-l2-replace": dict(replace_after=2)}
CHECKS = contract.CORE_CHECKS + (contract.check_shapes_and_layouts, contract.check_loss_and_info)


def factory(name: str):
    """make(**options) for ``name``: K = 16, D = 4, codes at the data's scale (so that a
    batch uses several of them) and, for the affine variants, a map that is not the identity."""
    def make(**options):
        torch.manual_seed(0)
        q = build_quantizer(name, codebook_size=16, dim=4, **{**OPTIONS.get(name, {}), **options})
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            q.codebook.copy_(torch.randn(16, 4, generator=gen))
            if isinstance(q, AffineVQ):
                q.affine_weight.copy_(0.1 * torch.randn(4, generator=gen))
                q.affine_bias.copy_(0.1 * torch.randn(4, generator=gen))
        return q
    return make


def test_the_family_is_every_registered_vqvae_variant():
    assert {name for name, cls in QUANTIZERS.items() if issubclass(cls, VectorQuantizer)} == set(FAMILY)


@pytest.mark.parametrize("name", FAMILY)
def test_registry(name):
    contract.check_registry(name, FAMILY[name])


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("name", FAMILY)
def test_contract(name, check):
    check(factory(name))
