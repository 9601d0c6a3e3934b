"""The index directory on disk: written whole to a staging folder, then swapped in.

Beside ``OUT/<name>/`` imgindex keeps only names it owns:

- ``.<name>.tmp-XXXX/`` a version being written (holds a ``STAGING`` marker);
- ``.<name>.new/``      a complete version waiting to be swapped in;
- ``.<name>.old/``      the previous version while the swap runs.

A swap is two renames (index -> .old, .new -> index). A crash or signal
between them leaves a state :func:`recover_index_dir` completes (roll forward
to ``.new``) or undoes (roll back to ``.old``); builds call it under the
index lock, and readers use whichever complete version is there.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from imgindex.pipeline.atomic import fsync_path, shared_dir_mode, signals_deferred
from imgindex.pipeline.copies import COPIES_FILE, Copies
from imgindex.pipeline.discover import Failure, ImageRecord
from imgindex.pipeline.errors import IndexDirError, IndexLocked
from imgindex.pipeline.index import (
    check_index_file,
    index_ids,
    read_index,
    read_index_at,
    write_index,
)
from imgindex.pipeline.lock import lock_index
from imgindex.pipeline.manifest_ids import (
    IDS_FILE,
    ManifestLookup,
    ManifestWriter,
    damaged_manifest,
    ids_path,
    jsonl_line,
    read_rows,
)
from imgindex.pipeline.meta import IndexMeta
from imgindex.pipeline.textspans import lines_in_span

INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.jsonl"
META_FILE = "meta.json"
FAILURES_FILE = "failures.jsonl"
INDEX_FILES = (INDEX_FILE, MANIFEST_FILE, FAILURES_FILE, META_FILE)
IVFDATA_FILE = "index.ivfdata"  # an on-disk index's inverted lists (mapped)
SHARDS_DIR = "shards"  # the embeddings, one .npz per partition (pipeline/shards.py)
# `imgindex duplicates --save`: the report of this version (pipeline/saved_report.py)
DUPLICATES_FILE = "duplicates.json"
# IDS_FILE: the manifest's ids and line lengths (pipeline/manifest_ids.py);
# versions before 0.5 wrote none, and are scanned instead.
OPTIONAL = {IVFDATA_FILE, SHARDS_DIR, DUPLICATES_FILE, COPIES_FILE, IDS_FILE}
STAGING_MARK = "STAGING"


@dataclass
class StoredIndex:
    """An index directory read back: manifest rows are in id order of insertion.

    All its files were opened together, so they belong to one version even if
    a build swaps in a newer one meanwhile; the FAISS index is read lazily
    from the handle opened then.
    """

    path: Path
    meta: IndexMeta
    manifest: list[ImageRecord]
    failures: list[Failure]
    # The files behind non-transient failures, as they were when they failed.
    failed_records: dict[str, ImageRecord] = field(default_factory=dict)
    _index_file: BinaryIO | None = None
    _index: Any = None
    # An on-disk index is read by path (FAISS maps index.ivfdata itself): a
    # handle on the version's directory, read through /proc/self/fd.
    _dir_fd: int | None = None
    # Images whose vector is another's, stored once by a graph index
    copies: Copies = field(default_factory=Copies)
    # A file list's other columns, by path (the manifest rows' "meta").
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The manifest was left on disk: records() streams it (see read_index_dir).
    streamed: bool = False
    # The directory the version was read from (``path`` unless mid-swap).
    version: Path | None = None
    # by_id: the version's manifest and ids file, kept open for lookup()
    _manifest_file: BinaryIO | None = None
    _ids_file: BinaryIO | None = None
    _lookup: ManifestLookup | None = None

    def records(self) -> Iterator[ImageRecord]:
        """The manifest's records: those read, or streamed from the file
        where they were left there (``streamed``; the caller holds the
        index's lock, so no build swaps the version under it).

        Raises
        ------
        IndexDirError
            If the streamed manifest is malformed or disagrees with meta.json.
        """
        if not self.streamed:
            yield from self.manifest
            return
        count = 0
        for record in iter_manifest(self.folder):
            count += 1
            yield record
        self.check_count(count)

    @property
    def folder(self) -> Path:
        """The directory the version was read from."""
        return self.version or self.path

    def check_count(self, count: int) -> None:
        """Raise IndexDirError unless the manifest's ``count`` rows are
        meta.json's."""
        if count != self.meta.count:
            raise IndexDirError(miscounted(self.path, self.meta.count, count))

    @property
    def index(self):
        """The FAISS index, checked against meta.json and the manifest.

        Raises
        ------
        IndexDirError
            If the file is damaged or holds other ids than the manifest lists.
        """
        if self._index is None:
            f = self._index_file
            assert f is not None, "index file handle already consumed"
            try:
                self._index = _read_checked_index(self.path, f, self.meta, self._dir_fd)
            finally:
                f.close()
                self._index_file = None
                self._close_index_handles()
            _check_ids(self.path, self._index, self._listed_ids, self.copies)
        return self._index

    def lookup(self) -> ManifestLookup:
        """The manifest's rows by id, read from this version's manifest when
        asked (only for a directory read with ``by_id=True``).

        Raises
        ------
        IndexDirError
            If the manifest or its ids file is malformed or miscounted.
        """
        if self._lookup is None:
            manifest = self._manifest_file
            assert manifest is not None, "read the index directory with by_id=True"
            try:
                label = str(self.path)
                if self._ids_file is None:  # written before imgindex 0.5
                    found = ManifestLookup.scanned(manifest, label)
                else:
                    found = ManifestLookup.from_ids(manifest, self._ids_file, label)
            except (ValueError, KeyError, TypeError) as e:
                raise IndexDirError(damaged_manifest(self.path, e)) from None
            except OSError as e:
                raise IndexDirError(_unreadable(self.path, e)) from None
            finally:
                self._close_manifest_files()
            self.check_count(len(found))
            self._lookup = found
        return self._lookup

    def _listed_ids(self) -> np.ndarray:
        """Every id the manifest lists, unsorted."""
        if self._lookup is not None or self._manifest_file is not None:
            return self.lookup().ids
        if not self.streamed:
            return np.fromiter((r.id for r in self.manifest), np.int64)
        # A build's, which holds the lock: the files are read by path.
        try:
            with (
                open(self.folder / MANIFEST_FILE, "rb") as manifest,
                open(self.folder / IDS_FILE, "rb") as ids_file,
            ):
                ids = read_rows(manifest, ids_file)["id"]
        except FileNotFoundError:  # written before imgindex 0.5
            return np.fromiter((r.id for r in self.records()), np.int64)
        except ValueError as e:
            raise IndexDirError(damaged_manifest(self.path, e)) from None
        except OSError as e:
            raise IndexDirError(_unreadable(self.path, e)) from None
        self.check_count(len(ids))
        return ids

    def __enter__(self) -> StoredIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the handles still open: an unread index file, the directory
        of an on-disk index, the manifest a lookup reads (idempotent; neither
        the index nor the lookup can be read after)."""
        self._close_index_handles()
        self._close_manifest_files()
        if self._lookup is not None:
            self._lookup.close()

    def _close_manifest_files(self) -> None:
        for f in (self._manifest_file, self._ids_file):
            if f is not None:
                f.close()
        self._manifest_file = self._ids_file = None

    def _close_index_handles(self) -> None:
        if self._index_file is not None:
            self._index_file.close()
            self._index_file = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def check(self) -> None:
        """Check index.faiss against meta.json without reading it whole.

        Raises
        ------
        IndexDirError
            If it is truncated or its headers disagree with meta.json.
        """
        problem = self.problem()
        if problem:
            raise IndexDirError(_damaged(self.path, problem))

    def problem(self) -> str | None:
        """What :meth:`check` finds wrong with index.faiss, or None."""
        if self._index_file is None:
            return None
        return index_problem(self._index_file, self.meta, self._dir_fd)


def index_problem(
    f: BinaryIO, meta: IndexMeta, dir_fd: int | None = None
) -> str | None:
    """Why ``f`` is not a usable index file for ``meta``, or None (cheap: headers)."""
    try:
        extra = 0
        if meta.on_disk:
            if dir_fd is None:
                return f"{IVFDATA_FILE} is missing"
            extra = os.stat(IVFDATA_FILE, dir_fd=dir_fd).st_size
        stored = meta.count - meta.copies
        return check_index_file(f, stored, meta.dim, meta.index_kind, extra)
    except OSError as e:
        return f"unreadable: {e.strerror}"


def _read_checked_index(path: Path, f: BinaryIO, meta: IndexMeta, dir_fd: int | None):
    problem = index_problem(f, meta, dir_fd)
    if problem is None:
        try:
            if meta.on_disk:
                return read_index_at(f"/proc/self/fd/{dir_fd}/{INDEX_FILE}", True)
            return read_index(f)
        except (RuntimeError, OSError) as e:
            problem = " ".join(str(e).split())[-200:]
    raise IndexDirError(_damaged(path, problem))


def _damaged(path: Path, problem: str) -> str:
    return (
        f"{str(path / INDEX_FILE)!r} is damaged ({problem}); rebuild it with "
        "`imgindex build --rebuild`"
    )


def _check_ids(
    path: Path, index, listed_ids: Callable[[], np.ndarray], copies: Copies
) -> None:
    held = index_ids(index)
    if held is None:  # on disk: listing the ids would read the whole file
        return
    held = np.sort(held)
    listed = np.sort(listed_ids())
    problem = copies.check(held, listed)
    if problem:
        raise IndexDirError(_damaged(path, problem))
    answered = np.sort(np.concatenate([held, copies.ids]))
    if len(answered) != len(listed) or not np.array_equal(answered, listed):
        n_missing = len(np.setdiff1d(listed, answered))
        n_extra = len(np.setdiff1d(answered, listed))
        problem = (
            f"its manifest and index.faiss disagree ({n_missing} listed images "
            f"missing from the index, {n_extra} vectors not in the manifest)"
        )
        raise IndexDirError(damaged_manifest(path, problem))


def _unreadable(path: Path | str | os.PathLike, e: Exception) -> str:
    return (
        f"index directory {str(path)!r} is unreadable: {e}; rebuild it with "
        "`imgindex build --rebuild`"
    )


def miscounted(path: str | os.PathLike, counted: int, listed: int) -> str:
    """The one-line error for a manifest that lists another count than
    meta.json's."""
    problem = f"meta.json counts {counted} images, its manifest lists {listed}"
    return damaged_manifest(path, problem)


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Entries of ``path`` that an imgindex index directory would not hold."""
    try:
        return sorted(set(os.listdir(path)) - {*INDEX_FILES, *OPTIONAL})
    except OSError:
        return []


def is_index_dir(path: str | os.PathLike) -> bool:
    """True only for a folder imgindex wrote: its own files, and nothing else.

    A ``meta.json`` alone proves nothing (any project may have one); the
    format marker, the version and the complete set of files do.
    """
    p = Path(path)
    try:
        names = set(os.listdir(p))
        meta = json.loads((p / META_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return (
        names - OPTIONAL == set(INDEX_FILES)
        and (SHARDS_DIR not in names or (p / SHARDS_DIR).is_dir())
        and isinstance(meta, dict)
        and isinstance(meta.get("format"), int)
        and isinstance(meta.get("imgindex_version"), str)
    )


def is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not os.listdir(path)
    except OSError:
        return False


def staging_path(dest: Path, tag: str) -> Path:
    return dest.parent / f".{dest.name}.{tag}"


def read_meta(path: str | os.PathLike) -> IndexMeta:
    """Only ``path``'s meta.json, checked as :func:`read_index_dir` checks it.

    For options to be validated before a long command starts, without
    reading a manifest of millions of rows twice.
    """
    stored = read_index_dir(path, manifest=False)
    stored.close()
    return stored.meta


def _being_built(path: Path) -> str:
    """Why an index may not exist yet: its first build runs (a build writes
    the directory whole when it finishes)."""
    from imgindex.pipeline.lock import last_writer

    found = last_writer(path)
    if found is None:
        return ""
    writer, seen = found
    verb = "is" if seen else "may be"  # another host's cannot be seen from here
    return f" yet: a build ({writer}) {verb} writing it; it appears when that finishes"


def read_index_dir(
    path: str | os.PathLike,
    manifest: bool = True,
    *,
    streamed: bool = False,
    by_id: bool = False,
) -> StoredIndex:
    """Read an index directory's metadata, manifest and failures (index lazily).

    ``manifest=False`` leaves the manifest unread (``.manifest`` is empty;
    :func:`iter_manifest` streams it) and the index file closed.
    ``streamed=True`` leaves the manifest unread too, but the index open:
    :meth:`StoredIndex.records` streams it, for a build of millions of
    images that holds the lock and needs it once or twice, in order.
    ``by_id=True`` leaves it on disk for rows to be found by id
    (:meth:`StoredIndex.lookup`, for searches): its files are kept open, so
    the rows are this version's whatever builds swap in meanwhile.

    If a build was interrupted while swapping versions, the complete version
    beside it is read (and the swap finished when no build holds the lock).

    Raises
    ------
    IndexDirError
        If ``path`` is not a complete, readable, consistent index directory.
    """
    p = Path(path)
    for attempt in range(5):
        last = attempt == 4
        p_read = p if p.is_dir() else _interrupted_version(p)
        try:
            if p_read is None:
                if p.is_file():
                    raise IndexDirError(f"{str(p)!r} is a file, not an index directory")
                if p.exists() or (not last and _recently_swapped(p)):
                    raise FileNotFoundError(errno.ENOENT, "swapped", str(p))
                raise IndexDirError(
                    f"index directory {str(p)!r} does not exist" + _being_built(p)
                )
            return _read_version(p, p_read, manifest, streamed, by_id)
        except FileNotFoundError as e:
            # A build swapped versions between our looks: read the new one.
            if last or not _recently_swapped(p):
                raise IndexDirError(
                    f"{str(p)!r} is not an imgindex index directory "
                    f"(missing {Path(e.filename or '?').name})"
                ) from None
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def _recently_swapped(p: Path) -> bool:
    return p.is_dir() or any(staging_path(p, t).exists() for t in ("new", "old"))


def _interrupted_version(dest: Path) -> Path | None:
    """The complete version to read while ``dest`` is missing mid-swap."""
    if not any(dest.parent.glob(f".{glob.escape(dest.name)}.[no][el][wd]*")):
        return None  # nothing to recover: don't even create a lock file
    try:
        with lock_index(dest):
            recover_index_dir(dest)
        return dest if dest.is_dir() else None
    except IndexLocked:
        pass  # a build is swapping right now: read what it left complete
    except OSError:
        pass  # a read-only folder: we can read, not repair
    for tag in ("new", "old"):
        candidate = staging_path(dest, tag)
        if is_index_dir(candidate):
            return candidate
    return None


def _read_version(
    label: Path,
    p: Path,
    with_manifest: bool = True,
    streamed: bool = False,
    by_id: bool = False,
) -> StoredIndex:
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    handles: dict[str, BinaryIO] = {}

    def opened(name: str) -> None:
        handles[name] = os.fdopen(os.open(name, os.O_RDONLY, dir_fd=fd), "rb")

    try:
        # Open everything first: the handles pin one version of each file.
        for name in INDEX_FILES:
            opened(name)
        optional = (COPIES_FILE, IDS_FILE) if by_id else (COPIES_FILE,)
        for name in optional:
            try:
                opened(name)
            except FileNotFoundError:
                pass
    except BaseException:
        # A file gone (a build swapped versions between our opens): the caller
        # reads again, and what was opened of this version is closed.
        for handle in handles.values():
            handle.close()
        os.close(fd)
        raise
    copies_file = handles.get(COPIES_FILE)
    kept = {INDEX_FILE, MANIFEST_FILE, IDS_FILE} if by_id else {INDEX_FILE}
    try:
        meta = IndexMeta.loads(handles[META_FILE].read(), label / META_FILE)
        copies = _read_copies(label, copies_file, meta) if with_manifest else Copies()
        metadata: dict[str, dict[str, Any]] = {}
        manifest = (
            list(_records(handles[MANIFEST_FILE], metadata))
            if with_manifest and not (streamed or by_id)
            else []
        )
        rows = list(_read_jsonl(handles[FAILURES_FILE]))
        failures = [
            Failure(r["path"], r["reason"], r.get("transient", False)) for r in rows
        ]
        failed_records = {
            r["path"]: ImageRecord(r["path"], r["size"], r["mtime_ns"])
            for r in rows
            if "size" in r and not r.get("transient", False)
        }
    except BaseException as e:
        for handle in handles.values():
            handle.close()
        os.close(fd)
        if isinstance(e, (OSError, ValueError, KeyError, TypeError)):
            raise IndexDirError(_unreadable(label, e)) from None
        raise
    for name, handle in handles.items():
        if name not in kept:
            handle.close()
    if not with_manifest:
        handles[INDEX_FILE].close()
        os.close(fd)
        return StoredIndex(label, meta, [], failures, failed_records)
    if not meta.on_disk:
        os.close(fd)
        fd = None
    if len(manifest) != meta.count and not (streamed or by_id):
        for name in kept & handles.keys():
            handles[name].close()
        if fd is not None:
            os.close(fd)
        raise IndexDirError(miscounted(label, meta.count, len(manifest)))
    return StoredIndex(
        label,
        meta,
        manifest,
        failures,
        failed_records,
        handles[INDEX_FILE],
        None,
        fd,
        copies,
        metadata,
        streamed or by_id,
        p,
        handles.get(MANIFEST_FILE) if by_id else None,
        handles.get(IDS_FILE),
    )


def _read_copies(label: Path, f: BinaryIO | None, meta: IndexMeta) -> Copies:
    if f is None and not meta.copies:
        return Copies()
    if f is None:
        problem = f"meta.json counts {meta.copies} copies and {COPIES_FILE} is missing"
    else:
        try:
            return Copies.read(f, meta.copies, COPIES_FILE)
        except ValueError as e:
            problem = str(e)
    raise IndexDirError(
        f"index {str(label)!r} is damaged ({problem}); rebuild it with "
        "`imgindex build --rebuild`"
    )


def write_index_dir(
    dest: str | os.PathLike,
    index: Any,
    manifest: Iterable[ImageRecord | tuple[ImageRecord, dict[str, Any] | None]]
    | ManifestLines,
    meta: IndexMeta,
    failures: list[Failure],
    failed_records: dict[str, ImageRecord] | None = None,
    shards: Sequence[Path] = (),
    metadata: Mapping[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a complete index directory at ``dest``, replacing any old one whole.

    Everything is written and fsynced in a staging folder, which is then
    swapped into place (see the module docstring), so a crash leaves either
    the old index or the new one, never a mixture. The caller holds the lock.
    ``shards`` are hard-linked into its ``shards/`` (copied where the file
    system has no hard links): the old version keeps its own until removed.
    ``index`` is a FAISS index, or a folder where workers wrote index.faiss
    (and index.ivfdata): those files are moved in. ``metadata`` (path ->
    columns of a file list) goes into the manifest rows as ``"meta"``; or
    ``manifest`` holds (record, its meta) pairs, or is written already
    (:class:`ManifestLines`).

    Raises
    ------
    IndexDirError
        If ``dest`` holds anything imgindex did not write, or the disk is full.
    """
    dest = Path(dest)
    if dest.exists() and not (is_index_dir(dest) or is_empty_dir(dest)):
        raise IndexDirError(
            f"{str(dest)!r} exists and is not an imgindex index; imgindex will not "
            "replace it: choose another --out or --name"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    untouched = "the old index (if any) is untouched, and re-running resumes"
    with _new_version(dest, shared_dir_mode(dest.parent), untouched) as tmp:
        if isinstance(index, Path):
            _move_index_files(index, tmp)
        else:
            write_index(index, tmp / INDEX_FILE)
        if isinstance(manifest, ManifestLines):
            _join_files(tmp / MANIFEST_FILE, manifest.files)
            _join_files(tmp / IDS_FILE, map(ids_path, manifest.files))
        else:
            _write_manifest(tmp / MANIFEST_FILE, manifest, metadata or {})
        _write_jsonl(
            tmp / FAILURES_FILE,
            (_failure_row(f, (failed_records or {}).get(f.path)) for f in failures),
        )
        (tmp / META_FILE).write_text(meta.dumps())
        for name in (*INDEX_FILES, IDS_FILE):
            fsync_path(tmp / name)
        if shards:
            _link_shards(shards, tmp / SHARDS_DIR)
    return dest


def write_meta_version(dest: str | os.PathLike, meta: IndexMeta) -> Path:
    """A new version of the index at ``dest`` that differs from the one in
    place only in its meta.json, swapped in whole as :func:`write_index_dir`
    does. Its other files are hard-linked (copied where the file system has
    no hard links); a saved duplicates report is left out, since it names
    the images as they were. The caller holds the lock.

    Raises
    ------
    IndexDirError
        If it cannot be written (the index in place is untouched then).
    """
    dest = Path(dest)
    mode = stat.S_IMODE(os.stat(dest).st_mode)
    with _new_version(dest, mode, "the old index is untouched") as tmp:
        for name in sorted({*INDEX_FILES, *OPTIONAL} - {META_FILE, DUPLICATES_FILE}):
            if name == SHARDS_DIR and (dest / name).is_dir():
                _link_shards(sorted((dest / name).iterdir()), tmp / name)
            elif (dest / name).is_file():
                _link_file(dest / name, tmp / name)
        (tmp / META_FILE).write_text(meta.dumps())
        fsync_path(tmp / META_FILE)
    return dest


@contextlib.contextmanager
def _new_version(dest: Path, mode: int, untouched: str) -> Iterator[Path]:
    """A staging folder beside ``dest`` to write a whole version of the
    index into; once written it gets ``mode`` and is swapped in for the
    version in place (see the module docstring), else it is removed and an
    OSError becomes one line that ends in ``untouched``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        (tmp / STAGING_MARK).write_bytes(b"")
        yield tmp
        (tmp / STAGING_MARK).unlink()
        os.chmod(tmp, mode)
        new = staging_path(dest, "new")
        os.rename(tmp, new)
    except OSError as e:
        _remove_staging(tmp)
        raise IndexDirError(
            f"could not write the index {str(dest)!r}: {e.strerror or e}; {untouched}"
        ) from None
    except BaseException:
        _remove_staging(tmp)
        raise
    _swap_into_place(new, dest)


# What an index build writes, beside the manifest, shards and meta.json.
BUILT_FILES = (INDEX_FILE, IVFDATA_FILE, COPIES_FILE)


def link_index_files(dest: Path, folder: Path) -> None:
    """The index files of the version in place at ``dest`` in ``folder``
    too (hard links, else copies), for a new version to keep them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in BUILT_FILES:
        if (dest / name).is_file():
            _link_file(dest / name, folder / name)


def _move_index_files(built: Path, tmp: Path) -> None:
    for name in BUILT_FILES:
        if (built / name).exists():
            os.replace(built / name, tmp / name)  # the same file system: beside dest
            fsync_path(tmp / name)


def _link_shards(shards: Sequence[Path], folder: Path) -> None:
    folder.mkdir()
    for shard in shards:
        target = folder / shard.name
        if target.exists():
            continue  # the same content (names are content hashes)
        _link_file(shard, target)
    fsync_path(folder)


def _link_file(path: Path, target: Path) -> None:
    """``path`` at ``target`` too: a hard link, else a copy (some FUSE and
    object stores have no hard links). An index version's files are never
    written again once in place, so versions may share them."""
    try:
        os.link(path, target)
    except OSError:
        shutil.copy2(path, target)
        fsync_path(target)


def _failure_row(failure: Failure, record: ImageRecord | None) -> dict:
    row: dict[str, Any] = {"path": failure.path, "reason": failure.reason}
    if failure.transient:
        row["transient"] = True
    if record is not None:
        row.update(size=record.size, mtime_ns=record.mtime_ns)
    return row


def _swap_into_place(new: Path, dest: Path) -> None:
    old = staging_path(dest, "old")
    with signals_deferred():
        if dest.exists():
            os.rename(dest, old)
        os.rename(new, dest)
        fsync_path(dest.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def recover_index_dir(dest: str | os.PathLike) -> str | None:
    """Finish or undo a swap interrupted at ``dest``; remove stale staging folders.

    The caller holds the index lock. Returns what was done, or None.
    """
    dest = Path(dest)
    new, old = staging_path(dest, "new"), staging_path(dest, "old")
    done = None
    if is_index_dir(new):
        if dest.exists() and is_index_dir(dest):
            if old.exists():
                _remove_index_copy(old)
            os.rename(dest, old)
        if not dest.exists():
            os.rename(new, dest)
            done = "finished an interrupted swap (the newer index is in place)"
    if not dest.exists() and is_index_dir(old):
        os.rename(old, dest)
        done = "undid an interrupted swap (the previous index is back)"
    if dest.exists() and old.exists():
        _remove_index_copy(old)
    done = _recover_legacy(dest) or done
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.tmp-*"):
        if (tmp / STAGING_MARK).exists():
            _remove_staging(tmp)
    if done:
        fsync_path(dest.parent)
    return done


def _recover_legacy(dest: Path) -> str | None:
    """Versions up to 0.1 parked the old index in ``.<name>.old-XXXX/index``."""
    done = None
    name = glob.escape(dest.name)
    for parked in sorted(dest.parent.glob(f".{name}.old-*")):
        inner = parked / "index"
        if os.listdir(parked) != ["index"] or not is_index_dir(inner):
            continue
        if not dest.exists():
            os.rename(inner, dest)
            done = "restored the index an interrupted build had set aside"
        else:
            shutil.rmtree(inner)
        os.rmdir(parked)
    for tmp in dest.parent.glob(f".{name}.tmp-*"):
        try:
            names = set(os.listdir(tmp))
        except OSError:
            continue
        if names <= {*INDEX_FILES, *OPTIONAL}:  # old staging folder: only ours
            shutil.rmtree(tmp, ignore_errors=True)
    return done


def _remove_index_copy(path: Path) -> None:
    """Delete a copy of an index; refuse anything that holds other files."""
    if is_index_dir(path) or (path.is_dir() and not foreign_entries(path)):
        shutil.rmtree(path)


def _remove_staging(tmp: Path) -> None:
    allowed = {*INDEX_FILES, STAGING_MARK, *OPTIONAL}
    if tmp.is_dir() and set(os.listdir(tmp)) <= allowed:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_manifest(
    path: Path,
    manifest: Iterable[ImageRecord | tuple[ImageRecord, dict[str, Any] | None]],
    metadata: Mapping[str, dict[str, Any]],
) -> None:
    with ManifestWriter(path) as writer:
        for item in manifest:
            if isinstance(item, ImageRecord):
                writer.write(item, metadata.get(item.path))
            else:
                writer.write(*item)


@dataclass(frozen=True)
class ManifestLines:
    """A manifest written already, as lines (:class:`ManifestWriter`) in
    ``files`` to be joined in order: by workers, a path range each
    (pipeline/manifest_merge.py)."""

    files: tuple[str, ...]


def read_metadata(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ``"meta"`` of the manifest's rows that have one (a file list's
    other columns), by path.

    Raises
    ------
    IndexDirError
        If the manifest is missing or malformed.
    """
    where = Path(path) / MANIFEST_FILE
    try:
        with open(where, "rb") as f:
            return {row["path"]: row["meta"] for row in _read_jsonl(f) if "meta" in row}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexDirError(_unreadable(path, e)) from None


def iter_manifest(
    path: str | os.PathLike, span: tuple[int, int] | None = None
) -> Iterator[ImageRecord]:
    """Stream ``path``'s manifest, one record at a time (millions need not
    fit): all of it, or the lines that start in the byte range ``span``
    (:func:`pipeline.textspans.lines_in_span`), for tasks that read one
    each.

    For a caller holding the index's lock (no version swap can happen under
    it) that has read the directory with :func:`read_index_dir` first.

    Raises
    ------
    IndexDirError
        If the manifest is missing or a row is malformed.
    """
    where = Path(path) / MANIFEST_FILE
    try:
        with open(where, "rb") as f:
            yield from _records(f if span is None else lines_in_span(f, *span))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexDirError(_unreadable(path, e)) from None


def _records(
    f: Iterable[bytes], metadata: dict[str, dict[str, Any]] | None = None
) -> Iterator[ImageRecord]:
    """The manifest's records; their ``"meta"`` into ``metadata`` if given."""
    for row in _read_jsonl(f):
        if metadata is not None and "meta" in row:
            metadata[row["path"]] = row["meta"]
        yield ImageRecord(row["path"], row["size"], row["mtime_ns"])


def _read_jsonl(f: Iterable[bytes]) -> Iterator[dict]:
    for line in f:
        if line.strip():
            yield json.loads(line)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    _write_lines(path, map(jsonl_line, rows))


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(lines)


def _join_files(path: Path, files: Iterable[str]) -> None:
    """``files`` one after another into ``path``, as bytes: no line is parsed."""
    with path.open("wb") as out:
        for name in files:
            with open(name, "rb") as piece:
                shutil.copyfileobj(piece, out, 1 << 20)
