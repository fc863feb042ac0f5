"""The training step reads nothing from the device: its metrics are summed
there and read every --log-every steps (gmvq_ext/training/step_metrics.py).

On a GPU every read (item, float, tolist, ...) waits for the queued steps, so
a read per step serialises the host with the device. On the CPU the wait
cannot be seen, so the reads are counted: every read of a tensor made by
gmvq_ext's own code (the loop, the quantizers, the op wrappers) during a run.
Two runs that differ only in their number of training steps make the same
reads outside the steps (k-means, evaluation, checkpoints), so the
difference is what the steps read."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import gmvq_ext
from gmvq_ext import train
from helpers import DEVICES, HAS_CUDA, SAMPLE_DATA

DATA = SAMPLE_DATA / "cifar10-sample"
PACKAGE = str(Path(gmvq_ext.__file__).resolve().parent)
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def run_args(device: str, train_images: int, log_every: int, out: Path) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", str(DATA), "--quantizer", "gmvq", "--codebook-size", "32",
            "--dim", "8", "--batch-size", "8", "--max-train-images", str(train_images), "--max-test-images", "16",
            "--epochs", "1", "--log-every", str(log_every), "--seed", "1", "--device", device, "--out", str(out)]


def reads_of_a_run(monkeypatch, argv: list[str]) -> int:
    """How many times gmvq_ext's code read a tensor's value during ``train.main(argv)``."""
    count = [0]

    def counting(method):
        def wrapper(self, *args, **kwargs):
            import sys

            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                count[0] += 1
            return method(self, *args, **kwargs)
        return wrapper

    with monkeypatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
        train.main(argv)
    return count[0]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device", DEVICES)
def test_the_training_step_reads_only_at_the_logging_interval(monkeypatch, tmp_path, device):
    # 8 and 16 steps; no logging point inside the epoch: the extra steps read nothing.
    short = reads_of_a_run(monkeypatch, run_args(device, 64, 1000, tmp_path / "a"))
    long = reads_of_a_run(monkeypatch, run_args(device, 128, 1000, tmp_path / "b"))
    assert long == short, f"the training step reads the device: {long - short} reads in 8 more steps"
    # Logging every 4 steps: one read per logging point (2 and 4 points).
    short = reads_of_a_run(monkeypatch, run_args(device, 64, 4, tmp_path / "c"))
    long = reads_of_a_run(monkeypatch, run_args(device, 128, 4, tmp_path / "d"))
    assert long - short == 2


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_no_synchronisation_in_the_cuda_training_step(tmp_path):
    # CUDA's sync debug mode warns on every host-device synchronisation; the
    # steps between logging points must add none.
    def synchronisations(train_images: int, out: Path) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train.main(run_args("cuda", train_images, 1000, out))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert synchronisations(128, tmp_path / "b") == synchronisations(64, tmp_path / "a")
