"""What every data set shares: the split names, the error type, pixel
conversions, decoding one image file, and the DataLoader's collate.

Images leave every data set as float32 (3, H, W) with pixels in [-1, 1]."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """A data file or folder is missing, unreadable or not in the expected layout."""


def to_signed_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1]."""
    return images_uint8.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float pixels in [-1, 1] (clamped) -> uint8 in [0, 255]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


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


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """One picture as the folder data set feeds it to a model: its largest
    central square resized to ``size`` x ``size``; uint8 (3, size, size),
    which ``Tokenizer.encode`` takes as it is (add a batch dimension)."""
    return load_image(Path(path), size, crop=None)


def collate_images(batch) -> torch.Tensor:
    """DataLoader collate: a batched fetch already returns a tensor; items are stacked."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)
