"""Which implementation of a ``gmvq`` op a quantizer calls on a device."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "fused", "reference")


@torch._dynamo.assume_constant_result
def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.gmvq.<op>`` has a kernel for ``device_type`` ("cpu", "cuda").

    A constant to torch.compile: kernels are registered at import time."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gmvq::{op}", device_type.upper())


def use_fused(backend: str, op: str, device_type: str) -> bool:
    """True for the fused kernel, False for ``gmvq_ext.reference``.

    "auto" takes the kernel where one is built for the device; "fused" insists
    on it (the op then fails with the dispatcher's message if it is missing)."""
    if backend == "fused":
        return True
    if backend == "reference":
        return False
    return has_kernel(op, device_type)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def codebook_distance(z, weight, codebook):
    """Squared (weighted) distances (N, K): the kernel where one is built, else the reference."""
    from .. import ops, reference

    if has_kernel("codebook_distance", z.device.type):
        return ops.codebook_distance(z, weight, codebook)
    return reference.codebook_distance(z, weight, codebook)
