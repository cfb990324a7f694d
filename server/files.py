"""Writing files so that a crash leaves the old content or the new, never half of it.

Each file goes to a temporary file beside it (with its final mode from the start, so a secret is never
readable by others), is flushed to disk, and is then renamed over the old one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_files_atomically(files: list[tuple[Path, bytes, int]]) -> None:
    """Write each (path, data, mode): all to temporary files first, then renamed into place.

    The mode is set on the temporary file, so a secret is never readable by others, even for an instant.
    Staging everything before the first rename keeps pairs (a key and its certificate) together on failure.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), mode)  # os.open's mode is filtered by the umask
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    write_files_atomically([(path, text.encode("utf-8"), mode)])
