"""Writing files so that a crash leaves the old content or the new, never half of it.

Every file that must survive a crash (checkpoints, results, score caches, banks, certificates and keys, the
coordinator's progress) is written here: into a temporary file beside it, flushed and fsynced, renamed over the
old one, and then the folder is fsynced so the rename itself is on disk. Without the file fsync a crash after the
rename can leave an empty file under the final name; without the folder fsync the rename may be lost.

The helper lives in `cancermoe` (which imports no Flower and no MLflow) because the science needs it too
(training checkpoints, DPS score caches, banks); the federation packages import it from here.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this writer (process and call), on the same file system."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new name in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` over ``path``: fsync the file, rename, fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_folder(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to (with torch.save, h5py, savefig, ...).

    Leaving the block normally moves it into place durably; an exception removes it and leaves ``path`` as it
    was. With ``mode`` the temporary file is created with that mode first, so a secret is never readable by
    others, even for an instant (writers that open the path again keep the mode); without, the writer creates it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        if mode is not None:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))
            os.chmod(tmp, mode)  # os.open's mode is filtered by the umask
        yield tmp
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_files_atomically(files: list[tuple[Path, bytes, int]]) -> None:
    """Write each (path, data, mode): all to temporary files first, then renamed into place.

    The mode is set on the temporary file, so a secret is never readable by others, even for an instant.
    Staging everything before the first rename keeps pairs (a key and its certificate) together on failure.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            tmp = temporary_path(Path(path))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            staged.append((tmp, Path(path)))
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), mode)  # os.open's mode is filtered by the umask
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
        for folder in {path.parent for _, path in staged}:
            fsync_folder(folder)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    write_files_atomically([(Path(path), data, mode)])
    return Path(path)


def write_text_atomically(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> Path:
    write_files_atomically([(Path(path), text.encode("utf-8"), mode)])
    return Path(path)
