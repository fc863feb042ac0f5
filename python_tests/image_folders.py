"""Folders of real images (the shared CelebA sample) for the folder data set's
tests: nested, in JPEG, PNG and WebP, with a broken file where asked."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from helpers import SAMPLE_DATA

CROPS = SAMPLE_DATA / "celeba-sample" / "test_crops"
ALIGNED = SAMPLE_DATA / "celeba-sample" / "img_align_celeba"
BROKEN = "people/2020/broken.jpg"


def make_photo_folder(root: Path, broken: bool = True, crops: int = 64) -> Path:
    """``root`` filled with ``crops`` real face crops spread over nested
    folders (JPEG as they are; every 8th as PNG, every 8th + 1 as WebP), the
    32 aligned faces in another branch (named .JPG), and with ``broken`` a file named .jpg
    that holds no picture. Also a hidden file and a text file, which the
    listing must ignore. Returns ``root``."""
    sources = sorted(CROPS.glob("*.jpg"))[:crops]
    for i, source in enumerate(sources):
        folder = root / "people" / ("2019" if i % 2 else "2020") / ("indoor" if i % 3 else "outdoor")
        folder.mkdir(parents=True, exist_ok=True)
        if i % 8 == 0:
            with Image.open(source) as image:
                image.save(folder / f"{source.stem}.png")
        elif i % 8 == 1:
            with Image.open(source) as image:
                image.save(folder / f"{source.stem}.webp", quality=90)
        else:
            shutil.copy(source, folder / source.name)
    aligned = root / "aligned"
    aligned.mkdir(parents=True, exist_ok=True)
    for source in sorted(ALIGNED.glob("*.jpg")):
        shutil.copy(source, aligned / source.name.upper())  # suffixes in any case
    (root / "aligned" / "notes.txt").write_text("not an image\n")
    (root / "people" / ".hidden.jpg").write_bytes(b"a hidden file, never listed")
    if broken:
        (root / BROKEN).parent.mkdir(parents=True, exist_ok=True)
        (root / BROKEN).write_bytes(b"\xff\xd8 this is not a JPEG after all")
    return root
