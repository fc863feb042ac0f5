"""Opt-in rFID (training/rfid.py): the weights file's SHA-256 is checked
before anything is built, nothing can be downloaded, and gmvq-evaluate's
value is the Fréchet distance computed here independently (SciPy), with a
small stand-in feature network: the Inception weights themselves cannot be
fetched on this project's machines."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from gmvq_ext.cli.evaluate import main as evaluate_main
from gmvq_ext.data import to_uint8
from gmvq_ext.training import rfid
from gmvq_ext.training.rfid import ReconstructionFID, WeightsError

from folder_runs import folder_test_reconstructions, photos, run  # noqa: F401 (fixtures: a trained run)


class PooledPixels(torch.nn.Module):
    """A stand-in feature network: uint8 images -> 3 features (each channel's mean)."""
    num_features = 3

    def __init__(self, weights=None):
        super().__init__()

    def forward(self, images):
        assert images.dtype == torch.uint8
        return F.adaptive_avg_pool2d(images.float() / 255, 1).flatten(1)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    # Tr sqrt(cov_r cov_f) from the product's eigenvalues (real, >= 0 for two covariances; sqrtm warns
    # on the singular covariances of a barely trained model's reconstructions)
    eigenvalues = scipy.linalg.eigvals(cov_r @ cov_f).real.clip(min=0)
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) - 2 * np.sqrt(eigenvalues).sum())


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / rfid.INCEPTION_FILE
    path.write_bytes(b"stand-in weights")
    return path


def test_weights_whose_digest_is_not_the_published_one_are_refused(weights, tmp_path):
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not digest.startswith(rfid.INCEPTION_SHA256_PREFIX)
    with pytest.raises(WeightsError) as raised:
        ReconstructionFID(weights, torch.device("cpu"), network=PooledPixels)
    message = str(raised.value)
    assert "\n" not in message and str(weights) in message and "does not begin with 6726825d" in message
    with pytest.raises(WeightsError, match=f"its SHA-256 is {digest}, not the --fid-weights-sha256 abc"):
        ReconstructionFID(weights, torch.device("cpu"), "abc", network=PooledPixels)
    with pytest.raises(WeightsError, match="no such file"):
        ReconstructionFID(tmp_path / "missing.pth", torch.device("cpu"), network=PooledPixels)


def test_nothing_can_be_downloaded_while_the_network_is_built(weights):
    def downloading_network(path):
        torch.hub.load_state_dict_from_url("http://127.0.0.1:9/inception.pth")  # refused before any connection

    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="tried to download"):
        ReconstructionFID(weights, torch.device("cpu"), digest, network=downloading_network)
    assert torch.hub.load_state_dict_from_url.__name__ == "load_state_dict_from_url"  # restored


def test_without_torch_fidelity_the_error_says_what_to_install(weights):
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed")
    except ImportError:
        pass
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(WeightsError, match="pip install torch-fidelity"):
        ReconstructionFID(weights, torch.device("cpu"), digest)


def test_evaluate_reports_the_frechet_distance_of_images_and_reconstructions(run, photos, weights, monkeypatch,
                                                                               capsys):
    monkeypatch.setattr(rfid, "inception_network", PooledPixels)
    out, _ = run
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    capsys.readouterr()
    evaluate_main(["--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu", "--batch-size", "4",
                   "--fid-weights", str(weights), "--fid-weights-sha256", digest])
    printed = json.loads(capsys.readouterr().out)
    assert printed["rfid_weights_sha256"] == digest

    images, reconstructions = folder_test_reconstructions(out, photos)
    features = PooledPixels()
    expected = frechet_distance(features(to_uint8(images)).double().numpy(),
                                features(to_uint8(reconstructions)).double().numpy())
    assert printed["test_rfid"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
