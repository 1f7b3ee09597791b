"""Files that are either whole or absent after a crash, and stay so after a power loss.

Every durable write in editd goes through here (the edit store, its outbox, the C0 cache, the
canary cache): write a temporary file beside the target, fsync it, rename it over the target,
then fsync the directory, without which the rename itself may be lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """The temporary name a write of `path` uses: `.tmp-` prefixed, so recovery can find it."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def write_plain(path: Path, data: bytes) -> None:
    """Write and fsync `path` in place (for files inside a directory renamed into place later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably: temp, fsync, rename, fsync dir."""
    write_with(path, lambda tmp: write_plain(tmp, data))


def write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` with what `write(tmp)` writes to a temporary path, atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Remove a file or a directory tree; absent is fine. Not fsynced: callers fsync the parent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
