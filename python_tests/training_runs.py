"""Small training runs for the trainer's tests: the flags of a seconds-long CIFAR-10 sample run
(SMALL), the trainer's command line in a fresh process (run_cli), a run's weights, a checkpoint state
shaped as the trainer writes it, without training (small_state), and ranks launched as processes
(torchrun, start, finish, wait_for)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gmvq_ext.training import checkpoint as ckpt
from gmvq_ext.training.config import build_model, parse_args, quantizer_options
from helpers import PACKAGE_PARENT, SAMPLE_DATA, subprocess_env

DATA = SAMPLE_DATA / "cifar10-sample"

SMALL = ["--dataset", "cifar10", "--data-dir", str(DATA), "--quantizer", "gmvq", "--codebook-size", "64",
         "--dim", "16", "--batch-size", "32", "--max-train-images", "96", "--max-test-images", "64",
         "--lr", "1e-3", "--warmup-epochs", "1", "--gamma", "0.1", "--seed", "3", "--device", "cpu"]


def without_gamma() -> list[str]:
    """SMALL minus its GM-VQ-only --gamma option."""
    at = SMALL.index("--gamma")
    return SMALL[:at] + SMALL[at + 2:]


def run_cli(*argv, env=None, module=("-m", "gmvq_ext.train")):
    environment = subprocess_env(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *module, *argv], cwd=PACKAGE_PARENT, env=environment, capture_output=True,
                          text=True, timeout=600)


def load_weights(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def small_state(**changes) -> dict:
    """A checkpoint state shaped exactly as train.py writes it, without training."""
    args = parse_args([*SMALL, "--epochs", "1", "--out", "unused"])
    options = quantizer_options(args)
    model = build_model(args, options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": 1, "step": 3, "train_seconds": 0.5, "rng": [ckpt.rng_state()], "args": vars(args),
             "quantizer_options": options, "world_size": 1}
    state.update(changes)
    return state


def torchrun(*argv: str) -> list[str]:
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [launcher, *argv]


def start(command: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=PACKAGE_PARENT, env=subprocess_env(OMP_NUM_THREADS="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a stuck test can kill the whole group


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"still running after {timeout} s; stderr:\n{err[-3000:]}")
    return process.returncode, out, err


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {path.name} appeared:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)
