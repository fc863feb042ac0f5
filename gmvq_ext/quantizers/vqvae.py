"""VQ-VAE, its l2 and dead-code-replacement remedies and both at once (Table 1 baselines).

* ``VectorQuantizer`` (van den Oord et al. 2017): nearest code, straight-through
  gradient, loss = ||sg(z) - e||^2 + commitment * ||z - sg(e)||^2, squared norms
  of each latent vector (summed over D, as the paper writes them) averaged
  over the vectors: the per-latent-vector units of docs/math.md "Units of the
  objective", so that the trainer's MSE / (2 sigma_x2) + (M / P) * loss is the
  VQ-VAE paper's loss (its reconstruction term at sigma_x2 = 0.5). Most public
  implementations take means over elements, which is this loss / D.
* ``NormalizedVQ`` (Yu et al. 2022, ViT-VQGAN): the same on l2-normalised
  encoder outputs and codes (the decoder receives unit vectors). ViT-VQGAN's
  low-dimensional factorised lookup is not included: D is the code dim.
* ``DeadCodeReplacementVQ`` (Zeghidour et al. 2021; Dhariwal et al. 2020): a code
  unused for ``replace_after`` consecutive training steps is replaced by a
  random encoder output of the current batch.
* ``NormalizedDeadCodeReplacementVQ``: both remedies at once (the paper's
  "VQVAE + l2 + replace" row): l2-normalised comparison and codes, dead codes
  replaced by encoder outputs (which the normalisation then puts on the sphere).

The affine codebook and the alternating optimisation of Huh et al. 2023 live
in ``affine.py`` and ``alternating.py``; they extend ``VectorQuantizer``
through the hooks its docstring lists.

Their posterior is deterministic (one-hot), so the "soft" perplexity of
``info`` is the perplexity of the index histogram, equal to "perplexity_hard".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import collectives, noise
from .backend import codebook_distance
from .base import Quantizer, code_counts, mean_squared_distance, usage_statistics
from .kmeans_init import KMeansInit


class VectorQuantizer(KMeansInit, Quantizer):
    """VQ-VAE quantizer: input and output D channels.

    The codebook is trained by the codebook loss (no EMA). It starts as the
    k-means centroids of the first training batch's vectors (as compared:
    l2-normalised for the l2 variants), as the paper starts every model;
    ``kmeans_init=False`` keeps the customary VQ-VAE start, uniform in
    [-1/K, 1/K].

    A training forward, in order, with the hooks subclasses override:
      ``_before_quantize(z)``      (dead-code replacement)
      ``_assign(z) -> indices``    nearest code under ``codebook_vectors()``
                                   (alternating optimisation: a codebook step first)
      ``_codebook_loss(z, z_q, indices)``  ||sg(z) - e||^2
      ``_straight_through(z, z_q)``        the decoder input (synchronised update)
      ``_after_quantize(counts)``  (dead-code replacement)
    ``codebook_map(raw)`` turns raw codebook rows into the vectors compared
    with z and given to the decoder (l2 normalisation, affine map)."""

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, commitment: float = 0.25,
                 kmeans_init: bool = True, kmeans_iterations: int = 10,
                 seed: int = 0, channel_first: Optional[bool] = None):
        super().__init__(channel_first=channel_first, seed=seed)
        self.code_dim = self.input_channels = int(dim)
        self.codebook_size = int(codebook_size)
        self.commitment = float(commitment)
        bound = 1.0 / self.codebook_size
        self.codebook = nn.Parameter(torch.empty(self.codebook_size, self.code_dim).uniform_(-bound, bound))
        self._setup_kmeans(kmeans_init, kmeans_iterations)

    def extra_repr(self) -> str:
        return f"dim={self.code_dim}, codebook_size={self.codebook_size}, commitment={self.commitment}"

    # NormalizedVQ compares and quantizes l2-normalised vectors.
    normalize = False

    def _project(self, vectors: Tensor) -> Tensor:
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def codebook_map(self, raw: Tensor) -> Tensor:
        """The code vectors of raw codebook rows (K, D)."""
        return self._project(raw)

    def codebook_vectors(self) -> Tensor:
        return self.codebook_map(self.codebook)

    def _kmeans_vectors(self, x: Tensor) -> Tensor:
        return self._project(super()._kmeans_vectors(x))

    def quantize_vectors(self, rows: Tensor):
        with torch.autocast(device_type=rows.device.type, enabled=False):
            z = rows.to(self.codebook.dtype)
            if self.training:
                self._before_quantize(z)
            z = self._project(z)
            indices = self._assign(z)
            z_q = self.codebook_vectors()[indices]
            codebook_loss = self._codebook_loss(z, z_q, indices)
            commitment_loss = self.commitment * mean_squared_distance(z, z_q.detach())
            quantized = self._straight_through(z, z_q)
            counts = code_counts(indices, self.codebook_size)
            if self.training:
                self._after_quantize(counts)
            histogram = counts.to(torch.float32) / max(z.shape[0], 1)
            info = usage_statistics(histogram, indices, self.codebook_size)
            info["loss/codebook"] = codebook_loss.detach()
            info["loss/commitment"] = commitment_loss.detach()
            return quantized, indices, codebook_loss + commitment_loss, info

    @torch.no_grad()
    def _assign(self, z: Tensor) -> Tensor:
        """Index of the nearest code vector of every row of z."""
        return codebook_distance(z.detach(), None, self.codebook_vectors().detach()).argmin(1)

    def _codebook_loss(self, z: Tensor, z_q: Tensor, indices: Tensor) -> Tensor:
        """||sg(z) - e||^2, mean over vectors: moves the chosen codes towards the encoder outputs."""
        return mean_squared_distance(z_q, z.detach())

    def _straight_through(self, z: Tensor, z_q: Tensor) -> Tensor:
        """The decoder sees z_q, the encoder gets the decoder's gradient.

        Written z_q + (z - sg(z)) rather than z + sg(z_q - z): the added term
        is exactly 0, so the value is z_q bit for bit (decoding the indices
        gives exactly the model's reconstruction)."""
        return z_q.detach() + (z - z.detach())

    # Hooks for DeadCodeReplacementVQ.
    def _before_quantize(self, z: Tensor) -> None:
        pass

    def _after_quantize(self, counts: Tensor) -> None:
        pass


class NormalizedVQ(VectorQuantizer):
    """VQ-VAE on l2-normalised vectors: distances are cosine distances and
    ``quantized`` and ``get_codes_from_indices`` are unit vectors."""

    normalize = True


class DeadCodeReplacementVQ(VectorQuantizer):
    """VQ-VAE whose dead codes are replaced by random current encoder outputs.

    ``steps_unused`` (a buffer) counts, per code, the training steps since the
    code was last chosen (under torch.distributed: chosen on any rank). At the
    start of a training forward every code with ``steps_unused >= replace_after``
    takes the value of an encoder output of this batch picked by Philox
    (key: the ``seed`` buffer, counter: the ``step`` buffer), and its counter
    restarts. Under torch.distributed rank 0's choice is broadcast. The
    optimiser's moments of a replaced code are left as they are. A training
    forward's ``info["codes_replaced"]`` counts the codes it replaced."""

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, replace_after: int = 100, **options):
        super().__init__(dim, codebook_size, **options)
        if replace_after < 1:
            raise ValueError(f"replace_after must be >= 1, got {replace_after}")
        self.replace_after = int(replace_after)
        self.register_buffer("steps_unused", torch.zeros(self.codebook_size, dtype=torch.int64))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", replace_after={self.replace_after}"

    @torch.no_grad()
    def _before_quantize(self, z: Tensor) -> None:
        offset = self._next_noise_offset()
        if z.shape[0] == 0:
            self._codes_replaced = self.steps_unused.new_zeros(())
            return
        dead = self.steps_unused >= self.replace_after
        self._codes_replaced = dead.sum()
        picks = noise.random_indices(self.seed, offset, self.codebook_size, z.shape[0], z.device)
        # Branch-free: every code is rewritten, live ones with their own value.
        self.codebook.copy_(torch.where(dead[:, None], z[picks], self.codebook))
        collectives.broadcast_from_rank0_(self.codebook.data)
        self.steps_unused.masked_fill_(dead, 0)

    def quantize_vectors(self, rows: Tensor):
        quantized, indices, loss, info = super().quantize_vectors(rows)
        if self.training:
            info["codes_replaced"] = self._codes_replaced.to(torch.float32)
        return quantized, indices, loss, info

    @torch.no_grad()
    def _after_quantize(self, counts: Tensor) -> None:
        if collectives.is_distributed():
            counts = counts.clone()  # the caller's counts stay this rank's statistics
            torch.distributed.all_reduce(counts)
        self.steps_unused.copy_(torch.where(counts > 0, torch.zeros_like(self.steps_unused),
                                            self.steps_unused + 1))


class NormalizedDeadCodeReplacementVQ(DeadCodeReplacementVQ):
    """Dead-code replacement on l2-normalised vectors: a replaced code takes a
    raw encoder output, which the normalisation turns into its direction."""

    normalize = True
