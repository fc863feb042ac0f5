"""Philox noise keyed by 0-d int64 tensors instead of Python ints.

The reference's generator called with the seed and offset kept as tensors
(the modules' ``seed`` and ``step`` buffers). Reading them with ``.item()``
would make torch.compile(fullgraph=True) break the graph unless
``capture_scalar_outputs`` is set; tensor arithmetic keeps the noise inside
the compiled graph and lets it follow the buffers without recompiling.

Eagerly, where ``torch.ops.gmvq.philox_noise`` has a kernel for the device,
the Gumbel and Gaussian noise come from it instead (same bits, by that op's
contract; the int64 tensor Philox costs ~100 passes over N x K elements)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops, reference
from .backend import has_kernel

random_words = reference.random_words  # accepts the 0-d tensor seed and offset


def _kernel_noise(seed: Tensor, offset: Tensor, rows: int, columns: int, device, gaussian: bool):
    """The op's noise when it has a kernel here and we are not being traced, else None."""
    device = torch.device(device if device is not None else "cpu")
    if torch.compiler.is_compiling() or not has_kernel("philox_noise", device.type):
        return None
    like = torch.empty((rows, columns), dtype=torch.float32, device=device)
    return ops.philox_noise(like, int(seed), int(offset), gaussian)


def gumbel_noise(seed: Tensor, offset: Tensor, n: int, k: int, device=None) -> Tensor:
    """Gumbel(0, 1) g[n, k] (stream 0, element n*K + k), float32 (N, K)."""
    fast = _kernel_noise(seed, offset, n, k, device, gaussian=False)
    if fast is not None:
        return fast
    return reference.gumbel_noise(seed, offset, n, k, device)


def gaussian_noise(seed: Tensor, offset: Tensor, n: int, d: int, device=None) -> Tensor:
    """N(0, 1) eps[n, d] (stream 1, element n*D + d), float32 (N, D)."""
    fast = _kernel_noise(seed, offset, n, d, device, gaussian=True)
    if fast is not None:
        return fast
    return reference.gaussian_noise(seed, offset, n, d, device)


# The quantizers' own discrete choices (dead-code replacement) use the
# Gumbel stream under a different key: Philox with another key is an
# independent generator, and the counter layout has no room for a third stream.
CHOICE_KEY_XOR = 0x632BE59BD9B4E019


def random_indices(seed: Tensor, offset: Tensor, count: int, high: int, device=None) -> Tensor:
    """``count`` indices in [0, high), int64 (modulo bias < high / 2^32, negligible)."""
    words = random_words(seed ^ CHOICE_KEY_XOR, offset, reference.GUMBEL_STREAM, count, device)
    return words % max(high, 1)
