"""Gaussian Mixture Vector Quantization (docs/math.md) as an nn.Module."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backend, collectives
from .base import Quantizer, entropy, usage_statistics
from .kmeans_init import KMeansInit

WEIGHT_MODES = ("full", "scalar", None)


class GaussianMixtureVQ(KMeansInit, Quantizer):
    """GM-VQ bottleneck: Gumbel-softmax over a Gaussian mixture codebook, trained with the ALBO.

    Input channels (the encoder head's output), by ``weight``:
      "full"   2*D: z_hat = the first D channels, w_raw = the last D;
      "scalar" D+1: one raw weight per vector, the last channel;
      None     D:   no weight (w = 1, plain Euclidean logits).
    ``forward(z_hat, w_raw=...)`` takes the two apart instead (same layout;
    w_raw with D or 1 channels). w = softplus(w_raw).

    Loss, per latent vector in nats (the ALBO's units, docs/math.md "Units of
    the objective"): gamma * mean_n latent_reg[n] + beta * (log K - H(q_bar)),
    latent_reg[n] = ||z_hat[n] - z_q[n]||^2 / (2 sigma_z2), where q_bar is the
    aggregated posterior of the whole (global, under torch.distributed)
    batch. beta = gamma = 1 is the ALBO's own regulariser; a trainer adds it,
    times M / P, to MSE / (2 sigma_x2) (``gmvq_ext.objective``). ``info``
    holds both terms as added to the loss ("loss/latent", "loss/kl_uniform"),
    "entropy" H(q_bar), "temperature", and the usage statistics of
    ``base.usage_statistics``.

    Codebook: a K x D parameter (the optimiser trains it, weight decay
    included), initialised by k-means on the first training batch's z_hat
    (``initialise_codebook``; on rank 0 from every rank's vectors, then
    broadcast). Call one training forward eagerly (or ``initialise_codebook``)
    before torch.compile(fullgraph=True): the initialisation is data-dependent
    and excluded from tracing (without fullgraph it is a graph break that runs
    eagerly once); after it the compiled forward has no branch on data.

    Statistics under torch.distributed: in training "perplexity" and "entropy"
    come from the global q_bar; "perplexity_hard" and "codes_used" count this
    rank's indices. Evaluation never communicates: every statistic is that of
    the batch this rank was given (so ranks may evaluate different batches).

    Dtypes: everything is computed in the codebook's dtype (float32 unless the
    module was converted), with autocast disabled inside: z_hat and w_raw are
    upcast, ``quantized`` comes back in the codebook's dtype. Distances of
    low-precision inputs overflow (fp16) or lose small differences (bf16),
    and the decoder casts its input under autocast anyway.

    Kernels: the fused ``torch.ops.gmvq.quantize`` wherever it is built for
    the device (it never holds an N x K tensor), ``gmvq_ext.reference`` only
    on other devices (``backend.py`` decides). The temperature and the noise
    key reach the op as tensors read from the ``temperature``, ``seed`` and
    ``step`` buffers, so eager, ``torch.compile(fullgraph=True)`` and CUDA
    graphs run the same kernel with no host sync and no recompile as the
    temperature anneals.

    ``noise_scale`` scales the training noise apart from the latent term: the
    decoder gets z_q + noise_scale * s * eps with the paper's
    s = ||z_hat - z_q|| / sqrt(2 sigma_z2 D); 1 is the paper's noise, 0 feeds
    z_q itself (the op draws no Gaussian noise then). Evaluation never adds noise.

    ``hard=False`` (the default) feeds the decoder the soft sample's mean
    z_q = y E; ``hard=True`` the sampled code E[idx] with the straight-through
    gradient of y.

    Defaults, chosen on CIFAR-10 validation (experiments/results/cifar10/,
    2 seeds x 15 epochs, lr 0.01 the interior best). beta = 1, the ALBO
    itself: over 0.01 ... 48 it gave the lowest validation MSE (21.8e-3 at
    perplexity 426, against 23.2e-3 at 3 and 25.0e-3 at 0.3); lower beta
    uses fewer codes, higher more. gamma = 0.1: 20.9e-3 at perplexity 709,
    against 21.7e-3 at 0.03, 21.8e-3 at 0.3 and 25.6e-3 at 1. The paper's
    temperature schedule 2 -> 0.1: at gamma 0.1, 20.5 ± 1.1e-3 at perplexity
    881 against 20.9 ± 0.6e-3 at 709 for the earlier 0.5 -> 0.05 (the MSE
    within the seed spread, the usage beyond it). No training noise: the
    paper's (noise_scale = 1) scored 22.0e-3 against 21.8e-3 at gamma 0.3.
    Soft samples: hard ones scored 24.1 ± 0.1e-3 at these defaults.
    Soft samples cost the fused op ~5% more time than hard ones.
    The paper's settings: ``beta=1, sigma_z2=0.5, noise_scale=1,
    temperature_start=2.0, temperature_end=0.1`` (it tunes gamma and leaves
    hard or soft open).
    """

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, weight: Optional[str] = "full",
                 beta: float = 1.0, gamma: float = 0.1, sigma_z2: float = 0.5, hard: bool = False,
                 noise_scale: float = 0.0, kmeans_init: bool = True, kmeans_iterations: int = 10,
                 seed: int = 0, channel_first: Optional[bool] = None,
                 temperature_start: float = 2.0, temperature_end: float = 0.1):
        super().__init__(channel_first=channel_first, seed=seed, temperature_start=temperature_start,
                         temperature_end=temperature_end)
        if weight not in WEIGHT_MODES:
            raise ValueError(f"weight must be one of {WEIGHT_MODES}, got {weight!r}")
        if not (math.isfinite(sigma_z2) and sigma_z2 > 0):
            raise ValueError(f"sigma_z2 must be finite and positive, got {sigma_z2}")
        if not (math.isfinite(noise_scale) and noise_scale >= 0):
            raise ValueError(f"noise_scale must be finite and non-negative (0: no training noise), got {noise_scale}")
        self.code_dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.weight_mode = weight
        self.weight_channels = {"full": self.code_dim, "scalar": 1, None: 0}[weight]
        self.input_channels = self.code_dim + self.weight_channels
        self.beta, self.gamma, self.sigma_z2, self.hard = float(beta), float(gamma), float(sigma_z2), bool(hard)
        self.noise_scale = float(noise_scale)
        self.codebook = nn.Parameter(torch.randn(self.codebook_size, self.code_dim))
        self._setup_kmeans(kmeans_init, kmeans_iterations)

    def extra_repr(self) -> str:
        return (f"dim={self.code_dim}, codebook_size={self.codebook_size}, weight={self.weight_mode!r}, "
                f"beta={self.beta}, gamma={self.gamma}, sigma_z2={self.sigma_z2}, hard={self.hard}, "
                f"noise_scale={self.noise_scale}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, w_raw: Optional[Tensor] = None):
        self._kmeans_if_pending(x, w_raw)
        if w_raw is None:
            rows, restore, index_shape = self._to_rows(x, self.input_channels)
            z_hat, raw = rows[:, : self.code_dim], rows[:, self.code_dim:]
            raw = raw if self.weight_channels else None
        else:
            if self.weight_channels == 0:
                raise ValueError("w_raw was given but the quantizer was built with weight=None")
            z_hat, restore, index_shape = self._to_rows(x, self.code_dim)
            raw_channels = w_raw.shape[self._channel_dim(w_raw)] if w_raw.dim() > 0 else 0
            if raw_channels not in (1, self.code_dim):
                raise ValueError(f"w_raw needs 1 or {self.code_dim} channels, got shape {tuple(w_raw.shape)}")
            raw, _, raw_shape = self._to_rows(w_raw, raw_channels)
            if raw_shape != index_shape:
                raise ValueError(f"w_raw {tuple(w_raw.shape)} does not match z_hat {tuple(x.shape)}")
        quantized, indices, loss, info = self.quantize_vectors(z_hat, raw)
        return restore(quantized), indices.reshape(index_shape), loss, info

    def _kmeans_vectors(self, x: Tensor, w_raw: Optional[Tensor] = None) -> Tensor:
        channels = self.input_channels if w_raw is None else self.code_dim
        return self._to_rows(x, channels)[0][:, : self.code_dim].to(self.codebook.dtype)

    def quantize_vectors(self, z_hat: Tensor, w_raw: Optional[Tensor] = None):
        """GM-VQ on rows: z_hat (N, D), w_raw (N, D), (N, 1) or None."""
        with torch.autocast(device_type=z_hat.device.type, enabled=False):
            return self._quantize_rows(z_hat, w_raw)

    def _quantize_rows(self, z_hat: Tensor, w_raw: Optional[Tensor]):
        codebook = self.codebook
        z_hat = z_hat.to(codebook.dtype)
        weight = None if w_raw is None else F.softplus(w_raw.to(codebook.dtype))
        n = z_hat.shape[0]
        z_out, indices, q_bar, latent_reg = backend.quantize(
            z_hat, weight, codebook, self.temperature, self.sigma_z2, self.hard, self.training, self._noise_state(),
            noise_scale=self.noise_scale)
        if self.training:  # the loss needs the global batch's q_bar; evaluation stays local
            q_bar = collectives.global_weighted_mean(q_bar, n)
        posterior_entropy = entropy(q_bar)
        kl_uniform = math.log(self.codebook_size) - posterior_entropy
        latent = latent_reg.sum() / max(n, 1)
        latent_term, kl_term = self.gamma * latent, self.beta * kl_uniform
        loss = latent_term + kl_term
        info = usage_statistics(q_bar, indices, self.codebook_size)
        info.update({
            "entropy": posterior_entropy.detach(),
            "temperature": self.temperature.detach().clone(),
            "loss/latent": latent_term.detach(),
            "loss/kl_uniform": kl_term.detach(),
        })
        return z_out, indices, loss, info

    @torch.no_grad()
    def posterior(self, x: Tensor, w_raw: Optional[Tensor] = None) -> Tensor:
        """The posterior over codes, pi = softmax(-weighted distance), of every vector:
        (..., K) in x's index layout (soft tokens, no sampling)."""
        if w_raw is None:
            rows, _, index_shape = self._to_rows(x, self.input_channels)
            z_hat, raw = rows[:, : self.code_dim], rows[:, self.code_dim:]
            raw = raw if self.weight_channels else None
        else:
            z_hat, _, index_shape = self._to_rows(x, self.code_dim)
            raw, _, _ = self._to_rows(w_raw, w_raw.shape[self._channel_dim(w_raw)])
        codebook = self.codebook
        weight = None if raw is None else F.softplus(raw.to(codebook.dtype))
        probs, _ = backend.weighted_softmax(z_hat.to(codebook.dtype), weight, codebook, 1.0)
        return probs.reshape(*index_shape, self.codebook_size)
