"""Writing files so that a crash, a full disk or a failing device never
leaves a torn file: the one way every file of this package is written
(checkpoints, results, code maps, pictures, exported models)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


class WriteError(OSError):
    """Writing a file failed; the message names the file and the cause. The
    file's previous version, if any, is intact, and no temporary file is left."""

    def __str__(self) -> str:
        return self.strerror


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write; on success it
    is fsynced and renamed to ``path`` (the folder's entry fsynced too), on
    any error it is removed and the error becomes a WriteError naming ``path``.
    The new file gets the permissions of an ordinary new file (0666 less the
    umask), not mkstemp's private 0600."""
    path = Path(path)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(temporary_name)
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        os.close(handle)
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            cause = error.strerror or str(error)
            raise WriteError(error.errno, f"cannot write {str(path)!r}: {cause}") from error
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` on a temporary binary file beside ``path``, then the
    rename of ``atomic_path``."""
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        write(f)
        f.flush()


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON (values it cannot encode as strings), atomically."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is; some file systems refuse to open a folder.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
