"""Convolutional encoders and decoders around a quantizer (the SQ-VAE / GM-VQ nets).

CIFAR-10: 32x32 images -> 8x8 latents (two stride-2 convolutions), 2 residual
blocks. CelebA: 128x128 -> 32x32 latents, the same stem with 6 residual blocks.

Choices the sources leave open, made here:
- Hidden width 64 everywhere after the stem (32 after the first convolution);
  residual blocks keep 64 channels in both of their convolutions.
- Residual block: ``x + [ReLU, Conv3x3, BN, ReLU, Conv1x1, BN](x)`` (SQ-VAE's
  block). Its sum carries no activation, so a ReLU follows the residual stack
  before the encoder's 1x1 head and before the decoder's first transposed
  convolution.
- The encoder head is a 1x1 convolution to ``quantizer.input_channels``
  (GM-VQ needs ``z_hat`` and its weights, Gumbel-VQ needs K logits); the
  decoder starts with a 1x1 convolution from ``quantizer.code_dim`` to 64.
- The decoder output has no activation: reconstructions are compared with
  targets in [-1, 1] by MSE, and a linear output keeps that gradient from
  saturating (a tanh would shrink it near the extremes). Metrics use the raw
  output; only pictures clamp it.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = 64
RESIDUAL_BLOCKS = {"cifar10": 2, "celeba": 6}
LATENT_DOWNSAMPLING = 4  # two stride-2 convolutions


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout), nn.ReLU()]


class Encoder(nn.Sequential):
    def __init__(self, out_channels: int, residual_blocks: int, hidden: int = HIDDEN):
        super().__init__(
            *conv_bn_relu(3, hidden // 2, 4, 2, 1),
            *conv_bn_relu(hidden // 2, hidden, 4, 2, 1),
            *conv_bn_relu(hidden, hidden, 3, 1, 1),
            *[ResidualBlock(hidden) for _ in range(residual_blocks)],
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1),
        )


class Decoder(nn.Sequential):
    def __init__(self, in_channels: int, residual_blocks: int, hidden: int = HIDDEN):
        super().__init__(
            nn.Conv2d(in_channels, hidden, 1),
            *[ResidualBlock(hidden) for _ in range(residual_blocks)],
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, 2, 1),
            nn.BatchNorm2d(hidden // 2),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, 3, 4, 2, 1),
        )


class Autoencoder(nn.Module):
    """encoder -> quantizer -> decoder. ``forward`` returns the reconstruction
    and the quantizer's ``(indices, loss, info)``."""

    def __init__(self, encoder: nn.Module, quantizer: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder

    def forward(self, images: torch.Tensor):
        quantized, indices, quantizer_loss, info = self.quantizer(self.encoder(images))
        return self.decoder(quantized), indices, quantizer_loss, info

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images from code indices (B, H, W)."""
        codes = self.quantizer.get_codes_from_indices(indices)  # channel-last (B, H, W, D)
        return self.decoder(codes.permute(0, 3, 1, 2))


def build_autoencoder(dataset: str, quantizer: nn.Module) -> Autoencoder:
    """The paper's network for ``dataset`` ("cifar10" or "celeba") around ``quantizer``."""
    if dataset not in RESIDUAL_BLOCKS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {tuple(RESIDUAL_BLOCKS)}")
    blocks = RESIDUAL_BLOCKS[dataset]
    return Autoencoder(Encoder(quantizer.input_channels, blocks), quantizer,
                       Decoder(quantizer.code_dim, blocks))
