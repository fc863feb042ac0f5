"""Any folder of JPEG, PNG or WebP images, subfolders included (``--dataset folder``).

Listing: every file under the folder whose name ends in .jpg, .jpeg, .png or
.webp (any case), in subfolders too, named by its path relative to the
folder with "/" separators, in sorted order. Hidden files and folders (a
leading dot: macOS's "._x.jpg" resource forks, .git) are left out.

Split: each file's split is a pure function of its relative path: the first
8 bytes of SHA-256(path as UTF-8), read as a number u in [0, 1), give train
for u < 0.8, val for u < 0.9 and test otherwise. Adding, removing or
renaming other files moves no file between splits, and the split is the same
on every machine. A split file (``--split-file``) overrides it: one
"<relative path> <train|val|test>" a line (blank lines and "#" comments
allowed); then only the files it names are used, and a named file that is
missing is an error.

Checking: before a run trains, every file of its splits is checked (a
progress bar on stderr, threads reading files in parallel): its header must
say JPEG, PNG or WebP with a non-empty size, and its data must read to the
end, by the cheapest pass that does so: JPEG decoded at 1/8 scale (Pillow's
draft mode), PNG's chunk checksums verified, WebP decoded. A file that fails
is named in a one-line DataError, or with ``--skip-bad-images`` left out and
reported (``FolderIndex.check``). A run therefore cannot stop at step 200 on
file 10,000; only a file changed after the check can still fail, and its
error names it.

Pixels: each image's largest central square, resized to S x S (bicubic),
as float32 in [-1, 1] (``common.load_image``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch.utils.data import Dataset

from .common import SPLITS, DataError, load_image, to_signed_unit

FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FOLDER_FORMATS = ("JPEG", "PNG", "WEBP")  # what Pillow's header reading must find
# The upper bounds of u = the path hash in [0, 1) for each split: 80/10/10.
SPLIT_BOUNDS = (("train", 0.8), ("val", 0.9), ("test", 1.0))
CHECK_THREADS = 8  # file reads overlap; Pillow's decoders release the GIL
BAD_NAMED_IN_ERROR = 3  # how many unreadable files a one-line error names


@dataclass(frozen=True)
class BadImage:
    """A file that failed the check: its path relative to the folder, and why."""
    path: str
    reason: str


def list_folder_images(root: Path) -> list[str]:
    """Relative "/"-separated paths of the image files under ``root``, sorted."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = Path(folder).relative_to(root)
        found += [(relative / name).as_posix() for name in files
                  if not name.startswith(".") and name.lower().endswith(FOLDER_SUFFIXES)]
    return sorted(found)


def hash_split(relative_path: str) -> str:
    """The split of a file named by its relative path (see the module docstring)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return next(split for split, bound in SPLIT_BOUNDS if u < bound)


def read_split_file(path: Path) -> dict[str, str]:
    """{relative path: split} from a split file; DataError naming the file and line when malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read split file {str(path)!r}: {error}") from None
    splits = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, split = line.rpartition(" ")  # the path may hold spaces; the split is the last word
        name = name.strip()
        if not name or split not in SPLITS:
            raise DataError(f"split file {str(path)!r} line {number} is {line!r}; expected "
                            "'<relative path> <train|val|test>'")
        splits[Path(name).as_posix()] = split
    return splits


def image_problem(path: Path) -> Optional[str]:
    """Why the file at ``path`` cannot be trained on, or None (see the module docstring)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format not in FOLDER_FORMATS:
                return f"a {image.format} file, not JPEG, PNG or WebP"
            width, height = image.size
            if width < 1 or height < 1:
                return f"an empty picture ({width} x {height})"
            if image.format == "PNG":
                image.verify()  # every chunk's checksum, without decompressing
            else:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{type(error).__name__}: {str(error).replace(f' {str(path)!r}', '')}"  # the path is named apart
    return None


def check_images(root: Path, names: list[str], progress: bool = True) -> list[BadImage]:
    """The files among ``names`` that fail ``image_problem``, in ``names``' order."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        problems = pool.map(lambda name: image_problem(root / name), names)
        problems = list(tqdm(problems, total=len(names), desc=f"checking images in {root.name or root}",
                             unit="file", disable=not progress, file=sys.stderr, leave=False, mininterval=1.0))
    return [BadImage(name, problem) for name, problem in zip(names, problems) if problem is not None]


class FolderIndex:
    """The image files of a folder and the split of each (no file opened yet)."""

    def __init__(self, data_dir: str | os.PathLike, split_file: Optional[str | os.PathLike] = None):
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"image folder {str(root)!r} does not exist")
        names = list_folder_images(root)
        if not names:
            raise DataError(f"no images under {str(root)!r}: expected {', '.join(FOLDER_SUFFIXES)} files "
                            "(subfolders included)")
        if split_file is None:
            self.split_of = {name: hash_split(name) for name in names}
            self.how = "the hash of each file's path"
        else:
            self.split_of = read_split_file(Path(split_file))
            missing = sorted(set(self.split_of) - set(names))
            if missing:
                raise DataError(f"split file {str(split_file)!r} names {len(missing)} image(s) not under "
                                f"{str(root)!r}, e.g. {missing[0]!r}")
            self.how = f"split file {str(split_file)!r}"
        self.root = root
        self.unlisted = len(names) - len(self.split_of)  # images a split file leaves out

    def names(self, split: str) -> list[str]:
        return sorted(name for name, its_split in self.split_of.items() if its_split == split)

    def check(self, splits: Iterable[str], skip_bad: bool, progress: bool = True) -> list[BadImage]:
        """Check every file of ``splits``. Unreadable files raise a one-line
        DataError naming them, or with ``skip_bad`` are dropped from the index
        and returned."""
        names = sorted(name for split in splits for name in self.names(split))
        bad = check_images(self.root, names, progress)
        if bad and not skip_bad:
            more = (f" (and {len(bad) - 1} more: "
                    + ", ".join(repr(b.path) for b in bad[1:BAD_NAMED_IN_ERROR + 1])
                    + (", ..." if len(bad) > BAD_NAMED_IN_ERROR + 1 else "") + ")") if len(bad) > 1 else ""
            raise DataError(f"unreadable image {str(self.root / bad[0].path)!r}: {bad[0].reason}{more}; "
                            f"{len(bad)} of {len(names)} files failed the check; remove them or pass "
                            "--skip-bad-images to train without them")
        self.drop(bad)
        return bad

    def drop(self, bad: Iterable[BadImage]) -> None:
        """Leave out files found unreadable (by this process or by rank 0's check)."""
        for image in bad:
            self.split_of.pop(image.path, None)


class FolderImages(Dataset):
    """One split of a ``FolderIndex``, decoded lazily at ``size`` x ``size``."""

    def __init__(self, index: FolderIndex, split: str, size: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.names = index.names(split)
        if not self.names:
            raise DataError(f"no {split} images in {str(index.root)!r} (split by {index.how}; "
                            f"{len(index.split_of)} usable images in all)")
        self.folder = index.root
        self.size = size
        self.split = split
        self.source = str(index.root)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_signed_unit(load_image(self.folder / self.names[index], self.size, crop=None))
