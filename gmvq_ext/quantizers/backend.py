"""The one place that decides which implementation of a gmvq op a quantizer runs.

The kernel (``torch.ops.gmvq``, through ``gmvq_ext.ops``) wherever one is built
for the tensors' device: CPU always, CUDA in a CUDA build. The reference
(``gmvq_ext.reference``: plain PyTorch, same values and gradients, N x K
memory) only on a device with no kernel. Eager, under torch.compile and in a
CUDA graph alike: the ops take the temperature and the noise key as tensors,
so nothing forces a different path.

Every function here has the signature of the op of the same name.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import ops, reference


@torch._dynamo.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.gmvq.<op>`` has a kernel for ``device_type`` ("cpu", "cuda", ...).

    A constant to torch.compile: kernels are registered at import time."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gmvq::{op}", device_type.upper())


def implementation(op: str, device: torch.device) -> Callable:
    """``gmvq_ext.ops.<op>`` where its kernel exists for ``device``, else ``gmvq_ext.reference.<op>``."""
    return getattr(ops if has_kernel(op, device.type) else reference, op)


def philox_noise(like: Tensor, noise_state: Tensor, distribution: str) -> Tensor:
    return implementation("philox_noise", like.device)(like, noise_state, distribution)


def codebook_distance(z: Tensor, weight, codebook: Tensor) -> Tensor:
    return implementation("codebook_distance", z.device)(z, weight, codebook)


def weighted_softmax(z: Tensor, weight, codebook: Tensor, temperature):
    return implementation("weighted_softmax", z.device)(z, weight, codebook, temperature)


def gumbel_argmax(logits: Tensor, temperature, hard: bool, noise_state: Tensor, noise=None):
    return implementation("gumbel_argmax", logits.device)(logits, temperature, hard, noise_state, noise)


def aggregated_posterior_entropy(logits: Tensor):
    return implementation("aggregated_posterior_entropy", logits.device)(logits)


def quantize(z: Tensor, weight, codebook: Tensor, temperature, sigma_z2: float, hard: bool, training: bool,
             noise_state: Tensor, gumbel_noise=None, eps_noise=None, noise_scale: float = 1.0):
    """(z_out, indices, q_bar, latent_reg) of the fused bottleneck."""
    outputs = implementation("quantize", z.device)(z, weight, codebook, temperature, sigma_z2, hard, training,
                                                   noise_state, gumbel_noise, eps_noise, noise_scale)
    return outputs[:4]
