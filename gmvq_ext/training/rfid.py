"""rFID, opt-in: the Fréchet Inception Distance between a split's images and
their reconstructions, from Inception weights in a local file. Nothing is
ever downloaded.

    gmvq-evaluate --checkpoint run/checkpoint.pt --fid-weights weights-inception-2015-12-05-6726825d.pth

The network and the distance are torchmetrics' FrechetInceptionDistance
(2048 pool features of torch-fidelity's port of TensorFlow's 2015
Inception-v3, the network the FID literature uses; images as uint8, resized
to 299 inside), given the weights file through its
``feature_extractor_weights_path``. Needs ``pip install torch-fidelity``
and a torchvision built for the installed torch (torch-fidelity imports it;
an unpinned torchvision from PyPI brings another torch), which this
project's machines do not have: only the checks below are tested here.

The weights: torch-fidelity publishes them as
weights-inception-2015-12-05-6726825d.pth (its v0.2.0 release); fetch the
file once where a network exists. Its SHA-256 is checked before anything is
built: it must begin with 6726825d, the digest prefix its publisher put in
the name (torch.hub's check_hash convention; the full digest is not
published), or equal ``--fid-weights-sha256`` when given. A file that fails
is a one-line error naming it. While the network is built, torch.hub's
download functions raise, so a library that tried to fetch anything would
stop the command instead.

LPIPS is not offered: its maintained implementations (torchmetrics'
LearnedPerceptualImagePatchSimilarity, the lpips package) ship only LPIPS's
linear layers and take the AlexNet/VGG backbone from torchvision's
download, with no way to give them a local file; writing the backbone by
hand is what this project does not do.

rFID runs in one process (gmvq-evaluate refuses it under torchrun): the
feature sums of several ranks would be added in another order than one
process adds them.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Callable, Optional

import torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"
FEATURES = 2048


class WeightsError(ValueError):
    """A weights file for a reference network is missing, is not the expected one, or cannot be used."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checked_weights(path: str | Path, expected_sha256: Optional[str] = None) -> tuple[Path, str]:
    """(the file, its SHA-256) when it is the Inception weights FID needs; WeightsError naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--fid-weights {str(path)!r}: no such file (torch-fidelity's {INCEPTION_FILE}, "
                           "fetched once where a network exists)")
    digest = sha256_of(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise WeightsError(f"--fid-weights {str(path)!r}: its SHA-256 is {digest}, not the "
                           f"--fid-weights-sha256 {expected_sha256}")
    if expected_sha256 is None and not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise WeightsError(f"--fid-weights {str(path)!r}: its SHA-256 {digest[:16]}... does not begin with "
                           f"{INCEPTION_SHA256_PREFIX}, the digest prefix torch-fidelity publishes for "
                           f"{INCEPTION_FILE}; refused (another network's FID is not comparable)")
    return path, digest


@contextlib.contextmanager
def no_downloads():
    """torch.hub's download functions raise inside (FID must never fetch anything)."""
    def refuse(*args, **kwargs):
        raise WeightsError("a library tried to download weights; rFID uses only the local --fid-weights file")

    saved = torch.hub.download_url_to_file, torch.hub.load_state_dict_from_url
    torch.hub.download_url_to_file = torch.hub.load_state_dict_from_url = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file, torch.hub.load_state_dict_from_url = saved


def inception_network(weights: Path) -> torch.nn.Module:
    """torchmetrics' Inception-v3 (torch-fidelity's port) with ``weights``: uint8 images -> 2048 features."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as error:
        raise WeightsError(f"rFID needs torchmetrics' image extras: pip install torch-fidelity (with a torchvision "
                           f"built for your torch): {error}") from None
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURES)],
                                  feature_extractor_weights_path=str(weights))
    except ModuleNotFoundError as error:
        raise WeightsError(f"rFID needs torch-fidelity: pip install torch-fidelity (with a torchvision built for "
                           f"your torch): {error}") from None


class ReconstructionFID:
    """Accumulates Inception features of images and their reconstructions batch by batch; ``compute`` gives rFID."""

    def __init__(self, weights: str | Path, device: torch.device, expected_sha256: Optional[str] = None,
                 network: Optional[Callable[[Path], torch.nn.Module]] = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.weights, self.sha256 = checked_weights(weights, expected_sha256)
        with no_downloads():
            extractor = (network or inception_network)(self.weights)
            self.metric = FrechetInceptionDistance(feature=extractor, normalize=False).to(device)

    def update(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """One batch of images and reconstructions, pixels in [-1, 1] (reconstructions clamped), as uint8."""
        from ..data import to_uint8

        self.metric.update(to_uint8(images), real=True)
        self.metric.update(to_uint8(reconstructions), real=False)

    def compute(self) -> float:
        return float(self.metric.compute())
