"""Input checks for the fake kernels: mirrors of csrc/checks.cpp, same messages."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_matrix(t: Tensor, name: str, shape_doc: str) -> None:
    torch._check(t.dim() == 2, lambda: f"{name} must be a 2-D tensor {shape_doc}, got {t.dim()}-D")
    torch._check(
        t.dtype in FLOAT_DTYPES,
        lambda: f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}",
    )


def check_like(t: Tensor, name: str, ref: Tensor, ref_name: str, same_dtype: bool) -> None:
    torch._check(
        t.device == ref.device,
        lambda: f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}",
    )
    if same_dtype:
        torch._check(
            t.dtype == ref.dtype,
            lambda: f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}",
        )


def check_codebook_inputs(z: Tensor, weight: Optional[Tensor], codebook: Tensor) -> None:
    check_matrix(z, "z", "(N, D)")
    check_matrix(codebook, "codebook", "(K, D)")
    check_like(codebook, "codebook", z, "z", same_dtype=True)
    torch._check(codebook.shape[0] >= 1, lambda: "codebook must have at least one code (K >= 1), got K = 0")
    torch._check(
        codebook.shape[1] == z.shape[1],
        lambda: f"codebook must have D = {z.shape[1]} columns like z, got {codebook.shape[1]}",
    )
    torch._check(z.shape[1] >= 1, lambda: "z must have at least one column (D >= 1), got D = 0")
    if weight is not None:
        check_matrix(weight, "weight", "(N, D) or (N, 1)")
        check_like(weight, "weight", z, "z", same_dtype=True)
        torch._check(
            weight.shape[0] == z.shape[0] and weight.shape[1] in (z.shape[1], 1),
            lambda: f"weight must have shape (N, D) = ({z.shape[0]}, {z.shape[1]}) or (N, 1), "
            f"got {list(weight.shape)}",
        )


def check_logits(logits: Tensor, name: str = "logits") -> None:
    check_matrix(logits, name, "(N, K)")
    torch._check(logits.shape[1] >= 1, lambda: f"{name} must have at least one column (K >= 1), got K = 0")


def check_positive_finite(value: float, name: str) -> None:
    torch._check(
        math.isfinite(value) and value > 0, lambda: f"{name} must be finite and > 0, got {value}"
    )


def check_noise(noise: Optional[Tensor], name: str, rows: int, cols: int, ref: Tensor) -> None:
    if noise is None:
        return
    check_matrix(noise, name, "(N, cols)")
    check_like(noise, name, ref, "the input", same_dtype=False)
    torch._check(
        noise.shape[0] == rows and noise.shape[1] == cols,
        lambda: f"{name} must have shape ({rows}, {cols}), got {list(noise.shape)}",
    )


def check_grad(grad: Tensor, name: str, shape: tuple, ref: Tensor) -> None:
    torch._check(
        tuple(grad.shape) == tuple(shape), lambda: f"{name} must have shape {list(shape)}, got {list(grad.shape)}"
    )
    torch._check(grad.device == ref.device, lambda: f"{name} must be on {ref.device}, got {grad.device}")
    torch._check(grad.dtype.is_floating_point, lambda: f"{name} must be floating point, got {grad.dtype}")
