"""``--download``: fetch CIFAR-10 when it is missing; explain how to get CelebA.

CIFAR-10: when ``DATA_DIR`` (or its ``cifar-10-batches-py/`` child) already
holds batch files they are used as they are, complete or not (partial batches
are valid data; no checksum of the files is demanded). Otherwise the official
archive is fetched with ``torch.hub.download_url_to_file`` (progress bar on
stderr) into a temporary folder inside ``DATA_DIR``, its MD5 checked, extracted
there, and its ``cifar-10-batches-py/`` renamed into place: one atomic rename,
so ``DATA_DIR`` ends with the complete folder or with nothing new (on any
failure the temporary folder is removed, and so is ``DATA_DIR`` when this call
created it).

Overrides (tests, mirrors): the ``url`` and ``md5`` arguments, else the
environment variables ``GMVQ_CIFAR10_URL`` and ``GMVQ_CIFAR10_MD5``, else the
official values below.

CelebA's files are shared through Google Drive and Baidu links on the
authors' page, which a plain URL cannot fetch: ``--download`` uses a CelebA
already in place and otherwise stops with ``celeba_instructions``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
from contextlib import contextmanager
from pathlib import Path

from .data import CELEBA_FOLDER, CELEBA_PARTITION_FILE, CIFAR_FOLDER, DataError, find_celeba_folder, \
    find_cifar10_folder

# Published by the data set's authors, https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_URL_ENV = "GMVQ_CIFAR10_URL"
CIFAR10_MD5_ENV = "GMVQ_CIFAR10_MD5"
# urlopen (inside torch.hub) waits forever on a silent server; this bounds each connect and read.
NETWORK_TIMEOUT_S = 60.0
CELEBA_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


class DownloadError(DataError):
    """A download failed: network, checksum or archive. Nothing half-written is left behind."""


def ensure_dataset(dataset: str, data_dir: str | os.PathLike, progress: bool = True) -> None:
    """Make ``dataset`` available under ``data_dir`` (see the module docstring)."""
    if dataset == "cifar10":
        ensure_cifar10(data_dir, progress=progress)
    elif dataset == "celeba":
        ensure_celeba(data_dir)
    else:
        raise ValueError(f"--download: unknown dataset {dataset!r}")


# ----------------------------------------------------------------------------- CIFAR-10

def ensure_cifar10(data_dir: str | os.PathLike, url: str | None = None, md5: str | None = None,
                   progress: bool = True, timeout: float = NETWORK_TIMEOUT_S) -> Path:
    """The ``cifar-10-batches-py`` folder under ``data_dir``, downloaded first
    when no batch files are there. Raises DownloadError (a DataError)."""
    root = Path(data_dir)
    if root.is_dir():
        try:
            return find_cifar10_folder(root)
        except DataError:
            pass  # no batches yet: download them
    elif root.exists():
        raise DownloadError(f"--data-dir {str(root)!r} is a file, not a folder")
    target = root / CIFAR_FOLDER
    if target.exists():
        raise DownloadError(f"{str(target)!r} exists but holds no CIFAR-10 batch files; remove or fix it "
                            "(--download never overwrites a folder)")
    url = url or os.environ.get(CIFAR10_URL_ENV) or CIFAR10_URL
    md5 = (md5 or os.environ.get(CIFAR10_MD5_ENV) or CIFAR10_MD5).lower()

    if not hasattr(tarfile, "data_filter"):  # checked before fetching 170 MB that could not be extracted
        raise DownloadError("extracting a downloaded archive safely needs tarfile's extraction filters "
                            "(Python 3.10.12+, 3.11.4+ or 3.12+)")
    created = missing_ancestors(root)
    root.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=".cifar10-download-", dir=root))
    try:
        archive = workspace / "cifar-10-python.tar.gz"
        print(f"downloading CIFAR-10 from {url} into {str(root)!r}", file=sys.stderr)
        fetch(url, archive, progress, timeout)
        digest = file_md5(archive)
        if digest != md5:
            raise DownloadError(f"the file downloaded from {url} has MD5 {digest}, expected {md5}: damaged or not "
                                "the CIFAR-10 archive; nothing was kept")
        extracted = workspace / "extracted"
        extract(archive, extracted, url)
        try:
            find_cifar10_folder(extracted / CIFAR_FOLDER)
        except DataError:
            raise DownloadError(f"the archive from {url} holds no {CIFAR_FOLDER}/ folder of batch files; "
                                "nothing was kept") from None
        try:
            os.rename(extracted / CIFAR_FOLDER, target)
        except OSError:
            if not target.is_dir():
                raise DownloadError(f"cannot move the extracted batches to {str(target)!r}") from None
            # else another process (e.g. a torchrun rank on another node, same folder) finished first
    except BaseException:
        shutil.rmtree(workspace, ignore_errors=True)
        for folder in created:  # innermost first; only the folders this call made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(workspace, ignore_errors=True)
    return find_cifar10_folder(target)


def missing_ancestors(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist, innermost first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


@contextmanager
def socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch(url: str, destination: Path, progress: bool, timeout: float) -> None:
    """torch.hub's downloader (it removes its partial file on failure), with a timeout."""
    from torch.hub import download_url_to_file

    try:
        with socket_timeout(timeout):
            download_url_to_file(url, str(destination), progress=progress)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"cannot download CIFAR-10 from {url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(f"cannot download CIFAR-10 from {url}: {error.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as error:  # timeouts, resets, bad URLs
        raise DownloadError(f"cannot download CIFAR-10 from {url}: {type(error).__name__}: {error}") from None


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check against the published sum
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract(archive: Path, destination: Path, url: str) -> None:
    """Extract with tarfile's "data" filter: regular files and folders only,
    nothing outside ``destination`` (no absolute paths, .., or links out)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(destination, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DownloadError(f"cannot extract the archive from {url}: {type(error).__name__}: {error}; "
                            "nothing was kept") from None


# ----------------------------------------------------------------------------- CelebA

def celeba_instructions(data_dir: str | os.PathLike = "./data") -> str:
    """How to get CelebA by hand and where to put it (also README text)."""
    return (
        f"CelebA cannot be downloaded automatically: its authors share it through Google Drive and Baidu links "
        f"that need a browser (and acceptance of its non-commercial research terms). To install it by hand:\n"
        f"  1. open {CELEBA_PAGE} and follow its Google Drive (or Baidu) link;\n"
        f"  2. download Img/{CELEBA_FOLDER}.zip (\"Align&Cropped Images\", about 1.4 GB, 202,599 JPEGs) and "
        f"Eval/{CELEBA_PARTITION_FILE} (the official train/valid/test split);\n"
        f"  3. unzip {CELEBA_FOLDER}.zip -d {data_dir} and move {CELEBA_PARTITION_FILE} into {data_dir}, so that\n"
        f"       {data_dir}/{CELEBA_FOLDER}/000001.jpg ... 202599.jpg\n"
        f"       {data_dir}/{CELEBA_PARTITION_FILE}\n"
        f"  then pass --data-dir {data_dir} (torchvision's {data_dir}/celeba/{CELEBA_FOLDER}/ layout works too).")


def ensure_celeba(data_dir: str | os.PathLike) -> None:
    """Nothing to do when CelebA is in place; otherwise a DataError with the instructions."""
    try:
        find_celeba_folder(data_dir)
    except DataError:
        raise DataError("--download: " + celeba_instructions(data_dir)) from None
