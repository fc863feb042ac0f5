"""VQ-VAE with alternating optimisation and the synchronised update (the paper's
"VQVAE + OPT" and "VQVAE + Affine + OPT" rows).

Huh, Cheung, Agrawal, Isola 2023, "Straightening Out the Straight-Through
Estimator: Overcoming Optimization Challenges in Vector Quantized Networks"
(ICML), and its reference implementation, the ``vqtorch`` library
(``VectorQuant(sync_nu=..., inplace_optimizer=...)`` in ``vqtorch/nn/vq.py``,
``examples/experimental_inplace_update.py``, and the author's explanation in
vqtorch issue #5).

Why. The straight-through gradient the encoder receives is exact only where
z = e, so its error grows with the commitment loss; and the codes, trained by
the same optimiser step as the encoder, always describe the encoder of the
previous step. Huh et al. therefore (1) alternate: first move the codebook to
reduce the codebook loss, then train the network against the moved codes;
(2) synchronise: also move each code along the task gradient its encoder
outputs receive, so that it follows them within the step.

The math, one training forward on encoder outputs z_n (n = 1..N):

1. Assign ``i_n = argmin_k ||z_n - e_k||`` (e_k = the code vectors:
   raw codes c_k, or a * c_k + b with the affine map of ``affine.py``).
2. Codebook step (the first half of the alternation): one step of SGD with
   momentum on  ``J(c) = (1/N) sum_n ||e_{i_n} - sg(z_n)||^2``  with respect
   to the raw codes only:
       dJ/dc_k = (2/N) a * (n_k e_k - sum_{n: i_n = k} z_n)
       v <- mu v + dJ/dc,   c <- c - lr v
   (``codebook_velocity`` v is a buffer; lr = ``codebook_lr``,
   mu = ``codebook_momentum``; a = 1 without the affine map).
3. Re-assign ``i_n`` with the moved codes (the second half sees the codebook
   the first half produced; the encoder has not changed, so this is exactly
   the second forward pass of the alternation, restricted to the quantizer).
4. Decoder input, the synchronised straight-through estimator:
       z_q = z + sg(e_i - z) + nu * (e_i - sg(e_i))
   Its value is e_i. The encoder receives the decoder's gradient g unchanged
   (plain straight-through); the code e_i additionally receives nu * g, so
   the raw code c_k gets the gradient nu * a * sum_{n: i_n = k} g_n (and the
   affine a, b theirs through e) and the outer optimiser moves it the way
   its encoder outputs move.
5. Loss = ||sg(z) - e'_i||^2 + commitment * ||z - sg(e_i)||^2, where e'
   uses the raw codes detached: the raw codes already took their step on this
   term in 2., so in the outer step only the affine parameters (when
   present) learn from it; without them it is a constant, reported so that
   the loss means the same for every VQ-VAE variant.

Choices where the sources leave room:
  * "Alternating" inside one optimiser's training loop: the codebook step
    happens inside the quantizer's training forward (vqtorch's in-place
    optimiser), so ``gmvq_ext.train`` needs no hook. Only the raw codes take
    it (as in vqtorch, whose in-place optimiser holds the codebook embedding
    alone); the affine parameters and the raw codes' synchronised gradient go
    through the outer optimiser with every other weight.
  * The codebook step's objective J is the mean over vectors of squared
    distances (summed over D), so its learning rate does not depend on D:
    vqtorch's example steps SGD(lr=50, momentum=0.9) on the mean over
    elements, which at the paper's D = 64 is lr 50/64 = 0.78 on J. Default
    ``codebook_lr`` 0.8, ``codebook_momentum`` 0.9. The step is stable for
    any assignment (even every vector to one code) iff lr < 1 + mu; larger
    values are refused.
  * nu (vqtorch's ``sync_nu``): default 2.0, the value of vqtorch's
    autoencoder example (its README shows 0.2; lucidrains'
    vector-quantize-pytorch issue #47 reads the paper's values as 0.01 to
    2). Under Adam(W) the raw codes' outer update is normalised per
    element, so nu mostly sets the balance against weight decay and, with
    the affine map, against the codebook term's gradient on a and b.
  * The synchronised term follows vqtorch: nu * (e - sg(e)) sends nu * g to
    the code. lucidrains' ``sync_update_v`` instead adds nu * (q - sg(q))
    to the straight-through output q = z + sg(e - z), which scales the
    encoder's gradient by 1 + nu and leaves the code alone; that does not
    move the codebook, which is what the paper's synchronisation is for.
  * ``commitment`` (the encoder's pull towards its code) keeps the VQ-VAE
    default 0.25. vqtorch's in-place recipe uses beta = 1.0, i.e. no encoder
    term: ``commitment=0`` reproduces it.
  * Re-assignment after the codebook step (3.) is the two-pass alternation
    the author describes in vqtorch issue #5 ("optimize the codebook and
    then another forward pass with the updated codebook to train the
    parameters"); vqtorch's in-place shortcut keeps the first assignment to
    save compute. It costs a second nearest-code search per training
    forward (on one CPU thread, N = 8192, K = 1024, D = 64: 0.66 s against
    0.29 s for ``vqvae``'s quantizer forward).

Under torch.distributed the per-code sums, counts and N of step 2 are summed
over ranks before the step, so every rank takes the same step on the global
batch and the codebooks and velocities stay identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import collectives
from .affine import AffineVQ
from .base import mean_squared_distance
from .vqvae import VectorQuantizer


class AlternatingVQ(VectorQuantizer):
    """VQ-VAE trained by alternating optimisation (a codebook step inside each
    training forward) with the synchronised straight-through estimator."""

    def __init__(self, dim: int = 64, codebook_size: int = 1024, *, sync_nu: float = 2.0,
                 codebook_lr: float = 0.8, codebook_momentum: float = 0.9, **options):
        super().__init__(dim, codebook_size, **options)
        if not sync_nu >= 0:
            raise ValueError(f"sync_nu must be >= 0, got {sync_nu}")
        if not 0 <= codebook_momentum < 1:
            raise ValueError(f"codebook_momentum must be in [0, 1), got {codebook_momentum}")
        if not 0 < codebook_lr < 1 + codebook_momentum:
            raise ValueError(f"codebook_lr must be in (0, 1 + codebook_momentum) = (0, {1 + codebook_momentum}) "
                             f"for the codebook step to be stable, got {codebook_lr}")
        self.sync_nu = float(sync_nu)
        self.codebook_lr = float(codebook_lr)
        self.codebook_momentum = float(codebook_momentum)
        self.register_buffer("codebook_velocity", torch.zeros_like(self.codebook.detach()))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", sync_nu={self.sync_nu}, codebook_lr={self.codebook_lr}, "
                f"codebook_momentum={self.codebook_momentum}")

    def _raw_code_gain(self) -> Tensor | float:
        """de_k/dc_k per dimension: 1 (the code vectors are the raw codes)."""
        return 1.0

    @torch.no_grad()
    def _assign(self, z: Tensor) -> Tensor:
        indices = super()._assign(z)
        if self.training:
            self._codebook_step(z.detach(), indices)
            indices = super()._assign(z)
        return indices

    @torch.no_grad()
    def _codebook_step(self, z: Tensor, indices: Tensor) -> None:
        """One SGD-with-momentum step of the raw codes on J (module docstring, step 2)."""
        k, d = self.codebook.shape
        sums = torch.zeros(k, d, dtype=z.dtype, device=z.device).index_add_(0, indices, z)
        counts = torch.zeros(k, dtype=z.dtype, device=z.device).index_add_(
            0, indices, torch.ones_like(indices, dtype=z.dtype))
        # One collective: sums, counts and N travel together.
        packed = torch.cat([sums.reshape(-1), counts, counts.new_full((1,), z.shape[0])])
        if collectives.is_distributed():
            torch.distributed.all_reduce(packed)
        sums, counts, total = packed[: k * d].reshape(k, d), packed[k * d: -1], packed[-1]
        residual = counts[:, None] * self.codebook_vectors() - sums  # sum over assigned n of (e_k - z_n)
        gradient = (2.0 / total.clamp_min(1)) * residual * self._raw_code_gain()
        self.codebook_velocity.mul_(self.codebook_momentum).add_(gradient)
        self.codebook.sub_(self.codebook_lr * self.codebook_velocity)

    def _codebook_loss(self, z: Tensor, z_q: Tensor, indices: Tensor) -> Tensor:
        # The raw codes took their step on this term in _assign; only the map's own parameters learn from it here.
        return mean_squared_distance(self.codebook_map(self.codebook.detach())[indices], z.detach())

    def _straight_through(self, z: Tensor, z_q: Tensor) -> Tensor:
        # Value z_q; the encoder gets g, the code additionally nu * g (module docstring, step 4).
        return super()._straight_through(z, z_q) + self.sync_nu * (z_q - z_q.detach())


class AffineAlternatingVQ(AlternatingVQ, AffineVQ):
    """Both remedies of Huh et al.: the affine codebook of ``AffineVQ`` trained
    by the alternating optimisation and synchronised update of ``AlternatingVQ``."""

    def _raw_code_gain(self) -> Tensor:
        """de_k/dc_k = a, the affine scale."""
        return self.affine_scale()
