"""One build per index at a time: an flock, or a lock file where flock is missing."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from imgindex.pipeline.errors import IndexLocked

# flock is unsupported on some cluster file systems (Lustre mounted without
# -o flock, old NFS): these errnos mean "no locking here", not "locked".
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def lock_index(dest: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the index at ``dest`` for the duration of a build.

    The lock is an flock on ``.<name>.lock`` beside the index, so the kernel
    drops it if the build dies. Where the file system has no flock, an
    ``O_EXCL`` lock file ``.<name>.lock.held`` is used instead; one left by a
    dead process on this host is recognised as stale and taken over.

    Raises
    ------
    IndexLocked
        If another build holds it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    # 0666: the umask decides, so a group-writable project folder stays shared.
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _NO_FLOCK:
                os.close(fd)
                fd = -1
                with _exclusive_file(
                    lock_path.with_name(lock_path.name + ".held"), dest
                ):
                    yield
                return
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise IndexLocked(_locked_message(_read(fd), dest)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, holder_text().encode())
        try:
            yield
        finally:
            # Still held: the file names its holder only while it holds it
            # (last_writer), though this process goes on (a service, a
            # notebook).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        if fd >= 0:
            os.close(fd)


def last_writer(dest: str | os.PathLike) -> tuple[str, bool] | None:
    """Who holds the lock on the index at ``dest`` ("pid N on HOST"), and
    whether that is known (a process of this host, seen running) or only
    may be (another host's); None: nobody, or a process of this host that
    has ended. Reads only: takes no lock, so a build that starts meanwhile
    is never refused."""
    dest = Path(dest)
    lock_path = dest.parent / f".{dest.name}.lock"
    for path in (lock_path.with_name(lock_path.name + ".held"), lock_path):
        holder = _read_path(path).strip()
        parts = _holder_parts(holder)
        if parts and not _is_stale(holder):
            return holder, _here(parts)
    return None


def _holder_parts(holder: str) -> list[str] | None:
    """``holder`` split, where it reads "pid N on HOST" as holder_text writes."""
    parts = holder.split()
    whole = len(parts) == 4 and parts[0] == "pid" and parts[2] == "on"
    return parts if whole else None


def _here(parts: list[str]) -> bool:
    """Whether the holder "pid N on HOST", split, is of this host."""
    return parts[3] == socket.gethostname()


def _locked_message(holder: str, dest: Path) -> str:
    return (
        f"another build ({holder or 'unknown process'}) is writing the index "
        f"{str(dest)!r}; wait for it to finish"
    )


@contextlib.contextmanager
def _exclusive_file(path: Path, dest: Path) -> Iterator[None]:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            holder = _read_path(path)
            if not _is_stale(holder):
                raise IndexLocked(
                    _locked_message(holder, dest)
                    + f" (or remove {str(path)!r} if no build is running)"
                ) from None
            path.unlink(missing_ok=True)
    else:
        raise IndexLocked(_locked_message(_read_path(path), dest))
    try:
        os.write(fd, holder_text().encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def _is_stale(holder: str) -> bool:
    """A lock left by a process of this host that no longer runs."""
    parts = _holder_parts(holder)
    if parts is None or not _here(parts):
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace")
    except OSError:
        return ""


def _read_path(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[:200]
    except OSError:
        return ""
