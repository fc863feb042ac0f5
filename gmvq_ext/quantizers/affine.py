"""VQ-VAE with an affine reparameterisation of the codebook (the paper's "VQVAE + Affine" row).

Huh, Cheung, Agrawal, Isola 2023, "Straightening Out the Straight-Through
Estimator: Overcoming Optimization Challenges in Vector Quantized Networks"
(ICML), and its reference implementation, the ``vqtorch`` library
(``vqtorch/nn/affine.py``, ``VectorQuant(affine_lr=...)``).

Why: the straight-through estimator updates only the codes that were chosen,
so as the encoder's output distribution drifts, unchosen codes are left
behind and stop being chosen ("index collapse"). Sharing one affine map over
all codes lets every code follow the drift: the map's parameters learn from
every chosen code's gradient and move all codes at once.

The math. Raw codes ``c_k`` (K, D) become the code vectors

    e_k = a * c_k + b,    a = 1 + lr_a * affine_weight,   b = lr_a * affine_bias

(per-dimension, shared by all K codes; ``affine_weight`` and ``affine_bias``
are (D,) parameters initialised to 0, so training starts as plain VQ-VAE).
Nearest-code search, the decoder input, the codebook loss ||sg(z) - e||^2 and
the commitment loss ||z - sg(e)||^2 all use ``e``; the codebook loss therefore
trains c, affine_weight and affine_bias.

Choices where the sources leave room:
  * Learned parameters, not running statistics. vqtorch's ``AffineTransform``
    offers both; its ``VectorQuant`` always builds the learned form (the
    running-statistics form, matching the moments of z and of the codebook,
    is never constructed there), so that is the form implemented.
  * ``affine_lr`` (vqtorch's ``affine_lr``, the ``lr_a`` above) multiplies the
    parameters, so gradient steps on them are ``affine_lr`` times larger than
    on other weights under Adam(W). Default 2.0, the value of vqtorch's own
    autoencoder example (its README shows 10.0).
  * One affine group (vqtorch's ``affine_groups=1``, its default).
  * The loss weights are this package's VQ-VAE ones (codebook term 1,
    ``commitment`` 0.25 on the encoder term), so that only the
    reparameterisation differs from ``vqvae``; vqtorch writes them as
    ``(1 - beta)`` and ``beta`` with beta = 0.95.
  * The weight decay of the outer optimiser applies to the affine parameters
    like to every weight, pulling a towards 1 and b towards 0.

Under torch.distributed the affine parameters are ordinary parameters: DDP
averages their gradients, nothing else is shared.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .vqvae import VectorQuantizer


class AffineVQ(VectorQuantizer):
    """VQ-VAE whose code vectors are ``a * codebook + b`` with a, b (D,) shared by every code."""

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, affine_lr: float = 2.0, **options):
        super().__init__(dim, codebook_size, **options)
        if not affine_lr > 0:
            raise ValueError(f"affine_lr must be positive, got {affine_lr}")
        self.affine_lr = float(affine_lr)
        self.affine_weight = nn.Parameter(torch.zeros(self.code_dim))
        self.affine_bias = nn.Parameter(torch.zeros(self.code_dim))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", affine_lr={self.affine_lr}"

    def affine_scale(self) -> Tensor:
        """a = 1 + affine_lr * affine_weight, (D,)."""
        return 1.0 + self.affine_lr * self.affine_weight

    def affine_shift(self) -> Tensor:
        """b = affine_lr * affine_bias, (D,)."""
        return self.affine_lr * self.affine_bias

    def codebook_map(self, raw: Tensor) -> Tensor:
        return raw * self.affine_scale() + self.affine_shift()

    def raw_codes(self, code_vectors: Tensor) -> Tensor:
        """The inverse map, (e - b) / a: k-means centroids become raw codes whose code vectors they are."""
        return (code_vectors - self.affine_shift()) / self.affine_scale()
