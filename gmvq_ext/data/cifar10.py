"""CIFAR-10 in its official python layout (``cifar-10-batches-py/``).

The pickled batches are read with ``pickle.load(f, encoding="bytes")``; the
row count N is read from each ``b"data"`` array (never assumed to be 10000),
``data_batch_1..5`` form the training set and ``test_batch`` the test set. The
whole split is preloaded into one uint8 tensor (50000 images are 150 MiB) and
converted per batch.

Validation: CIFAR-10 has none, so ``split="val"`` holds out a deterministic
``val_fraction`` of the training images (a fixed permutation independent of
the training seed) and ``split="train"`` excludes them. Tuning must use
"val", never "test".
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import SPLITS, DataError, to_signed_unit

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
# The permutation that chooses CIFAR-10's held-out validation images; fixed so
# the split never depends on the training seed.
VALIDATION_SPLIT_SEED = 20241014


def validation_indices(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors, both sorted: a deterministic ``val_fraction``
    of ``range(n)`` is held out for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED))
    val = order[:n_val].sort().values
    train = order[n_val:].sort().values
    return train, val


def find_cifar10_folder(data_dir: str | os.PathLike) -> Path:
    """The ``cifar-10-batches-py`` folder: ``data_dir`` itself or its child."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"CIFAR-10 data directory {str(root)!r} does not exist")
    for candidate in (root / CIFAR_FOLDER, root):
        if (candidate / CIFAR_TEST_FILES[0]).exists() or (candidate / CIFAR_TRAIN_FILES[0]).exists():
            return candidate
    raise DataError(
        f"no CIFAR-10 batches under {str(root)!r}: expected {CIFAR_FOLDER}/data_batch_1 ... test_batch "
        f"(the official python version), either in that folder or in its {CIFAR_FOLDER}/ child")


def read_cifar10_batch(path: Path) -> torch.Tensor:
    """One official batch file -> uint8 tensor (N, 3, 32, 32); N read from the array."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch file {str(path)!r} is missing")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"])
    except Exception as error:  # pickle raises many types on a damaged file
        raise DataError(f"cannot read CIFAR-10 batch file {str(path)!r}: {type(error).__name__}: {error}") from error
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch file {str(path)!r} holds b'data' of dtype {data.dtype} and shape "
                        f"{data.shape}; expected uint8 (N, 3072)")
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32)


class Cifar10(Dataset):
    """A CIFAR-10 split preloaded as uint8 (N, 3, 32, 32)."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", val_fraction: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        folder = find_cifar10_folder(data_dir)
        files = CIFAR_TEST_FILES if split == "test" else CIFAR_TRAIN_FILES
        images = torch.cat([read_cifar10_batch(folder / name) for name in files])
        if split != "test":
            train, val = validation_indices(len(images), val_fraction)
            images = images[val if split == "val" else train]
        self.images = images
        self.split = split
        self.source = str(folder)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_signed_unit(self.images[index])

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        # Batched fetch (used by DataLoader): one gather and one conversion.
        return to_signed_unit(self.images[torch.as_tensor(indices, dtype=torch.long)])
