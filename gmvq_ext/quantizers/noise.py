"""Philox noise keyed by 0-d int64 tensors instead of Python ints.

Bit-identical to ``gmvq_ext.reference.gumbel_noise`` / ``gaussian_noise`` /
``random_words`` (the tests check it), but the seed and offset stay tensors
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

_MASK32 = 0xFFFFFFFF


def random_words(seed: Tensor, offset: Tensor, stream: int, numel: int, device=None) -> Tensor:
    """The first ``numel`` 32-bit words of a Philox stream, int64 in [0, 2^32)."""
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device) + (stream << 62)
    offset = offset.to(device=blocks.device, dtype=torch.int64)
    seed = seed.to(device=blocks.device, dtype=torch.int64)
    zeros = torch.zeros_like(blocks)
    counter = (blocks & _MASK32, blocks >> 32, zeros + (offset & _MASK32), zeros + ((offset >> 32) & _MASK32))
    words = reference.philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    return torch.stack(words, dim=1).reshape(-1)[:numel]


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
    u = reference.uniform_from_bits(random_words(seed, offset, reference.GUMBEL_STREAM, n * k, device))
    return -reference.log_canonical(-reference.log_canonical(u)).reshape(n, k)


def gaussian_noise(seed: Tensor, offset: Tensor, n: int, d: int, device=None) -> Tensor:
    """N(0, 1) eps[n, d] (stream 1, element n*D + d), float32 (N, D)."""
    fast = _kernel_noise(seed, offset, n, d, device, gaussian=True)
    if fast is not None:
        return fast
    u = reference.uniform_from_bits(random_words(seed, offset, reference.GAUSSIAN_STREAM, n * d, device))
    return (reference.erfinv_canonical((u + u) + -1.0) * reference._SQRT_TWO).reshape(n, d)


# The quantizers' own discrete choices (dead-code replacement) use the
# Gumbel stream under a different key: Philox with another key is an
# independent generator, and the counter layout has no room for a third stream.
CHOICE_KEY_XOR = 0x632BE59BD9B4E019


def random_indices(seed: Tensor, offset: Tensor, count: int, high: int, device=None) -> Tensor:
    """``count`` indices in [0, high), int64 (modulo bias < high / 2^32, negligible)."""
    words = random_words(seed ^ CHOICE_KEY_XOR, offset, reference.GUMBEL_STREAM, count, device)
    return words % max(high, 1)
