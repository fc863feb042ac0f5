"""Autoencoder shapes for both data sets and gradient flow through every part."""

from __future__ import annotations

import pytest
import torch

from gmvq_ext.models import RESIDUAL_BLOCKS, ResidualBlock, build_autoencoder
from gmvq_ext.quantizers import build_quantizer

CASES = [("cifar10", 32, 8), ("celeba", 128, 32)]


@pytest.mark.parametrize("dataset,size,latent", CASES)
@pytest.mark.parametrize("name", ["vqvae", "gmvq", "gumbel"])
def test_shapes(dataset, size, latent, name):
    quantizer = build_quantizer(name, codebook_size=32, dim=16)
    model = build_autoencoder(dataset, quantizer)
    images = torch.rand(2, 3, size, size) * 2 - 1
    reconstruction, indices, loss, info = model(images)
    assert reconstruction.shape == images.shape
    assert indices.shape == (2, latent, latent)
    assert loss.dim() == 0
    assert model.encoder(images).shape == (2, quantizer.input_channels, latent, latent)
    assert sum(isinstance(m, ResidualBlock) for m in model.encoder) == RESIDUAL_BLOCKS[dataset]
    assert sum(isinstance(m, ResidualBlock) for m in model.decoder) == RESIDUAL_BLOCKS[dataset]
    model.eval()
    with torch.no_grad():
        decoded = model.decode_indices(indices)
    assert decoded.shape == images.shape


@pytest.mark.parametrize("name", ["vqvae", "gmvq"])
def test_gradients_reach_encoder_codebook_and_decoder(name):
    quantizer = build_quantizer(name, codebook_size=32, dim=16)
    model = build_autoencoder("cifar10", quantizer)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    reconstruction, _, loss, _ = model(images)
    ((reconstruction - images).square().mean() + loss).backward()
    for part in (model.encoder, model.quantizer, model.decoder):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_autoencoder("mnist", build_quantizer("vqvae", codebook_size=8, dim=4))
