"""Crash-safe file writes with explicit modes."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def replacing(path: str | Path, mode: int = 0o644, dir_mode: int = 0o755, *,
              durable: bool = True) -> Iterator[BinaryIO]:
    """Write a new version of `path` through the yielded binary file: a temp
    file in the same directory with an explicit mode, renamed over `path` when
    the block ends (removed instead if it raises). `durable` fsyncs the file
    before the rename and the directory after it, so a crash at any point
    leaves either the old file or the new one, never a mix; without it (files
    on a tmpfs, rebuilt after a restart) readers still never see half a file."""
    path = Path(path)
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write(path: str | Path, data: bytes | str, mode: int = 0o644, dir_mode: int = 0o755) -> None:
    """Replace `path` atomically and durably (see `replacing`)."""
    with replacing(path, mode, dir_mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)
