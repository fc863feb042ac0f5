"""Input checks for the fake kernels: mirrors of csrc/checks.cpp, same messages."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

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


NOISE_DISTRIBUTIONS = ("uniform", "gumbel", "gaussian")


def check_temperature(temperature: Tensor, ref: Tensor) -> None:
    """As the C++ check: structure always, the value when it is a real CPU tensor
    (a fake or device tensor's value is unknown without a sync)."""
    torch._check(temperature.dim() == 0, lambda: f"temperature must be a 0-dim tensor, got shape {list(temperature.shape)}")
    torch._check(temperature.dtype in (torch.float32, torch.float64),
                 lambda: f"temperature must be float32 or float64, got {temperature.dtype}")
    torch._check(temperature.device.type == "cpu" or temperature.device == ref.device,
                 lambda: f"temperature must be on the CPU or on {ref.device}, got {temperature.device}")
    if temperature.device.type == "cpu" and not is_fake(temperature):
        check_positive_finite(float(temperature), "temperature")


def check_noise_state(noise_state: Tensor, ref: Tensor) -> None:
    torch._check(noise_state.dtype == torch.int64 and noise_state.numel() == 2,
                 lambda: "noise_state must be an int64 tensor of two elements [seed, offset], got "
                 f"{noise_state.dtype} of shape {list(noise_state.shape)}")
    torch._check(noise_state.device.type == "cpu" or noise_state.device == ref.device,
                 lambda: f"noise_state must be on the CPU or on {ref.device}, got {noise_state.device}")


def check_distribution(distribution: str) -> None:
    torch._check(distribution in NOISE_DISTRIBUTIONS,
                 lambda: f'distribution must be "uniform", "gumbel" or "gaussian", got "{distribution}"')


def check_quantize_inputs(z, weight, codebook, temperature, sigma_z2, noise_state, gumbel_noise, eps_noise,
                          noise_scale: float) -> None:
    check_codebook_inputs(z, weight, codebook)
    check_temperature(temperature, z)
    check_positive_finite(sigma_z2, "sigma_z2")
    check_noise_state(noise_state, z)
    check_noise(gumbel_noise, "gumbel_noise", z.shape[0], codebook.shape[0], z)
    check_noise(eps_noise, "eps_noise", z.shape[0], z.shape[1], z)
    check_noise_scale(noise_scale)


def check_noise_scale(noise_scale: float) -> None:
    torch._check(math.isfinite(noise_scale) and noise_scale >= 0,
                 lambda: f"noise_scale must be finite and non-negative (0: no Gaussian noise), got {noise_scale}")


def check_quantize_backward_state(grad_z_out, grad_q_bar, grad_latent_reg, indices, row_lse, z_soft, z, codebook,
                                  hard: bool, training: bool) -> None:
    n, d, k = z.shape[0], z.shape[1], codebook.shape[0]
    check_grad(grad_z_out, "grad_z_out", (n, d), z)
    check_grad(grad_q_bar, "grad_q_bar", (k,), z)
    check_grad(grad_latent_reg, "grad_latent_reg", (n,), z)
    torch._check(indices.dim() == 1 and indices.shape[0] == n and indices.dtype == torch.int64,
                 lambda: f"indices must be an int64 tensor of shape ({n}), got {indices.dtype} {list(indices.shape)}")
    torch._check(indices.device == z.device, lambda: f"indices must be on {z.device}, got {indices.device}")
    acc = accumulation_dtype(z.dtype)
    torch._check(tuple(row_lse.shape) == (n, 2) and row_lse.dtype == acc and row_lse.device == z.device,
                 lambda: f"row_lse must be the forward's ({n}, 2) {acc} tensor on {z.device}, got "
                 f"{row_lse.dtype} {list(row_lse.shape)} on {row_lse.device}")
    soft_rows = n if training and not hard else 0
    torch._check(tuple(z_soft.shape) == (soft_rows, d) and z_soft.dtype == acc and z_soft.device == z.device,
                 lambda: f"z_soft must be the forward's ({soft_rows}, {d}) {acc} tensor on {z.device}, got "
                 f"{z_soft.dtype} {list(z_soft.shape)} on {z_soft.device}")


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
