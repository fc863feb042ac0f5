"""Random discrete choices of the quantizers themselves (dead-code replacement),
from the ops' counter-based generator, keyed by the modules' buffers.

The Gumbel and Gaussian noise of sampling is drawn inside the ops from the
noise key; this module only covers choices the ops do not make."""

from __future__ import annotations

import torch
from torch import Tensor

from . import backend

# The quantizers' own choices use Philox under a different key (the seed
# XOR this constant): another key is an independent generator, and the
# counter layout has no room for a third stream.
CHOICE_KEY_XOR = 0x632BE59BD9B4E019


def random_indices(seed: Tensor, offset: Tensor, count: int, high: int, device=None) -> Tensor:
    """``count`` indices uniform in [0, high), int64, from 0-d int64 tensors seed and offset.

    floor(u * high) in float64 is exact (u has 23 significant bits), so every
    device draws the same indices; the bias is below high / 2^23."""
    state = torch.stack([seed ^ CHOICE_KEY_XOR, offset]).to(device)
    like = torch.empty((count, 1), device=device)
    uniform = backend.philox_noise(like, state, "uniform").reshape(count)
    return (uniform.double() * max(high, 1)).long().clamp_max(max(high, 1) - 1)
