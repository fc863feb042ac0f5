"""Quantizers on one interface: GM-VQ and the baselines of the paper's Table 1.

Every quantizer maps an encoder output x to
``(quantized, indices, loss, info) = quantizer(x)``:
  quantized  the decoder input, x's layout with ``code_dim`` channels;
  indices    int64, x's shape without the channel dimension;
  loss       a scalar: the quantizer's own weighted terms per latent vector, in
             the units of its bound (nats, or squared norms summed over D);
             ``gmvq_ext.objective`` adds it, times latent vectors / pixel-
             channels, to MSE / (2 sigma_x2);
  info       detached float tensors: "perplexity" (exp H of the batch's mean
             soft posterior), "perplexity_hard", "codes_used", and each loss
             term as "loss/<name>".
and offers ``get_codes_from_indices(indices) -> (..., D)`` and
``set_progress(step, total_steps)`` (the temperature schedule). The layout
rule is in ``base.py``.
"""

from __future__ import annotations

from .affine import AffineVQ
from .alternating import AffineAlternatingVQ, AlternatingVQ
from .base import Quantizer
from .gmvq import GaussianMixtureVQ
from .gmvq_entropy import EntropyRegularizedGMVQ
from .gumbel_vq import GumbelVQ
from .sqvae import SQVAEQuantizer
from .vqvae import DeadCodeReplacementVQ, NormalizedDeadCodeReplacementVQ, NormalizedVQ, VectorQuantizer

# The paper's Table 1, row by row (the command-line names of gmvq_ext.train).
QUANTIZERS: dict[str, type] = {
    "vqvae": VectorQuantizer,                             # VQVAE
    "vqvae-l2": NormalizedVQ,                             # VQVAE + l2
    "vqvae-replace": DeadCodeReplacementVQ,               # VQVAE + replace
    "vqvae-l2-replace": NormalizedDeadCodeReplacementVQ,  # VQVAE + l2 + replace
    "vqvae-affine": AffineVQ,                             # VQVAE + Affine
    "vqvae-opt": AlternatingVQ,                           # VQVAE + OPT
    "vqvae-affine-opt": AffineAlternatingVQ,              # VQVAE + Affine + OPT
    "sqvae": SQVAEQuantizer,                              # SQVAE
    "gumbel": GumbelVQ,                                   # Gumbel-VQVAE
    "gmvq": GaussianMixtureVQ,                            # GM-VQ
    "gmvq-entropy": EntropyRegularizedGMVQ,               # GM-VQ + Entropy
}


def build_quantizer(name: str, codebook_size: int = 1024, dim: int = 64, **options) -> Quantizer:
    """The quantizer registered as ``name`` with K = codebook_size, D = dim and its own options."""
    try:
        cls = QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}") from None
    return cls(dim=dim, codebook_size=codebook_size, **options)


__all__ = ["Quantizer", "QUANTIZERS", "build_quantizer", "GaussianMixtureVQ", "EntropyRegularizedGMVQ",
           "VectorQuantizer", "NormalizedVQ", "DeadCodeReplacementVQ", "NormalizedDeadCodeReplacementVQ",
           "AffineVQ", "AlternatingVQ", "AffineAlternatingVQ", "GumbelVQ", "SQVAEQuantizer"]
