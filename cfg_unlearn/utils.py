"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


#: suffix of the temp files ``atomic_open`` writes next to their target (``.<name>.<random>.tmp``)
TMP_SUFFIX = ".tmp"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a rename: fsync the directory entry (POSIX; a no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                fsync: bool = True) -> Iterator[IO]:
    """Write ``path`` so that readers see the old file or the new one, never half of one:
    yield a temp file (``.<name>.<random>.tmp``) in the same directory; on a clean exit
    flush, fsync, rename it onto ``path`` and fsync the directory; on any exception
    (KeyboardInterrupt included) remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """``data`` to ``path`` through :func:`atomic_open` (text as UTF-8)."""
    binary = isinstance(data, bytes)
    with atomic_open(path, "wb" if binary else "w", encoding=None if binary else "utf-8") as fh:
        fh.write(data)
