"""A one-epoch run on a folder of real photographs (one of them broken, skipped), shared by the
folder-training and rFID tests as module-scoped fixtures (photos, run), and its test images with
their reconstructions."""

from __future__ import annotations

from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch

import gmvq_ext
from gmvq_ext.cli.train import main as train_main
from gmvq_ext.data import DataSource
from image_folders import make_photo_folder

TINY = ["--dataset", "folder", "--image-size", "32", "--downsampling", "8", "--quantizer", "gmvq",
        "--codebook-size", "32", "--dim", "8", "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0",
        "--lr", "1e-3", "--seed", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("own-images"))


def folder_test_images(photos) -> torch.Tensor:
    """The test split of the run's folder (the broken file skipped), as the run reads it."""
    datasets, _ = DataSource("folder", str(photos), image_size=32, skip_bad_images=True).open(("test",),
                                                                                            progress=False)
    return torch.stack([datasets["test"][i] for i in range(len(datasets["test"]))])


def folder_test_reconstructions(out, photos) -> tuple[torch.Tensor, torch.Tensor]:
    """(test images, the run's evaluation reconstructions of them)."""
    images = folder_test_images(photos)
    with torch.no_grad():
        return images, gmvq_ext.Tokenizer.from_checkpoint(out / "checkpoint.pt", device="cpu").model(images)[0]


@pytest.fixture(scope="module")
def run(photos, tmp_path_factory):
    """One epoch with --skip-bad-images; (run folder, what it printed)."""
    out = tmp_path_factory.mktemp("runs") / "photos"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the module-scoped fixture runs before the per-test one
    printed = StringIO()
    with redirect_stdout(printed):
        train_main([*TINY, "--data-dir", str(photos), "--skip-bad-images", "--out", str(out)])
    torch.set_num_threads(threads)
    return out, printed.getvalue()
