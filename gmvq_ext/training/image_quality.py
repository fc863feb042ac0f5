"""PSNR and SSIM of reconstructions, per image, computed by torchmetrics.

Convention (the one most tokenizer papers report): both images are mapped
from the model's [-1, 1] to [0, 1] by (x + 1) / 2, the reconstruction is
clamped to [0, 1] first (the picture a user sees; the MSE metrics are not
clamped), and the data range is 1. Each image gets its own value, and a
split's value is the mean over its images.

- PSNR = 10 log10(1 / MSE_01) with MSE_01 the image's mean squared error in
  [0, 1]; for an unclamped reconstruction that is 10 log10(4 / MSE) of the
  MSE in [-1, 1], since the halved range divides squared errors by 4.
- SSIM: Wang et al. (2004) as torchmetrics defines it: an 11 x 11 Gaussian
  window with sigma 1.5, K1 = 0.01, K2 = 0.03, the SSIM map of every pixel
  (the image mirrored at its borders, whole-sample: "dcb|abcd|cba") averaged
  over the pixels and channels. (scikit-image instead averages only the
  pixels whose window lies inside the image: slightly different numbers;
  results.json names the library and its version.)

torchmetrics (a maintained library, in the train extra) computes both on the
device the model runs on: PSNR in float64, SSIM in float32 (its 11 x 11
convolutions are 20x slower in float64 on a CPU); the per-image values are
summed in float64.
"""

from __future__ import annotations

import torch

CONVENTION = ("per image, pixels mapped from [-1, 1] to [0, 1] with the reconstruction clamped to [0, 1], "
              "data range 1, averaged over images; SSIM: Gaussian window 11, sigma 1.5, every pixel, the image "
              "mirrored at its borders")


def convention() -> str:
    """CONVENTION and the library that computed the numbers, with its version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        library = f"torchmetrics {version('torchmetrics')}"
    except PackageNotFoundError:
        library = "torchmetrics"
    return f"{CONVENTION} ({library})"


def to_unit_range(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[-1, 1] pixels -> [0, 1], clamped, in ``dtype``."""
    return ((images.to(dtype) + 1.0) / 2.0).clamp_(0.0, 1.0)


def psnr_and_ssim(reconstructions: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(PSNR in dB, SSIM), each a float64 tensor (B,) of per-image values, of
    reconstructions of ``images`` (B, 3, H, W) in [-1, 1]."""
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError as error:
        raise ImportError(f"PSNR and SSIM need torchmetrics (pip install torchmetrics; the train extra has it): "
                          f"{error}") from None
    psnr = peak_signal_noise_ratio(to_unit_range(reconstructions, torch.float64), to_unit_range(images, torch.float64),
                                   data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(to_unit_range(reconstructions, torch.float32),
                                               to_unit_range(images, torch.float32), data_range=1.0,
                                               reduction="none")
    return psnr.reshape(-1), ssim.reshape(-1).double()
