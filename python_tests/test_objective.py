"""The training objective in the units of the bound (gmvq_ext/objective.py,
docs/math.md "Units of the objective"): the trainer's loss against the negative
bound of a tiny batch written out by hand, image by image, pixel by pixel."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gmvq_ext import build_quantizer
from gmvq_ext.models import build_autoencoder
from gmvq_ext.objective import latent_fraction, per_pixel_bound
from training_runs import SMALL, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_batch(downsampling=4, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=gen, dtype=torch.float64) * 2 - 1


def network(name, downsampling=4, **options):
    torch.manual_seed(0)
    quantizer = build_quantizer(name, codebook_size=8, dim=4, **options)
    return build_autoencoder("cifar10", quantizer, downsampling).double().eval()


@pytest.mark.parametrize("downsampling", [4, 8])
def test_gmvq_loss_is_the_negative_albo_per_pixel_channel(downsampling):
    """-ALBO(x) / P = [sum_p (x_p - x_hat_p)^2 / (2 sigma_x2) + sum_m (beta KL(q_bar || U) + gamma lambda_m)] / P,
    each image's sums written out, at beta = gamma = 1 (the ALBO itself) and at other weights."""
    images = tiny_batch(downsampling)
    sigma_x2, sigma_z2 = 0.3, 0.7
    for beta, gamma in [(1.0, 1.0), (2.5, 0.2)]:
        model = network("gmvq", downsampling, beta=beta, gamma=gamma, sigma_z2=sigma_z2, kmeans_init=False)
        with torch.no_grad():
            reconstruction, indices, quantizer_loss, _ = model(images)
            loss = per_pixel_bound(F.mse_loss(reconstruction, images), quantizer_loss,
                                   latent_fraction(images, indices), sigma_x2)

            # By hand: the encoder's z_hat and weights, the posterior of every latent vector.
            q = model.quantizer
            encoded = model.encoder(images)                          # (B, 2D, h, w)
            z_hat = encoded[:, :4].permute(0, 2, 3, 1)               # (B, h, w, D)
            weight = F.softplus(encoded[:, 4:]).permute(0, 2, 3, 1)
            distance = (weight[..., None, :] * (z_hat[..., None, :] - q.codebook) ** 2).sum(-1)  # (B, h, w, K)
            posterior = torch.softmax(-distance, dim=-1)
            q_bar = posterior.reshape(-1, 8).mean(0)
            kl = (q_bar * torch.log(q_bar * 8)).sum()
            codes = q.codebook[distance.argmin(-1)]
            bounds = []
            for image in range(2):
                pixel_channels = images[image].numel()
                reconstruction_term = ((images[image] - reconstruction[image]) ** 2).sum() / (2 * sigma_x2)
                latent_terms = ((z_hat[image] - codes[image]) ** 2).sum(-1) / (2 * sigma_z2)  # (h, w)
                regulariser = sum(beta * kl + gamma * latent for latent in latent_terms.flatten())
                bounds.append((reconstruction_term + regulariser) / pixel_channels)
        expected = sum(bounds) / 2
        assert indices[0].numel() == (16 // downsampling) ** 2
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)


def test_vqvae_loss_is_its_papers_loss_per_pixel_channel():
    """VQ-VAE: sum_p (x - x_hat)^2 / (2 sigma_x2) + sum_m (||sg(z) - e||^2 + 0.25 ||z - sg(e)||^2), over P."""
    images = tiny_batch()
    model = network("vqvae")
    with torch.no_grad():
        reconstruction, indices, quantizer_loss, _ = model(images)
        loss = per_pixel_bound(F.mse_loss(reconstruction, images), quantizer_loss, latent_fraction(images, indices),
                               0.5)
        z = model.encoder(images).permute(0, 2, 3, 1)
        codes = model.quantizer.codebook[indices]
        per_image = [((images[i] - reconstruction[i]) ** 2).sum() + 1.25 * ((z[i] - codes[i]) ** 2).sum()
                     for i in range(2)]
    torch.testing.assert_close(loss, sum(per_image) / 2 / images[0].numel(), rtol=1e-10, atol=0)


def test_latent_fraction_reads_shapes_and_checks_them():
    images, indices = torch.empty(5, 3, 32, 32), torch.empty(5, 8, 8, dtype=torch.long)
    assert latent_fraction(images, indices) == 64 / 3072 == 1 / 48
    with pytest.raises(ValueError, match="same batch size"):
        latent_fraction(images, indices[:4])


def test_the_trainer_minimises_the_bound_with_its_sigma_x2(tmp_path):
    """The logged training loss is MSE / (2 sigma_x2) + (M / P) (latent + KL) (epoch means: linear)."""
    out = tmp_path / "run"
    done = run_cli(*SMALL, "--epochs", "1", "--sigma-x2", "0.25", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    expected = record["train/mse"] / 0.5 + (64 / 3072) * (record["train/loss/latent"] + record["train/loss/kl_uniform"])
    assert record["train/loss"] == pytest.approx(expected, rel=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["sigma_x2"] == 0.25

    bad = run_cli(*SMALL, "--epochs", "1", "--sigma-x2", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--sigma-x2 must be finite and positive" in bad.stderr
    nan = run_cli(*SMALL, "--epochs", "1", "--sigma-x2", "nan", "--out", str(tmp_path / "nan"))
    assert nan.returncode == 2 and "--sigma-x2 must be finite and positive" in nan.stderr


def test_a_run_from_before_the_units_is_not_continued():
    """Its checkpoint trained another objective: --resume refuses it, naming --sigma-x2."""
    from gmvq_ext.training.config import RUN_DEFINING, parse_args
    from gmvq_ext.training.resume import check_same_run

    args = parse_args([*SMALL, "--epochs", "2", "--out", "unused"])
    saved = {name: getattr(args, name) for name in RUN_DEFINING if name != "sigma_x2"}
    saved["epochs"] = 2
    with pytest.raises(ValueError, match=r"--sigma-x2 0.5 \(checkpoint: .none \(an objective before the ALBO's units"):
        check_same_run(args, saved, 1, 1)
    check_same_run(args, {**saved, "sigma_x2": 0.5}, 1, 1)  # the same run, written by this version
