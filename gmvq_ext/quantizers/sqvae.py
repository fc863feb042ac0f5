"""SQ-VAE Gaussian stochastic quantisation (Takida et al. 2022), "gaussian_1".

One learned variance s^2 = exp(log_variance) shared by every dimension:
  logits[n, k] = -||z[n] - e_k||^2 / (2 s^2),  P = softmax(logits),
  training:  c = gumbel_softmax(logits, tau) (soft by default, as in SQ-VAE),
             quantized = c @ E;
  eval:      quantized = E[argmax_k logits].
Loss = latent_weight * (KL_discrete + KL_gaussian), averaged over vectors (nats
per latent vector, the units of docs/math.md "Units of the objective"):
  KL_discrete = sum_k P log P + log K   (= KL(P || Uniform), >= 0),
  KL_gaussian = ||z - quantized||^2 / (2 s^2).
Gradients reach s^2 through both terms: the learned variance shrinks as
reconstruction improves, so the quantisation anneals itself ("self-annealing").

Simplifications, documented:
  * SQ-VAE sums its terms per image and pairs them with a reconstruction term
    dim_x/2 * log(MSE) (a learned decoder variance). Here the trainer's
    reconstruction term is MSE / (2 sigma_x2) with a fixed sigma_x2, and
    latent_weight = 1 is SQ-VAE's own bound at that sigma_x2. The default
    0.096 is the weight this package used before its objective was put in
    these units (2e-3 beside a plain MSE, chosen as ~ 2 * MSE * (latent
    vectors / pixel elements) with MSE ~ 0.01), expressed exactly in them at
    sigma_x2 = 0.5 and 4x downsampling (times P / M = 48).
  * The temperature follows the shared schedule (2.0 -> 0.1, as the GM-VQ
    paper does for every Gumbel baseline) instead of SQ-VAE's 1e-5 decay.
  * log_variance starts at 0 (s^2 = 1) unless given.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import backend
from .base import Quantizer, entropy, usage_statistics
from .kmeans_init import KMeansInit


class SQVAEQuantizer(KMeansInit, Quantizer):
    """input_channels = code_dim = D. The codebook starts as the k-means
    centroids of the first training batch (the paper starts every model so);
    ``kmeans_init=False``: standard normal."""

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, latent_weight: float = 0.096,
                 log_variance_init: float = 0.0, hard: bool = False, kmeans_init: bool = True,
                 kmeans_iterations: int = 10, seed: int = 0,
                 channel_first: Optional[bool] = None, temperature_start: float = 2.0,
                 temperature_end: float = 0.1):
        super().__init__(channel_first=channel_first, seed=seed, temperature_start=temperature_start,
                         temperature_end=temperature_end)
        self.code_dim = self.input_channels = int(dim)
        self.codebook_size = int(codebook_size)
        self.latent_weight, self.hard = float(latent_weight), bool(hard)
        self.codebook = nn.Parameter(torch.randn(self.codebook_size, self.code_dim))
        self.log_variance = nn.Parameter(torch.tensor(float(log_variance_init)))
        self._setup_kmeans(kmeans_init, kmeans_iterations)

    def extra_repr(self) -> str:
        return (f"dim={self.code_dim}, codebook_size={self.codebook_size}, "
                f"latent_weight={self.latent_weight}, hard={self.hard}")

    def quantize_vectors(self, rows: Tensor):
        with torch.autocast(device_type=rows.device.type, enabled=False):
            z = rows.to(self.codebook.dtype)
            n = z.shape[0]
            variance = self.log_variance.exp()
            logits = -backend.codebook_distance(z, None, self.codebook) / (2.0 * variance)
            probs = torch.softmax(logits, dim=1)
            if self.training:
                sample, indices = backend.gumbel_argmax(logits, self.temperature, self.hard, self._noise_state())
                quantized = sample.to(self.codebook.dtype) @ self.codebook
            else:
                indices = logits.argmax(1)
                quantized = self.codebook[indices]
            kl_discrete = (math.log(self.codebook_size) - entropy(probs)).sum() / max(n, 1)
            kl_gaussian = (z - quantized).pow(2).sum() / (2.0 * variance * max(n, 1))
            discrete_term = self.latent_weight * kl_discrete
            gaussian_term = self.latent_weight * kl_gaussian
            # The batch's aggregated posterior, for the statistics only.
            info = usage_statistics(probs.detach().mean(0), indices, self.codebook_size)
            info.update({
                "temperature": self.temperature.detach().clone(),
                "variance": variance.detach().clone(),
                "loss/kl_discrete": discrete_term.detach(),
                "loss/kl_gaussian": gaussian_term.detach(),
            })
            return quantized, indices, discrete_term + gaussian_term, info
