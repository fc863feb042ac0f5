"""Gaussian Mixture Vector Quantization (GMVQ_MATH.md) as an nn.Module."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference
from . import distributed, noise
from .backend import check_backend, use_fused
from .base import Quantizer, entropy, usage_statistics
from .kmeans import kmeans

WEIGHT_MODES = ("full", "scalar", None)


class GaussianMixtureVQ(Quantizer):
    """GM-VQ bottleneck: Gumbel-softmax over a Gaussian mixture codebook, trained with the ALBO.

    Input channels (the encoder head's output), by ``weight``:
      "full"   2*D: z_hat = the first D channels, w_raw = the last D;
      "scalar" D+1: one raw weight per vector, the last channel;
      None     D:   no weight (w = 1, plain Euclidean logits).
    ``forward(z_hat, w_raw=...)`` takes the two apart instead (same layout;
    w_raw with D or 1 channels). w = softplus(w_raw).

    Loss = gamma * mean_n latent_reg[n] + beta * (log K - H(q_bar)), where q_bar
    is the aggregated posterior of the whole (global, under torch.distributed)
    batch. ``info`` holds both terms as added to the loss ("loss/latent",
    "loss/kl_uniform"), "entropy" H(q_bar), "temperature", and the usage
    statistics of ``base.usage_statistics``.

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

    Backends: "reference" runs ``gmvq_ext.reference.quantize`` with explicit
    Philox noise keyed by the ``seed`` and ``step`` buffers (compiles with
    fullgraph=True as is); "fused" runs ``torch.ops.gmvq.quantize``, which never
    holds an N x K tensor; "auto" (default) takes the fused kernel where one is
    built for the device. Both draw the same noise and give the same values.
    torch.compile and "fused": evaluation compiles with fullgraph=True; in
    training the op needs seed, offset and temperature as Python numbers, and
    its schema's ``float temperature`` cannot take a traced value (Dynamo's
    SymFloat), so compiled training with "auto" runs the reference path, and
    with "fused" fails at trace time. Eager training uses the kernel.
    """

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, weight: Optional[str] = "full",
                 beta: float = 1.0, gamma: float = 0.1, sigma_z2: float = 0.5, hard: bool = True,
                 backend: str = "auto", kmeans_init: bool = True, kmeans_iterations: int = 10,
                 seed: int = 0, channel_first: Optional[bool] = None,
                 temperature_start: float = 2.0, temperature_end: float = 0.1):
        super().__init__(channel_first=channel_first, seed=seed, temperature_start=temperature_start,
                         temperature_end=temperature_end)
        if weight not in WEIGHT_MODES:
            raise ValueError(f"weight must be one of {WEIGHT_MODES}, got {weight!r}")
        if not sigma_z2 > 0:
            raise ValueError(f"sigma_z2 must be positive, got {sigma_z2}")
        self.code_dim = int(dim)
        self.codebook_size = int(codebook_size)
        self.weight_mode = weight
        self.weight_channels = {"full": self.code_dim, "scalar": 1, None: 0}[weight]
        self.input_channels = self.code_dim + self.weight_channels
        self.beta, self.gamma, self.sigma_z2, self.hard = float(beta), float(gamma), float(sigma_z2), bool(hard)
        self.backend = check_backend(backend)
        self.kmeans_iterations = int(kmeans_iterations)
        self.codebook = nn.Parameter(torch.randn(self.codebook_size, self.code_dim))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        # Python mirror of `initialized`, so the compiled forward never reads the buffer's value.
        self._kmeans_pending = bool(kmeans_init)
        self.register_load_state_dict_post_hook(_sync_kmeans_flag)

    def extra_repr(self) -> str:
        return (f"dim={self.code_dim}, codebook_size={self.codebook_size}, weight={self.weight_mode!r}, "
                f"beta={self.beta}, gamma={self.gamma}, sigma_z2={self.sigma_z2}, hard={self.hard}, "
                f"backend={self.backend!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, w_raw: Optional[Tensor] = None):
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

    def quantize_vectors(self, z_hat: Tensor, w_raw: Optional[Tensor] = None):
        """GM-VQ on rows: z_hat (N, D), w_raw (N, D), (N, 1) or None."""
        with torch.autocast(device_type=z_hat.device.type, enabled=False):
            return self._quantize_rows(z_hat, w_raw)

    def _quantize_rows(self, z_hat: Tensor, w_raw: Optional[Tensor]):
        codebook = self.codebook
        z_hat = z_hat.to(codebook.dtype)
        weight = None if w_raw is None else F.softplus(w_raw.to(codebook.dtype))
        if self.training and self._kmeans_pending:
            self.initialise_codebook(z_hat)
        n = z_hat.shape[0]
        offset = self._next_noise_offset() if self.training else self.step
        fused = use_fused(self.backend, "quantize", z_hat.device.type)
        if fused and self.training and self.backend == "auto" and torch.compiler.is_compiling():
            # The op's schema takes the temperature as a float, which cannot be a traced
            # value: compiled training runs the reference (same values, N x K memory).
            fused = False
        if fused:
            # The op takes Python numbers; evaluation uses none of them, so it reads no buffer.
            temperature, seed, offset_int = ((float(self.temperature.item()), int(self.seed.item()),
                                              int(offset.item())) if self.training else (1.0, 0, 0))
            z_out, indices, q_bar, latent_reg = ops.quantize(
                z_hat, weight, codebook, temperature, self.sigma_z2, self.hard, self.training, seed, offset_int)
        else:
            gumbel = eps = None
            if self.training:
                gumbel = noise.gumbel_noise(self.seed, offset, n, self.codebook_size, z_hat.device)
                eps = noise.gaussian_noise(self.seed, offset, n, self.code_dim, z_hat.device)
            z_out, indices, q_bar, latent_reg = reference.quantize(
                z_hat, weight, codebook, self.temperature, self.sigma_z2, self.hard, self.training,
                0, 0, gumbel, eps)
        if self.training:  # the loss needs the global batch's q_bar; evaluation stays local
            q_bar = distributed.global_weighted_mean(q_bar, n)
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

    # ------------------------------------------------------------------ initialisation
    # Never traced: under torch.compile it runs eagerly (a graph break, an error with fullgraph=True).
    @torch._dynamo.disable
    @torch.no_grad()
    def initialise_codebook(self, z_hat: Tensor) -> None:
        """k-means of z_hat (N, D) rows into the codebook; every rank gets rank 0's result.

        Rank 0 clusters the vectors of every rank (gathered); the seed is the
        module's ``seed`` buffer, so the result is reproducible."""
        data = distributed.gather_to_rank0(z_hat.detach().reshape(-1, self.code_dim))
        _, rank = distributed.world_size_and_rank()
        if rank == 0:
            centroids = kmeans(data, self.codebook_size, self.kmeans_iterations, seed=int(self.seed))
            self.codebook.copy_(centroids.to(self.codebook.dtype))
        distributed.broadcast_from_rank0_(self.codebook.data)
        self.initialized.fill_(True)
        self._kmeans_pending = False


def _sync_kmeans_flag(module: GaussianMixtureVQ, incompatible_keys) -> None:
    # A loaded state says whether k-means already ran; the Python mirror follows it.
    module._kmeans_pending = not bool(module.initialized)
