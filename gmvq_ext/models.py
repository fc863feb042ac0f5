"""Convolutional encoders and decoders around a quantizer (the SQ-VAE / GM-VQ nets).

CIFAR-10: 32x32 images -> 8x8 latents (two stride-2 convolutions), 2 residual
blocks. CelebA: 128x128 -> 32x32 latents, the same stem with 6 residual blocks.
A folder of images (``--dataset folder``): CIFAR-10's network at any image
size S of ``image_size_problem``'s rule. The latent grid is S / downsampling
(4, 8 or 16: ``DOWNSAMPLING_CHOICES``); each factor of 2 beyond 4 adds one
stride-2 convolution (64 -> 64 channels, 4x4, with BN and ReLU) after the
encoder's second and one transposed convolution before the decoder's last
two, so at 4 the networks and their state_dict keys are the paper's.

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
RESIDUAL_BLOCKS = {"cifar10": 2, "celeba": 6, "folder": 2}
LATENT_DOWNSAMPLING = 4  # two stride-2 convolutions: the default, and the paper's networks
DOWNSAMPLING_CHOICES = (4, 8, 16)
# Image sizes: a multiple of the downsampling, at least MIN_LATENT_SIDE latents a side, and at least
# MIN_IMAGE_SIZE pixels (SSIM's 11 x 11 window needs room); MAX_IMAGE_SIZE bounds the activations' memory.
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 1024
MIN_LATENT_SIDE = 2


def image_size_problem(size: int, downsampling: int, size_name: str = "image size",
                       downsampling_name: str = "downsampling") -> str | None:
    """Why ``size`` x ``size`` images do not fit a network that downsamples
    ``downsampling`` times, naming the sizes that do; None when they fit.
    The names are how the message calls the two (flags, config keys)."""
    if downsampling not in DOWNSAMPLING_CHOICES:
        return f"downsampling {downsampling} is not one of {DOWNSAMPLING_CHOICES}"
    smallest = max(MIN_IMAGE_SIZE, MIN_LATENT_SIDE * downsampling)
    smallest += -smallest % downsampling
    if size % downsampling == 0 and smallest <= size <= MAX_IMAGE_SIZE:
        return None
    examples = ", ".join(str(s) for s in (smallest, 2 * smallest, 4 * smallest) if s <= MAX_IMAGE_SIZE)
    return (f"{size_name} {size} does not fit {downsampling_name} {downsampling}: the image size must be a multiple of "
            f"{downsampling} from {smallest} to {MAX_IMAGE_SIZE} (e.g. {examples}); the latent grid is "
            f"image size / downsampling")


def extra_halvings(downsampling: int) -> int:
    """Stride-2 stages beyond the paper's two."""
    if downsampling not in DOWNSAMPLING_CHOICES:
        raise ValueError(f"downsampling must be one of {DOWNSAMPLING_CHOICES}, got {downsampling}")
    return downsampling.bit_length() - 1 - 2


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
    def __init__(self, out_channels: int, residual_blocks: int, hidden: int = HIDDEN,
                 downsampling: int = LATENT_DOWNSAMPLING):
        super().__init__(
            *conv_bn_relu(3, hidden // 2, 4, 2, 1),
            *conv_bn_relu(hidden // 2, hidden, 4, 2, 1),
            *[layer for _ in range(extra_halvings(downsampling)) for layer in conv_bn_relu(hidden, hidden, 4, 2, 1)],
            *conv_bn_relu(hidden, hidden, 3, 1, 1),
            *[ResidualBlock(hidden) for _ in range(residual_blocks)],
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1),
        )


class Decoder(nn.Sequential):
    def __init__(self, in_channels: int, residual_blocks: int, hidden: int = HIDDEN,
                 downsampling: int = LATENT_DOWNSAMPLING):
        super().__init__(
            nn.Conv2d(in_channels, hidden, 1),
            *[ResidualBlock(hidden) for _ in range(residual_blocks)],
            nn.ReLU(),
            *[layer for _ in range(extra_halvings(downsampling))
              for layer in (nn.ConvTranspose2d(hidden, hidden, 4, 2, 1), nn.BatchNorm2d(hidden), nn.ReLU())],
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


def build_autoencoder(dataset: str, quantizer: nn.Module, downsampling: int = LATENT_DOWNSAMPLING) -> Autoencoder:
    """The network for ``dataset`` ("cifar10", "celeba" or "folder") around ``quantizer``."""
    if dataset not in RESIDUAL_BLOCKS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {tuple(RESIDUAL_BLOCKS)}")
    return build_network(quantizer, RESIDUAL_BLOCKS[dataset], downsampling)


def build_network(quantizer: nn.Module, residual_blocks: int, downsampling: int = LATENT_DOWNSAMPLING) -> Autoencoder:
    """Encoder and decoder with ``residual_blocks`` blocks each that shrink
    images ``downsampling`` times (and grow them back), around ``quantizer``."""
    return Autoencoder(Encoder(quantizer.input_channels, residual_blocks, downsampling=downsampling), quantizer,
                       Decoder(quantizer.code_dim, residual_blocks, downsampling=downsampling))
