"""Walk a dataset folder into image records (path, size, mtime); no pixels are read."""

from __future__ import annotations

import bisect
import hashlib
import os
import pickle
import stat
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgindex.pipeline.errors import DatasetError

# HEIF is what phone cameras write (pipeline.decode reads it with pillow-heif,
# the `heif` extra); AVIF Pillow reads itself (11.2 and later).
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    # .jfif: JPEGs as browsers on Windows save them; .jp2: JPEG 2000, as
    # archives and slide scanners keep them (Pillow reads it with OpenJPEG).
    | {".avif", ".jfif", ".jp2"}
    | HEIF_EXTENSIONS
)
_ID_MASK = (1 << 63) - 1


@dataclass(frozen=True, slots=True)  # slots: millions live in the client at once
class ImageRecord:
    """One image file of a dataset; ``path`` is relative to the dataset root."""

    path: str
    size: int
    mtime_ns: int

    @property
    def id(self) -> int:
        return image_id(self.path)


def pack_records(records: Sequence[ImageRecord]) -> bytes:
    """``records`` as one compressed bytes object, as a task carries them.

    A queued task's arguments stay in the scheduler's memory until it runs:
    32 records as objects took 9.5 KiB there, packed 2.4 (bench/dispatch_queue.py).
    """
    return pack_rows([(r.path, r.size, r.mtime_ns) for r in records])


def unpack_records(packed: bytes) -> list[ImageRecord]:
    """The records :func:`pack_records` packed."""
    return [ImageRecord(*row) for row in unpack_rows(packed)]


def pack_rows(rows: Sequence[tuple]) -> bytes:
    """Rows of plain values as one compressed bytes object, as a task
    carries them (or sends them back)."""
    return zlib.compress(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL), 1)


def unpack_rows(packed: bytes) -> list[tuple]:
    """The rows :func:`pack_rows` packed."""
    return pickle.loads(zlib.decompress(packed))


@dataclass(frozen=True)
class Failure:
    """An image that was not indexed, with a one-line reason."""

    path: str
    reason: str
    # A cluster problem (time-out, dead worker) rather than the file itself:
    # the next build tries the file again even if it has not changed.
    transient: bool = False


def image_id(relpath: str) -> int:
    """Stable non-negative int64 id of an image, from its dataset-relative path.

    Ids depend on the path alone, so an incremental or resumed build gives an
    image the same id as a fresh build. Collisions are checked when indexing.
    """
    digest = hashlib.blake2b(os.fsencode(relpath), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _ID_MASK


# The file that marks a folder of thumbnails written by `imgindex duplicates
# --html` (pipeline/report_html.py): a report saved inside its dataset must
# not have its thumbnails indexed as copies of the photos on the next build.
THUMBNAILS_MARKER = ".imgindex-thumbnails"
THUMBNAILS_SKIPPED = (
    f"thumbnails of an imgindex duplicates report (it holds {THUMBNAILS_MARKER}); "
    "not indexed"
)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_dataset(root: str | os.PathLike) -> Path:
    """Return ``root`` as a Path; raise DatasetError unless it is a readable folder."""
    path = Path(root)
    if not path.exists():
        raise DatasetError(f"dataset folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise DatasetError(f"dataset {str(path)!r} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DatasetError(f"dataset folder {str(path)!r} is not readable")
    return path


def discover_images(
    root: str | os.PathLike, failures: list[Failure] | None = None
) -> Iterator[ImageRecord]:
    """Yield the image files under ``root`` in a stable (sorted) order.

    Parameters
    ----------
    root
        Dataset folder, walked recursively. Symbolic links are followed, to
        files and to folders (a dataset made of linked camera folders); a
        folder reached a second time (a link loop, or two links to one
        folder) is walked once and each further link reported.
    failures
        If given, files that look like images but cannot be used (broken
        links, unreadable folders, repeated folders) are appended here
        instead of vanishing.

    Raises
    ------
    DatasetError
        If ``root`` is not a readable folder.
    """
    base = check_dataset(root)
    yield from walk_folder(str(base), failures)


def walk_folder(
    base: str,
    failures: list[Failure] | None,
    start: str = "",
    walked: dict[tuple[int, int], str] | None = None,
    entered: list[tuple[int, int, str]] | None = None,
    shallow: list[str] | None = None,
) -> Iterator[ImageRecord]:
    """The images under ``base``/``start``, depth first in sorted order.

    ``walked`` maps the folders (device, inode) walked already to their path
    (the dataset root's is added); ``entered`` gets each folder entered, so
    that walks of several parts of one tree can be merged
    (:func:`pipeline.listing.walk_conflicts`). With ``shallow``, only the
    images directly in ``start`` are listed and its sub-folders appended there.
    """
    # Iterative, depth-first, in sorted order: 1,000+ nested folders must not
    # hit Python's recursion limit.
    st = os.stat(base)
    walked = {} if walked is None else walked
    walked.setdefault((st.st_dev, st.st_ino), "")
    if start:
        # Its ancestors too, as a walk from the root would hold them: a link
        # back up is not followed.
        parts = start.split("/")
        try:
            for i in range(1, len(parts) + 1):
                prefix = "/".join(parts[:i])
                st = os.stat(os.path.join(base, prefix))
                walked.setdefault((st.st_dev, st.st_ino), prefix)
        except OSError as e:  # gone since the walk was split
            if failures is not None:
                failures.append(Failure(start, f"folder not readable: {e.strerror}"))
            return
    if entered is not None:
        entered.append((st.st_dev, st.st_ino, start))
    stack: list[Iterator[os.DirEntry]] = []
    rels: list[str] = []

    def enter(rel: str) -> None:
        folder = os.path.join(base, rel) if rel else base
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if failures is not None and rel:
                failures.append(Failure(rel, f"folder not readable: {e.strerror}"))
            return
        if rel and _holds(entries, THUMBNAILS_MARKER):
            report(rel, THUMBNAILS_SKIPPED)
            return
        stack.append(iter(entries))
        rels.append(rel)

    def report(relpath: str, reason: str) -> None:
        if failures is not None:
            failures.append(Failure(relpath, reason))

    enter(start)
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            rels.pop()
            continue
        rel = rels[-1]
        relpath = f"{rel}/{entry.name}" if rel else entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            # A folder named like an image is still a folder: walk it.
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as e:
                report(relpath, f"folder not readable: {e.strerror}")
                continue
            first = walked.setdefault((st.st_dev, st.st_ino), relpath)
            if first != relpath:
                report(relpath, same_folder(first))
                continue
            if shallow is not None:
                shallow.append(relpath)
                continue
            if entered is not None:
                entered.append((st.st_dev, st.st_ino, relpath))
            enter(relpath)
            continue
        if not is_image_name(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError as e:
            reason = (
                "broken symbolic link"
                if entry.is_symlink()
                else f"cannot stat: {e.strerror}"
            )
            report(relpath, reason)
            continue
        if not stat.S_ISREG(st.st_mode):
            # A FIFO or device named like an image would block or mislead a
            # worker's read; report it rather than open it.
            report(relpath, "not a regular file")
            continue
        yield ImageRecord(relpath, st.st_size, st.st_mtime_ns)


def _holds(entries: list[os.DirEntry], name: str) -> bool:
    """Whether ``entries``, sorted by name, hold ``name``: a binary search, not
    a look at each (4 % of a walk of 1,000-file folders)."""
    at = bisect.bisect_left(entries, name, key=lambda e: e.name)
    return at < len(entries) and entries[at].name == name


def same_folder(first: str) -> str:
    """The reason a folder reached a second time is not walked again."""
    return (
        f"the same folder as {first or 'the dataset root'!r} (a symbolic link); "
        "its images are indexed there, once"
    )


def has_images(root: str | os.PathLike) -> bool:
    """True if ``root`` holds at least one image file (stops at the first)."""
    return next(discover_images(root), None) is not None


# Partitions of at least this size are tapered at the end (see below).
TAPER_FROM = 16


def partition_records(
    records: list[ImageRecord], size: int, tail_threads: int = 0
) -> list[tuple[ImageRecord, ...]]:
    """Split records into consecutive partitions of at most ``size`` images.

    With ``tail_threads`` (the worker threads that will run them), the last
    ``tail_threads * size`` images or so go in partitions a quarter that
    size, so the threads' last tasks end close together instead of one
    thread running a whole partition while the others wait (0.25 s of one
    core in two at the end of a 500-photo build here).
    """
    n = len(records)
    head, small = tapered(n, size, tail_threads)
    return [
        *(tuple(records[i : i + size]) for i in range(0, head, size)),
        *(tuple(records[i : i + small]) for i in range(head, n, small)),
    ]


def tapered(n: int, size: int, tail_threads: int = 0) -> tuple[int, int]:
    """How :func:`partition_records` cuts ``n`` images: (the images before
    the tail, in partitions of ``size``; the tail's partition size)."""
    if size < 1:
        raise ValueError(f"partition size must be >= 1, got {size}")
    head = n
    if tail_threads > 0 and size >= TAPER_FROM:
        head = max(0, n - tail_threads * size) // size * size
    return head, size // 4 if head < n else size
