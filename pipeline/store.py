"""The index directory on disk: written whole to a temporary folder, then renamed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.discover import Failure, ImageRecord
from pipeline.errors import IndexDirError, IndexLocked
from pipeline.index import read_index, write_index

INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.jsonl"
META_FILE = "meta.json"
FAILURES_FILE = "failures.jsonl"
FORMAT_VERSION = 1


@dataclass
class StoredIndex:
    """An index directory read back: manifest rows are in id order of insertion."""

    path: Path
    meta: dict[str, Any]
    manifest: list[ImageRecord]
    failures: list[Failure]
    # The files behind non-transient failures, as they were when they failed.
    failed_records: dict[str, ImageRecord] = field(default_factory=dict)
    _index: Any = None

    @property
    def index(self):
        if self._index is None:
            self._index = read_index(str(self.path / INDEX_FILE))
        return self._index

    def paths_by_id(self) -> dict[int, str]:
        return {r.id: r.path for r in self.manifest}


def is_index_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_index_dir(path: str | os.PathLike) -> StoredIndex:
    """Read an index directory's metadata, manifest and failures (index lazily).

    Raises
    ------
    IndexDirError
        If ``path`` is not a complete, readable index directory.
    """
    p = Path(path)
    if not p.is_dir():
        raise IndexDirError(f"index directory {str(p)!r} does not exist")
    try:
        meta = json.loads((p / META_FILE).read_text())
        manifest = [
            ImageRecord(row["path"], row["size"], row["mtime_ns"])
            for row in _read_jsonl(p / MANIFEST_FILE)
        ]
        rows = list(_read_jsonl(p / FAILURES_FILE))
        failures = [
            Failure(r["path"], r["reason"], r.get("transient", False)) for r in rows
        ]
        failed_records = {
            r["path"]: ImageRecord(r["path"], r["size"], r["mtime_ns"])
            for r in rows
            if "size" in r and not r.get("transient", False)
        }
    except FileNotFoundError as e:
        raise IndexDirError(
            f"{str(p)!r} is not an imgindex index directory "
            f"(missing {Path(e.filename).name})"
        ) from None
    except (OSError, ValueError, KeyError) as e:
        raise IndexDirError(f"index directory {str(p)!r} is unreadable: {e}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise IndexDirError(
            f"index directory {str(p)!r} has format {meta.get('format')!r}; "
            "this imgindex "
            f"reads format {FORMAT_VERSION}: rebuild it with `imgindex build --rebuild`"
        )
    return StoredIndex(p, meta, manifest, failures, failed_records)


def write_index_dir(
    dest: str | os.PathLike,
    index,
    manifest: list[ImageRecord],
    meta: dict[str, Any],
    failures: list[Failure],
    failed_records: dict[str, ImageRecord] | None = None,
) -> Path:
    """Write a complete index directory at ``dest``, replacing any old one whole.

    Everything is written and fsynced in a sibling temporary folder, which is
    then renamed into place, so a crash leaves either the old index or the new
    one, never a mixture.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write_index(index, str(tmp / INDEX_FILE))
        _write_jsonl(
            tmp / MANIFEST_FILE,
            (
                {"id": r.id, "path": r.path, "size": r.size, "mtime_ns": r.mtime_ns}
                for r in manifest
            ),
        )
        _write_jsonl(
            tmp / FAILURES_FILE,
            (_failure_row(f, (failed_records or {}).get(f.path)) for f in failures),
        )
        (tmp / META_FILE).write_text(
            json.dumps({**meta, "format": FORMAT_VERSION}, indent=2)
        )
        for name in (INDEX_FILE, MANIFEST_FILE, FAILURES_FILE, META_FILE):
            _fsync(tmp / name)
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _failure_row(failure: Failure, record: ImageRecord | None) -> dict:
    row: dict[str, Any] = {"path": failure.path, "reason": failure.reason}
    if failure.transient:
        row["transient"] = True
    if record is not None:
        row.update(size=record.size, mtime_ns=record.mtime_ns)
    return row


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
    else:
        # A directory cannot be atomically replaced by rename(2); park the old
        # one beside it so that it is only deleted once the new one is in place.
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / "index")
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old / "index", dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync(dest.parent)


@contextlib.contextmanager
def lock_index(dest: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the index at ``dest`` for the duration of a build.

    The lock is an flock on ``.<name>.lock`` beside the index, so the kernel
    drops it if the build dies.

    Raises
    ------
    IndexLocked
        If another build holds it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _read_holder(fd)
                raise IndexLocked(
                    f"another build ({holder}) is writing the index {str(dest)!r}; "
                    "wait for it to finish"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        yield
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace") or "unknown process"
    except OSError:
        return "unknown process"


def _read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _write_jsonl(path: Path, rows) -> None:
    # ensure_ascii keeps undecodable file names (surrogate escapes) round-trippable.
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path``; on success fsync it and rename it over."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_array_file(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically (temporary file, fsync, rename)."""
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
