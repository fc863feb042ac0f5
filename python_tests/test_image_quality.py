"""PSNR and SSIM (torchmetrics, training/image_quality.py) against values
computed independently (image_quality_reference.py: NumPy, and SciPy's Gaussian filter),
and their place in evaluate() and the curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gmvq_ext.training.image_quality import psnr_and_ssim
from gmvq_ext.training.metrics import evaluate
from gmvq_ext.training.process_group import Context
from gmvq_ext.training.visuals import read_curves, save_training_curves
from image_quality_reference import psnr_reference, ssim_reference


def noisy_pairs(n=6, size=(32, 40), seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, *size, generator=generator) * 2 - 1
    return images + 0.3 * torch.randn(images.shape, generator=generator), images  # some pixels leave [-1, 1]


def test_per_image_values_match_the_independent_computation():
    reconstructions, images = noisy_pairs()
    psnr, ssim = psnr_and_ssim(reconstructions, images)
    assert psnr.shape == ssim.shape == (6,) and psnr.dtype == ssim.dtype == torch.float64
    for i in range(6):
        assert float(psnr[i]) == pytest.approx(psnr_reference(reconstructions[i], images[i]), rel=1e-6)
        assert float(ssim[i]) == pytest.approx(ssim_reference(reconstructions[i], images[i]), abs=2e-6)


def test_psnr_of_the_signed_mse_is_converted_for_the_halved_range():
    # Inside [-1, 1] nothing is clamped, and PSNR in [0, 1] is 10 log10(4 / MSE in [-1, 1]).
    images = torch.rand(3, 3, 16, 16) * 1.6 - 0.8
    reconstructions = images + 0.1 * torch.randn_like(images).clamp(-1.5, 1.5)
    mse = (reconstructions.double() - images.double()).square().mean(dim=(1, 2, 3))
    psnr, _ = psnr_and_ssim(reconstructions, images)
    torch.testing.assert_close(psnr, 10 * torch.log10(4 / mse), rtol=1e-6, atol=0)
    assert psnr_and_ssim(images, images)[1].tolist() == pytest.approx([1.0] * 3, abs=1e-6)


class Reconstructor(torch.nn.Module):
    """A model of evaluate()'s interface whose reconstruction is a fixed distortion of its input."""

    def __init__(self):
        super().__init__()
        self.quantizer = torch.nn.Module()
        self.quantizer.codebook_size = 4
        self.scale = torch.nn.Parameter(torch.tensor(0.8))

    def forward(self, images):
        indices = (images[:, 0, ::8, ::8] > 0).long()
        info = {"perplexity": torch.tensor(2.0), "perplexity_hard": torch.tensor(2.0)}
        return images * self.scale + 0.05 * torch.sin(13 * images), indices, torch.tensor(0.0), info


@pytest.mark.parametrize("batch_size", [4, 7, 30])
def test_evaluate_reports_the_mean_over_images(batch_size):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(30, 3, 24, 24, generator=generator) * 2 - 1
    metrics = evaluate(Reconstructor(), images, batch_size, Context(rank=0, world_size=1, local_rank=0,
                                                                        device=torch.device("cpu")))
    reconstructions = Reconstructor()(images)[0].detach()
    expected_psnr = np.mean([psnr_reference(r, x) for r, x in zip(reconstructions, images)])
    expected_ssim = np.mean([ssim_reference(r, x) for r, x in zip(reconstructions, images)])
    assert metrics["psnr"] == pytest.approx(expected_psnr, rel=1e-6)
    assert metrics["ssim"] == pytest.approx(expected_ssim, abs=2e-6)
    counts = metrics["code_counts"].double()
    p = counts[counts > 0] / counts.sum()
    assert metrics["code_entropy_bits"] == pytest.approx(float(-(p * p.log2()).sum()))


def test_curves_carry_the_evaluations_psnr_and_ssim(tmp_path):
    lines = [{"epoch": e, "train/mse": 0.5 / e, "val/mse": 0.4 / e, "train/perplexity": 9.0, "val/perplexity": 8.0,
              "val/psnr": 20.0 + e, "val/ssim": 0.5 + e / 10} for e in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert curves["val/psnr"] == ([1, 2], [21.0, 22.0]) and curves["val/ssim"] == ([1, 2], [0.6, 0.7])
    assert "train/psnr" not in curves  # the training steps measure no PSNR
    save_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
