"""Replacing the live cache: readers keep their mapping of the old file, so it
is never edited or truncated; a new file is renamed over it and the old one is
flagged `superseded` (docs/cache-format.md) so readers look at the path again
without a stat() per lookup."""
from __future__ import annotations

import os
import stat
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from step_ssh.cache.format import CACHE_MODE, MAGIC, SUPERSEDED_OFFSET
from step_ssh.fsutil import atomic_write


def open_current(path: Path) -> Optional[int]:
    """A write descriptor on the cache now at `path`, if it is one of ours."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode) or os.pread(fd, len(MAGIC), 0) != MAGIC:
        os.close(fd)
        return None
    return fd


def mark_superseded(fd: int) -> None:
    """Tell readers still mapping the old file to look at the path again (see
    `superseded` in docs/cache-format.md); saves them a stat() per lookup."""
    try:
        os.pwrite(fd, struct.pack("=I", 1), SUPERSEDED_OFFSET)
    finally:
        os.close(fd)


@contextmanager
def superseding(path: str | Path) -> Iterator[None]:
    """Around the replacement of the cache at `path`: afterwards the file it
    replaced is flagged superseded. When the block fails, it is flagged only
    if the new file is in place all the same (the rename happened, a later
    fsync failed); otherwise it is left as it was."""
    path = Path(path)
    old = open_current(path)
    try:
        yield
    except BaseException:
        if old is not None:
            try:
                replaced = os.stat(path).st_ino != os.fstat(old).st_ino
            except OSError:
                replaced = False
            if replaced:
                mark_superseded(old)
            else:
                os.close(old)
        raise
    if old is not None:
        mark_superseded(old)


def publish_bytes(data: bytes, path: str | Path, mode: int = CACHE_MODE) -> None:
    """Replace the cache atomically (see fsutil.atomic_write), then flag the
    file it replaced as superseded."""
    with superseding(path):
        atomic_write(path, data, mode)


def retire(path: str | Path) -> bool:
    """Remove the cache (deactivate --purge), flagging it for current readers."""
    old = open_current(Path(path))
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    finally:
        if old is not None:
            mark_superseded(old)
    return True
