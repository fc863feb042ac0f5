"""CelebA (``img_align_celeba/``) and folders of face crops, decoded lazily.

Images are decoded with Pillow in ``__getitem__`` (DataLoader workers
parallelise the JPEG decoding; the full 200k-image set as float tensors would
not fit in memory, and a uint8 cache would cost 10 GiB). Each image is
centre-cropped and resized to 128x128 with bicubic filtering. Aligned CelebA
(178x218) is cropped to the central 140x140 square, the crop most VAE papers
use for 128x128 CelebA (it keeps the face and drops most of the background);
other folders (such as face crops of varying size) are cropped to their
largest central square. Splits come from ``list_eval_partition.txt`` (0
train, 1 valid, 2 test; CRLF tolerant) when it lies beside or inside the
image folder; otherwise (and for any folder not named ``img_align_celeba``)
the images, sorted by filename, are split 80/10/10 into train/valid/test, the
same proportions and the same ordering rule as the official partition (which
splits the sorted filenames into 162770/19867/19962). Any other folder of
images, subfolders included, is ``--dataset folder`` (folder.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from .common import SPLITS, DataError, load_image, to_signed_unit

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CELEBA_FOLDER = "img_align_celeba"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_ALIGNED_CROP = 140


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
