"""Splits of a data set by name: the entry point the training loop, the
evaluation and the tokenizing commands share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torch.utils.data import Dataset

from .celeba import ImageFolder
from .cifar10 import Cifar10
from .folder import BadImage, FolderImages, FolderIndex

DATASETS = ("cifar10", "celeba", "folder")
IMAGE_SIZE = {"cifar10": 32, "celeba": 128}  # fixed by the data set; a folder's is --image-size


def build_dataset(dataset: str, data_dir: str | os.PathLike, split: str, val_fraction: float = 0.0,
                  max_images: Optional[int] = None) -> Dataset:
    """The ``split`` of CIFAR-10 or CelebA under ``data_dir``; the first
    ``max_images`` when given (a folder of images: ``DataSource``)."""
    if dataset == "cifar10":
        data = Cifar10(data_dir, split, val_fraction=val_fraction)
    elif dataset == "celeba":
        data = ImageFolder(data_dir, split, size=IMAGE_SIZE["celeba"])
    elif dataset == "folder":
        raise ValueError("a folder of images needs its image size: use DataSource('folder', ...).open(split)")
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    return first_images(data, max_images)


def first_images(data: Dataset, max_images: Optional[int]) -> Dataset:
    """``data`` cut to its first ``max_images`` (None: all of it)."""
    if max_images is not None and max_images < len(data):
        data = torch.utils.data.Subset(data, range(max_images))
    return data


@dataclass
class DataSource:
    """What a run trains on: the data flags of ``gmvq-train``."""
    dataset: str
    data_dir: str
    val_fraction: float = 0.0
    image_size: Optional[int] = None  # folder only
    split_file: Optional[str] = None  # folder only
    skip_bad_images: bool = False  # folder only

    @classmethod
    def of_run(cls, args, data_dir: Optional[str] = None) -> "DataSource":
        """The source a run's arguments (a Namespace or vars() of one, from a
        checkpoint of any version) describe; ``data_dir`` replaces theirs."""
        get = args.get if isinstance(args, dict) else (lambda name, default=None: getattr(args, name, default))
        return cls(get("dataset"), data_dir or get("data_dir"), get("val_fraction", 0.0) or 0.0,
                   get("image_size"), get("split_file"), bool(get("skip_bad_images", False)))

    def open(self, splits: tuple[str, ...], progress: bool = True,
             known_bad: Optional[list[BadImage]] = None) -> tuple[dict[str, Dataset], list[BadImage]]:
        """({split: data set} for ``splits``, the unreadable files left out).

        A folder's files of those splits are checked first (``FolderIndex.check``)
        unless ``known_bad`` holds the result of a check made elsewhere (rank 0's)."""
        if self.dataset != "folder":
            return {split: build_dataset(self.dataset, self.data_dir, split, self.val_fraction)
                    for split in splits}, []
        if known_bad is None:
            bad = self.index.check(splits, self.skip_bad_images, progress)
        else:
            bad = known_bad
            self.index.drop(bad)
        return {split: FolderImages(self.index, split, self.image_size) for split in splits}, bad

    def check(self, splits: tuple[str, ...], progress: bool = True) -> list[BadImage]:
        """The unreadable files of a folder's ``splits`` (a DataError without
        --skip-bad-images); nothing for the other data sets."""
        if self.dataset != "folder":
            return []
        return self.index.check(splits, self.skip_bad_images, progress)

    def has_split(self, split: str) -> bool:
        """Whether a folder's index gives ``split`` any file (no file is opened)."""
        return self.dataset != "folder" or bool(self.index.names(split))

    @cached_property
    def index(self) -> FolderIndex:
        """A folder's files and their splits, listed once (a check drops the unreadable ones from it)."""
        return FolderIndex(self.data_dir, self.split_file)
