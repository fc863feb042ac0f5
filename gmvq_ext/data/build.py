"""One split of a data set by name: the entry point the training loop, the
evaluation and the tokenizing commands share."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.data import Dataset

from .celeba import ImageFolder
from .cifar10 import Cifar10

DATASETS = ("cifar10", "celeba")
IMAGE_SIZE = {"cifar10": 32, "celeba": 128}


def build_dataset(dataset: str, data_dir: str | os.PathLike, split: str, val_fraction: float = 0.0,
                  max_images: Optional[int] = None) -> Dataset:
    """The ``split`` of ``dataset`` under ``data_dir``; the first ``max_images`` when given."""
    if dataset == "cifar10":
        data = Cifar10(data_dir, split, val_fraction=val_fraction)
    elif dataset == "celeba":
        data = ImageFolder(data_dir, split, size=IMAGE_SIZE["celeba"])
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    return first_images(data, max_images)


def first_images(data: Dataset, max_images: Optional[int]) -> Dataset:
    """``data`` cut to its first ``max_images`` (None: all of it)."""
    if max_images is not None and max_images < len(data):
        data = torch.utils.data.Subset(data, range(max_images))
    return data
