"""Crash-safe writes: temporary sibling, fsync, rename; modes that honour the umask."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (for writers that open files
    themselves: FAISS, ONNX Runtime); on success it is fsynced and renamed
    over ``path``, on failure removed. Its name is unique to this process
    and call: threads, and processes on other hosts, may write ``path`` too."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path``; on success fsync it and rename it over."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def save_array_file(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically (temporary file, fsync, rename)."""
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would, racily)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_dir_mode(parent: Path) -> int:
    """The mode ``mkdir`` would give a folder in ``parent``: umask and setgid honoured.

    A group project folder (umask 002, setgid) must stay writable by the group;
    ``mkdtemp`` makes 0700 folders, so staging folders are chmod-ed to this.
    """
    mode = 0o777 & ~current_umask()
    try:
        if os.stat(parent).st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID
    except OSError:
        pass
    return mode


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a few renames that belong together.

    Only the main thread can block them for the process; elsewhere this is a
    no-op (the renames are recoverable anyway, see store.recover_index_dir).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
