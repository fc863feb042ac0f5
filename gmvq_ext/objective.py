"""The training objective in the units of the bound it comes from.

An image of P pixel-channels is encoded to M latent vectors. With a Gaussian
decoder of fixed variance sigma_x2, the negative bound of one image (the
ALBO for GM-VQ, a baseline's own loss for the others), up to a constant, is

    sum over pixel-channels (x - x_hat)^2 / (2 sigma_x2)  +  sum over latent vectors R_m

where R is the quantizer's regulariser of one latent vector (nats for GM-VQ:
beta * KL(q_bar || U) + gamma * ||z_hat - z_q||^2 / (2 sigma_z2)). Divided
by P it is

    MSE / (2 sigma_x2)  +  (M / P) * mean_m R_m

with MSE the mean over pixel-channels, as ``F.mse_loss`` gives it, and
mean_m R_m what every quantizer of this package returns as its loss. So a
weight of 1 on a quantizer's term means what its paper means, whatever the
resolution or the downsampling. docs/math.md, "Units of the objective",
derives it.
"""

from __future__ import annotations

from torch import Tensor

# sigma_x2 = 0.5 makes the reconstruction term the plain MSE (weight 1), the
# VQ-VAE paper's choice and this package's before the objective had units.
DEFAULT_SIGMA_X2 = 0.5


def latent_fraction(images: Tensor, indices: Tensor) -> float:
    """M / P for a batch: latent vectors per image over pixel-channels per image.

    images (B, C, H, W) and the quantizer's indices (B, ...), one index per
    latent vector. Shapes only: no data is read."""
    if images.dim() < 2 or indices.dim() < 1 or images.shape[0] != indices.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and indices {tuple(indices.shape)} need the same batch "
                         "size in dimension 0")
    return indices[0].numel() / images[0].numel()


def per_pixel_bound(mse: Tensor, quantizer_loss: Tensor, latent_fraction: float, sigma_x2: float) -> Tensor:
    """The negative bound per pixel-channel: MSE / (2 sigma_x2) + (M / P) * quantizer_loss."""
    return mse / (2.0 * sigma_x2) + latent_fraction * quantizer_loss
