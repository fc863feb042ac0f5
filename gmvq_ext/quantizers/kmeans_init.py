"""k-means initialisation of a codebook from the first training batch.

The paper initialises every model of its Table 1 by k-means on encoder
outputs (following Esser et al. 2021), so every quantizer whose encoder
outputs live in the code space offers it: GM-VQ, SQ-VAE and the VQ-VAE
family. Gumbel-VQ cannot: its encoder emits logits over the codes, with no
vector in the codebook's space to cluster.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import collectives
from .kmeans import kmeans


class KMeansInit:
    """Mixin for a Quantizer with a ``codebook`` parameter (K, D).

    ``_setup_kmeans(enabled, iterations)`` in the constructor; then
    ``_kmeans_if_pending(x, ...)`` first thing in ``forward`` (this class's
    ``forward`` does it before the quantizer's own), with the forward's own
    arguments; ``_kmeans_vectors(x, ...)`` gives the (N, D)
    vectors the codes are compared with. ``initialized`` (a buffer, in the
    state_dict) records that it ran, so a resumed or loaded model never
    clusters again; a state saved before the buffer existed is a trained
    model, read as initialised.

    Why first thing: under torch.compile the k-means is a graph break, and
    every frame on the stack hands its live tensors across it. Views handed
    across a break (the rows of ``x``, their z_hat and weight halves) come
    back from torch 2.13's warm AOTAutograd cache with garbage shapes
    ("shape '[93873346349544, ...]' is invalid"); ``x`` itself is the
    caller's tensor, not a view made here."""

    def _setup_kmeans(self, enabled: bool, iterations: int) -> None:
        if int(iterations) < 0:
            raise ValueError(f"kmeans_iterations must be >= 0, got {iterations}")
        self.kmeans_iterations = int(iterations)
        self.register_buffer("initialized", torch.tensor(not enabled))
        # Python mirror of `initialized`, so the compiled forward never reads the buffer's value.
        self._kmeans_pending = bool(enabled)
        self.register_load_state_dict_post_hook(_sync_kmeans_flag)

    def forward(self, x: Tensor, *more):
        self._kmeans_if_pending(x, *more)
        return super().forward(x, *more)

    def _kmeans_if_pending(self, x: Tensor, *more) -> None:
        if self.training and self._kmeans_pending:
            self._initialise_from_input(x, *more)

    def _kmeans_vectors(self, x: Tensor, *more) -> Tensor:
        """The (N, D) vectors of the forward's input that the codes are compared with."""
        return self._to_rows(x, self.input_channels)[0].to(self.codebook.dtype)

    @torch._dynamo.disable
    @torch.no_grad()
    def _initialise_from_input(self, x: Tensor, *more) -> None:
        with torch.autocast(device_type=x.device.type, enabled=False):  # clustered in the codebook's dtype
            self.initialise_codebook(self._kmeans_vectors(x, *more))

    def raw_codes(self, code_vectors: Tensor) -> Tensor:
        """The raw codebook rows whose code vectors are ``code_vectors`` (the affine map inverts itself here)."""
        return code_vectors

    # Never traced: under torch.compile it runs eagerly (a graph break, an error with fullgraph=True).
    @torch._dynamo.disable
    @torch.no_grad()
    def initialise_codebook(self, vectors: Tensor) -> None:
        """k-means of ``vectors`` (N, D) into the codebook; every rank gets rank 0's result.

        Rank 0 clusters the vectors of every rank (gathered); the seed is the
        module's ``seed`` buffer, so the result is reproducible."""
        data = collectives.gather_to_rank0(vectors.detach().reshape(-1, self.code_dim))
        _, rank = collectives.world_size_and_rank()
        if rank == 0:
            centroids = kmeans(data, self.codebook_size, self.kmeans_iterations, seed=int(self.seed))
            self.codebook.copy_(self.raw_codes(centroids.to(self.codebook.dtype)))
        collectives.broadcast_from_rank0_(self.codebook.data)
        self.initialized.fill_(True)
        self._kmeans_pending = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # As BatchNorm does for num_batches_tracked: an older state (trained, without the flag) reads as initialised.
        state_dict.setdefault(prefix + "initialized", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _sync_kmeans_flag(module: KMeansInit, incompatible_keys) -> None:
    # A loaded state says whether k-means already ran; the Python mirror follows it.
    module._kmeans_pending = not bool(module.initialized)
