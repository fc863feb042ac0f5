"""Gumbel-VQ (Jang et al. 2017; DALL-E's dVAE, Ramesh et al. 2021; Karpathy 2021).

The encoder emits K logits per position; a Gumbel-softmax sample over the
codes selects a codebook row. Training: ``sample = gumbel_softmax(logits, tau)``
(straight-through one-hot by default, soft with ``hard=False``),
``quantized = sample @ codebook``. Evaluation: the argmax code, no noise.
Loss = kl_weight * mean_n KL(softmax(logits[n]) || Uniform(K)), nats per latent
vector (docs/math.md "Units of the objective"): kl_weight = 1 is the dVAE's
ELBO. The default 0.024 is Karpathy's 5e-4 beside a plain mean-squared error,
expressed exactly in these units at sigma_x2 = 0.5 and 4x downsampling
(times P / M = 48)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import accumulation_dtype
from . import backend
from .base import Quantizer, entropy, usage_statistics


class GumbelVQ(Quantizer):
    """input_channels = K (logits), code_dim = D."""

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, kl_weight: float = 0.024,
                 hard: bool = True, seed: int = 0, channel_first: Optional[bool] = None,
                 temperature_start: float = 2.0, temperature_end: float = 0.1):
        super().__init__(channel_first=channel_first, seed=seed, temperature_start=temperature_start,
                         temperature_end=temperature_end)
        self.code_dim = int(dim)
        self.codebook_size = self.input_channels = int(codebook_size)
        self.kl_weight, self.hard = float(kl_weight), bool(hard)
        self.codebook = nn.Parameter(torch.randn(self.codebook_size, self.code_dim))

    def extra_repr(self) -> str:
        return (f"dim={self.code_dim}, codebook_size={self.codebook_size}, kl_weight={self.kl_weight}, "
                f"hard={self.hard}")

    def quantize_vectors(self, logits: Tensor):
        with torch.autocast(device_type=logits.device.type, enabled=False):
            # Logits and softmax statistics in float32 (float64 for a float64 codebook).
            logits = logits.to(accumulation_dtype(self.codebook.dtype))
            n = logits.shape[0]
            probs = torch.softmax(logits, dim=1)
            if self.training:
                sample, indices = backend.gumbel_argmax(logits, self.temperature, self.hard, self._noise_state())
                quantized = sample.to(self.codebook.dtype) @ self.codebook
            else:
                indices = logits.argmax(1)
                quantized = self.codebook[indices]
            # KL(q || U) = sum_k q_k (log q_k + log K) = log K - H(q), per vector.
            kl = (math.log(self.codebook_size) - entropy(probs)).sum() / max(n, 1)
            loss = self.kl_weight * kl
            # The batch's aggregated posterior, for the statistics only.
            info = usage_statistics(probs.detach().mean(0), indices, self.codebook_size)
            info["temperature"] = self.temperature.detach().clone()
            info["loss/kl_uniform"] = loss.detach()
            return quantized, indices, loss, info
