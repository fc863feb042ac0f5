"""PSNR and SSIM computed independently of the package (NumPy, and SciPy's Gaussian filter for
SSIM): what the image-quality tests compare torchmetrics' values against."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


def unit_range(images: torch.Tensor, clamp: bool) -> np.ndarray:
    array = (images.double().numpy() + 1.0) / 2.0
    return np.clip(array, 0.0, 1.0) if clamp else array


def psnr_reference(reconstruction: torch.Tensor, image: torch.Tensor) -> float:
    """10 log10(1 / MSE) of one image in [0, 1], the reconstruction clamped."""
    error = np.mean((unit_range(reconstruction, True) - unit_range(image, False)) ** 2)
    return 10.0 * math.log10(1.0 / error)


def ssim_reference(reconstruction: torch.Tensor, image: torch.Tensor) -> float:
    """Wang et al. (2004) of one (3, H, W) image in [0, 1]: Gaussian window
    sigma 1.5 of radius 5, K1 0.01, K2 0.03, every pixel's SSIM (the image
    mirrored at its borders) averaged over pixels and channels."""
    x, y = unit_range(reconstruction, True), unit_range(image, False)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    maps = []
    for a, b in zip(x, y):
        def blur(values):
            return gaussian_filter(values, sigma=1.5, truncate=3.5, mode="mirror")
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
        cov = blur(a * b) - mu_a * mu_b
        maps.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(maps))
