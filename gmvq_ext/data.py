"""CIFAR-10 and CelebA loaders for the official on-disk layouts.

Every dataset returns float32 images (3, H, W) with pixels in [-1, 1].

CIFAR-10 (``cifar-10-batches-py/``): the pickled batches are read with
``pickle.load(f, encoding="bytes")``; the row count N is read from each
``b"data"`` array (never assumed to be 10000), ``data_batch_1..5`` form the
training set and ``test_batch`` the test set. The whole split is preloaded
into one uint8 tensor (50000 images are 150 MiB) and converted per batch.

CelebA (``img_align_celeba/``) and any folder of images: decoded lazily with
Pillow in ``__getitem__`` (DataLoader workers parallelise the JPEG decoding;
the full 200k-image set as float tensors would not fit in memory, and a uint8
cache would cost 10 GiB). Each image is centre-cropped and resized to
128x128 with bicubic filtering. Aligned CelebA (178x218) is cropped to the
central 140x140 square, the crop most VAE papers use for 128x128 CelebA
(it keeps the face and drops most of the background); other folders (such
as face crops of varying size) are cropped to their largest central square.
Splits come from ``list_eval_partition.txt`` (0 train, 1 valid, 2 test;
CRLF tolerant) when it lies beside or inside the image folder; otherwise
(and for any folder not named ``img_align_celeba``) the images, sorted by
filename, are split 80/10/10 into train/valid/test,
the same proportions and the same ordering rule as the official partition
(which splits the sorted filenames into 162770/19867/19962).

Validation: CelebA has an official validation split. CIFAR-10 has none, so
``split="val"`` holds out a deterministic ``val_fraction`` of the training
images (a fixed permutation independent of the training seed) and
``split="train"`` excludes them. Tuning must use "val", never "test".
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("cifar10", "celeba")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
CELEBA_FOLDER = "img_align_celeba"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_ALIGNED_CROP = 140
IMAGE_SIZE = {"cifar10": 32, "celeba": 128}
# The permutation that chooses CIFAR-10's held-out validation images; fixed so
# the split never depends on the training seed.
VALIDATION_SPLIT_SEED = 20241014


class DataError(RuntimeError):
    """A data file or folder is missing, unreadable or not in the expected layout."""


def to_signed_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1]."""
    return images_uint8.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float pixels in [-1, 1] (clamped) -> uint8 in [0, 255]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


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


# ----------------------------------------------------------------------------- CIFAR-10

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


# ----------------------------------------------------------------------------- CelebA / image folders

def list_images(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES))


def find_celeba_folder(data_dir: str | os.PathLike) -> tuple[Path, Optional[Path], bool]:
    """(image folder, partition file or None, aligned layout?) for ``data_dir``.

    Accepted: a folder holding ``img_align_celeba/`` (or ``celeba/img_align_celeba/``,
    torchvision's layout), ``img_align_celeba/`` itself, or any folder of images."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"CelebA data directory {str(root)!r} does not exist")
    for images in (root / CELEBA_FOLDER, root / "celeba" / CELEBA_FOLDER):
        if images.is_dir():
            return images, _partition_file(images), True
    if not list_images(root):
        raise DataError(f"no images under {str(root)!r}: expected {CELEBA_FOLDER}/ (official aligned CelebA) "
                        f"or a folder of {'/'.join(IMAGE_SUFFIXES)} files")
    if root.name == CELEBA_FOLDER:
        return root, _partition_file(root), True
    # Any other folder is split by sorted filename even when a partition file
    # lies nearby: its images need not follow the aligned set's numbering.
    return root, None, False


def _partition_file(images: Path) -> Optional[Path]:
    for candidate in (images.parent / CELEBA_PARTITION_FILE, images / CELEBA_PARTITION_FILE):
        if candidate.is_file():
            return candidate
    return None


def read_partition_file(path: Path) -> dict[str, int]:
    """``list_eval_partition.txt`` -> {filename: 0 train | 1 valid | 2 test}; CRLF tolerant."""
    partition = {}
    try:
        text = path.read_text(encoding="ascii")
    except Exception as error:
        raise DataError(f"cannot read CelebA partition file {str(path)!r}: {error}") from error
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"CelebA partition file {str(path)!r} line {line_number} is {line!r}; "
                            "expected '<filename> <0|1|2>'")
        partition[fields[0]] = int(fields[1])
    return partition


def split_by_sorted_name(names: list[str], split: str) -> list[str]:
    """80/10/10 train/valid/test of the sorted names, like CelebA's official partition."""
    n = len(names)
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    start, stop = bounds[split]
    return names[start:stop]


def load_image(path: Path, size: int, crop: Optional[int]) -> torch.Tensor:
    """Decode, centre-crop (``crop`` square, or the largest square when None),
    resize to ``size`` x ``size``; uint8 (3, size, size)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except Exception as error:
        raise DataError(f"cannot read image {str(path)!r}: {type(error).__name__}: {error}") from error
    width, height = image.size
    side = min(width, height) if crop is None else min(crop, width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """CelebA (official aligned layout) or any folder of images, decoded lazily."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", size: int = 128,
                 crop: Optional[int] = "auto"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        folder, partition_file, aligned = find_celeba_folder(data_dir)
        names = list_images(folder)
        if partition_file is not None:
            wanted = SPLITS.index(split)
            partition = read_partition_file(partition_file)
            names = [name for name in names if partition.get(name) == wanted]
            how = f"{partition_file.name}"
        else:
            names = split_by_sorted_name(names, split)
            how = "80/10/10 split of the sorted filenames"
        if not names:
            raise DataError(f"no {split} images in {str(folder)!r} (split by {how})")
        self.folder = folder
        self.names = names
        self.size = size
        self.crop = (CELEBA_ALIGNED_CROP if aligned else None) if crop == "auto" else crop
        self.split = split
        self.source = str(folder)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_signed_unit(load_image(self.folder / self.names[index], self.size, self.crop))


# ----------------------------------------------------------------------------- entry point

def build_dataset(dataset: str, data_dir: str | os.PathLike, split: str, val_fraction: float = 0.0,
                  max_images: Optional[int] = None) -> Dataset:
    """The ``split`` of ``dataset`` under ``data_dir``; the first ``max_images`` when given."""
    if dataset == "cifar10":
        data = Cifar10(data_dir, split, val_fraction=val_fraction)
    elif dataset == "celeba":
        data = ImageFolder(data_dir, split, size=IMAGE_SIZE["celeba"])
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if max_images is not None and max_images < len(data):
        data = torch.utils.data.Subset(data, range(max_images))
    return data


def collate_images(batch) -> torch.Tensor:
    """DataLoader collate: a batched fetch already returns a tensor; items are stacked."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)
