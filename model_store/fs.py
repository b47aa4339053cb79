"""The one file-system layer of model_store: durable writes and cross-process locks.

Every file model_store writes goes through here, so a crash or a power cut never leaves one
half-written:

* :func:`write_atomic` / :func:`atomic_path`: write a temp file in the target's folder (named
  ``.tmp-<random>``, which every reader ignores and every cleaner removes), fsync it,
  ``os.replace`` it onto the target, fsync the folder. Linux ``fsync(2)``: syncing a file does
  not sync the directory entry that names it, hence :func:`fsync_dir`.
* :func:`publish_dir`: the same for a whole folder written under a temp name (a model version):
  every file and folder fsynced, one rename, the parent fsynced.
* :func:`file_lock`: an exclusive lock on a lock file, shared by threads and processes
  (``filelock.FileLock``, i.e. ``fcntl.flock`` on Unix; released by the kernel if the process dies).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = [
    "DISK_FULL_ERRNOS",
    "TMP_PREFIX",
    "LockHeld",
    "atomic_path",
    "file_lock",
    "fsync_dir",
    "fsync_file",
    "publish_dir",
    "write_atomic",
]

TMP_PREFIX = ".tmp-"
"""Every temp file or folder starts with this; readers skip such names, cleaners remove them."""

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
"""errno values meaning the disk (or the user's quota) is full."""

LockHeld = Timeout
"""Raised by :func:`file_lock` with ``blocking=False`` when another holder has the lock."""


def temp_name(suffix: str = "") -> str:
    """A fresh temp file name: ``.tmp-<16 hex digits><suffix>``."""
    return f"{TMP_PREFIX}{secrets.token_hex(8)}{suffix}"


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so the names created, renamed or removed in it survive a power cut.

    Raises:
        OSError: the directory cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path | str) -> None:
    """fsync one file's content (opened read-only).

    Raises:
        OSError: the file cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes, *, mode: int = 0o600) -> Path:
    """Write ``data`` to ``path`` durably: temp file in the same folder, write, fsync the file,
    ``os.replace`` it into place, fsync the folder. A crash leaves the old or the new content.

    Args:
        path: the target file; its folder must exist.
        data: the bytes to write.
        mode: permission bits of a newly created file (before the umask).

    Returns:
        ``path`` (as a Path).

    Raises:
        OSError: the write failed (e.g. ENOSPC); the temp file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    tmp = path.parent / temp_name()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: Path | str, *, suffix: str = "", mode: int = 0o600) -> Iterator[Path]:
    """For writers that need a file name (e.g. ``Figure.savefig``): yield a new, empty temp file
    next to ``path``; when the block ends without error the temp file is fsynced, ``os.replace``-d onto
    ``path`` and the folder fsynced. On error the temp file is removed and ``path`` is unchanged.

    Args:
        path: the target file; its folder must exist.
        suffix: ending of the temp name (e.g. ``".png"``, for writers that look at it).
        mode: permission bits of the temp file, created empty before the block (before the umask).

    Raises:
        OSError: the temp file could not be synced or renamed (it is removed).
    """
    path = Path(path)
    tmp = path.parent / temp_name(suffix)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def publish_dir(temp_dir: Path | str, final: Path | str) -> Path:
    """Make a fully written temp folder visible under its final name, durable before visible.

    Every file, then every folder inside ``temp_dir`` (deepest first, ``temp_dir`` itself last) is
    fsynced, then ``temp_dir`` is renamed to ``final`` and the parent folder fsynced: after a power
    cut ``final`` is either absent or complete.

    Returns:
        ``final`` (as a Path).

    Raises:
        OSError: a sync or the rename failed (``temp_dir`` is left for the caller to remove).
    """
    temp_dir, final = Path(temp_dir), Path(final)
    folders = [temp_dir]
    for p in temp_dir.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            folders.append(p)
        elif p.is_file():
            fsync_file(p)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        fsync_dir(folder)
    os.rename(temp_dir, final)
    fsync_dir(final.parent)
    return final


def file_lock(path: Path | str, *, blocking: bool = True) -> FileLock:
    """An exclusive lock on ``path`` (created if missing, never deleted); use it as ``with file_lock(p):``.

    Exclusive across processes and across threads (each call makes its own lock; ``flock`` locks of
    two open files conflict even within one process). Not reentrant: callers that nest take a
    ``threading.RLock`` around it (``ImageStore``).

    Args:
        path: the lock file.
        blocking: wait for the lock (True) or raise :data:`LockHeld` at once if it is held.

    Returns:
        An unacquired ``filelock.FileLock``; entering it (or ``acquire()``) raises
        :data:`LockHeld` when ``blocking=False`` and another holder has the lock, ``OSError`` when
        the lock file cannot be created or opened.
    """
    return FileLock(path, timeout=-1 if blocking else 0)
