"""Write-then-rename helpers: a file appears under its final name only once it is complete.

Temporary files are created with `O_CREAT | O_EXCL` and mode 0o666, so the process umask decides the final
permissions exactly as for a file opened with `open(path, "w")` (typically 0644). `tempfile.mkstemp` would
give 0600, and since the rename keeps the mode, every checkpoint file would end up private to its writer —
unreadable by a serving process running as another user, or by a group sharing a model directory.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def create_temp_file(directory: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new, empty file `directory/prefix<random>suffix` opened for writing -> (fd, path).

    Mode 0o666 minus the umask (what `open(..., "w")` gives), never 0600."""
    directory = Path(directory)
    for _ in range(100):
        path = directory / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: could not create a temporary file named {prefix}*{suffix}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = create_temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
