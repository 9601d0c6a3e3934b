"""The incremental diff in path ranges: a Dask task each, on the workers.

A listing's parts and the index in place's manifest, put into parts, are
each sorted by path, so the diff of one against the other is a merge. It is
split at paths taken from the parts' Parquet footers (the first path of
each row group, with its row count: the client reads no row), and each
range is merged on its own, by :func:`diff_range`: it reads only the row
groups of each part that overlap its range, and writes the images to embed
and those kept as parts of its own. The ranges' parts, in range order, are
in path order. The client holds each range's counts and failure rows, never
the images.

Ids are checked for collisions the same way, in ranges of id values: each
path range writes its ids sorted to a ``.npy`` file, and each id range
reads its slice of every file (a search in a memory map) and sorts it.

Without a cluster, or for a listing of one range, it all runs here, the
same functions in the same order.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import uuid
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import listing
from pipeline.discover import Failure, ImageRecord
from pipeline.listing import ListedAgain, distinct_rows, ready_client
from pipeline.parts import BATCH_ROWS, COLUMNS, Part, PartWriter, Row, record_of
from pipeline.spans import task_label

logger = logging.getLogger(__name__)

# Listed rows a range holds, about: the unit of the diff's tasks (a task
# holds a batch of each part it reads and its range's ids, 8 bytes each).
ROWS_PER_RANGE = 250_000
# The plan's folders this writes: what to embed, what is kept, the ranges'
# ids.
EMBED, KEPT, IDS = "embed", "kept", "ids"
_ID_SPACE = 1 << 63  # ids are non-negative int64 (pipeline.discover.image_id)


@dataclass(frozen=True)
class PathRange:
    """The paths from ``lo`` (None: from the first) up to, not including,
    ``hi`` (None: to the last)."""

    lo: bytes | None = None
    hi: bytes | None = None

    def __contains__(self, path: bytes) -> bool:
        return (self.lo is None or path >= self.lo) and (
            self.hi is None or path < self.hi
        )

    def overlaps(self, first: bytes, last: bytes) -> bool:
        return (self.lo is None or last >= self.lo) and (
            self.hi is None or first < self.hi
        )


def path_ranges(parts: Sequence[Part], rows_per_range: int) -> list[PathRange]:
    """Ranges of about ``rows_per_range`` rows of ``parts`` each, split at
    the first paths of their row groups (read from the footers)."""
    import pyarrow.parquet as pq

    total = sum(p.count for p in parts)
    wanted = -(-total // max(1, rows_per_range))
    if wanted <= 1:
        return [PathRange()]
    # About a path a row group: 2,000 at a million rows.
    firsts: list[tuple[bytes, int]] = []
    for part in parts:
        with open(part.file, "rb") as raw, pq.ParquetFile(raw) as f:
            for g in range(f.metadata.num_row_groups):
                group = f.metadata.row_group(g)
                stats = group.column(0).statistics
                if stats is not None and stats.has_min_max:
                    firsts.append((stats.min, group.num_rows))
    firsts.sort()
    step = total / wanted
    cuts: list[bytes] = []
    seen = 0
    goal = step
    for first, rows in firsts:
        if seen >= goal and (not cuts or first > cuts[-1]):
            cuts.append(first)
            while goal <= seen:
                goal += step
        seen += rows
    bounds: list[bytes | None] = [None, *cuts, None]
    return [PathRange(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def rows_in_range(part: Part, within: PathRange) -> Iterator[Row]:
    """The rows of ``part`` in ``within``, in order: only the row groups
    whose paths overlap it are read."""
    import pyarrow.parquet as pq

    with open(part.file, "rb") as raw, pq.ParquetFile(raw, pre_buffer=False) as f:
        groups = []
        for g in range(f.metadata.num_row_groups):
            stats = f.metadata.row_group(g).column(0).statistics
            if (
                stats is None
                or not stats.has_min_max
                or within.overlaps(stats.min, stats.max)
            ):
                groups.append(g)
        if not groups:
            return
        batches = f.iter_batches(
            batch_size=BATCH_ROWS, row_groups=groups, columns=list(COLUMNS)
        )
        for batch in batches:
            for row in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                if row[0] in within:
                    yield row


@dataclass
class MetadataDigest:
    """A digest of a list's other columns, so that a re-run sees an edit of
    them ("" where there are none), and the columns seen. A sum of one hash
    a row: the ranges' digests add up to the listing's, whatever the split."""

    columns: set[str] = field(default_factory=set)
    total: int = 0
    fed: bool = False

    _BITS = 96

    def add(self, path: str, meta: dict[str, Any]) -> None:
        self.columns.update(meta)
        row = json.dumps([path, meta], sort_keys=True).encode()
        digest = hashlib.blake2b(row, digest_size=self._BITS // 8).digest()
        self.total = (self.total + int.from_bytes(digest, "big")) % (1 << self._BITS)
        self.fed = True

    def merge(self, other: MetadataDigest) -> None:
        self.columns |= other.columns
        self.total = (self.total + other.total) % (1 << self._BITS)
        self.fed |= other.fed

    def hexdigest(self) -> str:
        return f"{self.total:0{self._BITS // 4}x}" if self.fed else ""


@dataclass
class RangeDiff:
    """What :func:`diff_range` found in one range."""

    embed: list[Part] = field(default_factory=list)
    kept: list[Part] = field(default_factory=list)
    updated: int = 0  # of the images to embed, those indexed or failed before
    still_there: int = 0  # images of the index in place listed again
    old: int = 0  # images of the index in place in the range
    # Failed before and unchanged since: not tried again.
    known_bad: list[Failure] = field(default_factory=list)
    known_records: list[ImageRecord] = field(default_factory=list)
    again: list[ListedAgain] = field(default_factory=list)
    metadata: MetadataDigest = field(default_factory=MetadataDigest)
    ids: str = ""  # the .npy file of the range's ids, sorted
    twice: list[int] = field(default_factory=list)  # ids twice in the range
    unseen: bool = False  # the worker does not see the plan's folder


@dataclass(frozen=True)
class RangeInput:
    """What :func:`diff_range` reads: the listing's parts and the index in
    place's, the folders of a walk to leave out, and the failures of the
    index in place in the range (record, reason), by path."""

    listing: tuple[Part, ...]
    previous: tuple[Part, ...]
    dropped: tuple[bytes, ...] = ()
    old_bad: dict[str, tuple[ImageRecord, Failure]] = field(default_factory=dict)
    first_build: bool = False


def diff_range(given: RangeInput, within: PathRange, work: str) -> RangeDiff:
    """The diff of the listing against the index in place in ``within``:
    its images to embed go to parts in ``work/embed``, those kept to
    ``work/kept``, its ids (sorted) to ``work/ids``."""
    found = RangeDiff()
    embed, kept = PartWriter(Path(work, EMBED)), PartWriter(Path(work, KEPT))
    ids = array("q")  # 8 bytes an image
    old_rows = _Counted(
        heapq.merge(*(rows_in_range(p, within) for p in given.previous))
    )
    old = next(old_rows, None)
    listed = heapq.merge(*(rows_in_range(p, within) for p in given.listing))
    # Rows are (path, list row, size, mtime_ns, id, meta): pipeline/parts.py.
    for row in distinct_rows(listed, given.dropped, found.again):
        ids.append(row[4])
        if row[5] is not None:
            found.metadata.add(os.fsdecode(row[0]), json.loads(row[5]))
        if given.first_build:  # everything is new
            embed.add(row)
            continue
        while old is not None and old[0] < row[0]:
            old = next(old_rows, None)  # gone from the dataset
        before = old if old is not None and old[0] == row[0] else None
        found.still_there += before is not None
        if before is not None and before[2:4] == row[2:4]:  # size, mtime
            kept.add(row)
            continue
        r = record_of(row)
        bad = given.old_bad.get(r.path)
        if bad is not None and bad[0] == r:
            # Failed before and unchanged since: it would fail again.
            found.known_bad.append(bad[1])
            found.known_records.append(r)
        else:
            embed.add(row)
            found.updated += before is not None or bad is not None
    found.old = old_rows.count + sum(1 for _ in old_rows)
    found.embed, found.kept = embed.close(), kept.close()
    ordered = np.sort(np.frombuffer(ids, np.int64))
    found.twice = np.unique(ordered[1:][ordered[1:] == ordered[:-1]]).tolist()
    folder = Path(work, IDS)
    folder.mkdir(exist_ok=True)
    found.ids = str(folder / f"{uuid.uuid4().hex[:12]}.npy")
    np.save(found.ids, ordered)
    return found


class _Counted(Iterator[Row]):
    """An iterator that counts the rows it gave."""

    def __init__(self, rows: Iterator[Row]):
        self._rows = rows
        self.count = 0

    def __next__(self) -> Row:
        row = next(self._rows)
        self.count += 1
        return row


def diff_range_task(
    given: RangeInput, within: PathRange, work: str, folder: str, token: str
) -> RangeDiff:
    """:func:`diff_range` as a Dask task: only where the worker sees the
    plan's ``folder`` (its token file holds ``token``)."""
    if not listing.sees_folder(folder, token):
        return RangeDiff(unseen=True)
    return diff_range(given, within, work)


def ids_twice(files: Sequence[str], lo: int, hi: int) -> list[int]:
    """The ids in [lo, hi) found more than once across ``files`` (each
    sorted)."""
    slices = []
    for file in files:
        ids = np.load(file, mmap_mode="r")
        a, b = np.searchsorted(ids, [lo, hi])
        slices.append(np.asarray(ids[a:b]))
    ordered = np.sort(np.concatenate(slices)) if slices else np.empty(0, np.int64)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]]).tolist()


def ids_twice_task(
    files: Sequence[str], lo: int, hi: int, folder: str, token: str
) -> list[int] | None:
    """:func:`ids_twice` as a Dask task: None where the worker does not see
    the plan's ``folder``."""
    return ids_twice(files, lo, hi) if listing.sees_folder(folder, token) else None


@dataclass
class Diff:
    """The ranges' findings added up (ranges in order: so are the parts)."""

    embed: list[Part] = field(default_factory=list)
    kept: list[Part] = field(default_factory=list)
    updated: int = 0
    still_there: int = 0
    old: int = 0
    known_bad: list[Failure] = field(default_factory=list)
    known_records: list[ImageRecord] = field(default_factory=list)
    again: list[ListedAgain] = field(default_factory=list)
    metadata: MetadataDigest = field(default_factory=MetadataDigest)
    twice: set[int] = field(default_factory=set)  # ids of two paths or more
    ranges: int = 0

    def add(self, found: RangeDiff) -> None:
        self.embed += found.embed
        self.kept += found.kept
        self.updated += found.updated
        self.still_there += found.still_there
        self.old += found.old
        self.known_bad += found.known_bad
        self.known_records += found.known_records
        self.again += found.again
        self.metadata.merge(found.metadata)
        self.twice.update(found.twice)
        self.ranges += 1


def diff_listing(
    given: RangeInput,
    work: str | os.PathLike,
    seen: tuple[str, str],
    cluster: Any = None,
    label: str = "dataset",
    rows_per_range: int | None = None,
) -> Diff:
    """The diff of ``given``'s listing against its index in place, in path
    ranges: on ``cluster``'s workers (a Client, or a Future of one) where it
    is at hand and the listing spans several ranges, else here. ``seen``
    is the listing's folder and token (:class:`pipeline.listing.Lister`): a
    worker that does not see them leaves its range to the client."""
    work = os.fspath(work)
    folder, token = seen
    ranges = path_ranges(given.listing, rows_per_range or ROWS_PER_RANGE)
    client = ready_client(cluster) if len(ranges) > 1 else None
    inputs = [_for_range(given, r, ranges) for r in ranges]
    total = Diff()
    files: list[str] = []
    if client is None:
        for within, one in zip(ranges, inputs, strict=True):
            found = diff_range(one, within, work)
            total.add(found)
            files.append(found.ids)
    else:
        run, name = uuid.uuid4().hex[:8], task_label(label)
        logger.info("diff %s: %d path ranges on the cluster", name, len(ranges))
        futures = client.map(
            diff_range_task,
            inputs,
            ranges,
            [work] * len(ranges),
            [folder] * len(ranges),
            [token] * len(ranges),
            key=[f"diff[{name}]-{n:05d}-{run}" for n in range(len(ranges))],
            pure=False,
        )
        # Gathered in range order: the parts' order is the paths'.
        for within, one, future in zip(ranges, inputs, futures, strict=True):
            found = future.result()
            future.release()
            if found.unseen:
                found = diff_range(one, within, work)
            total.add(found)
            files.append(found.ids)
    if len(files) > 1:
        total.twice = _ids_twice(files, client, folder, token, label)
    for file in files:
        Path(file).unlink(missing_ok=True)
    return total


def _for_range(given: RangeInput, within: PathRange, ranges: Sequence[PathRange]):
    """``given`` with the failures of the index in place in ``within`` only
    (a task carries those of its range)."""
    if len(ranges) == 1:
        return given
    old_bad = {p: v for p, v in given.old_bad.items() if os.fsencode(p) in within}
    return RangeInput(
        given.listing, given.previous, given.dropped, old_bad, given.first_build
    )


def _ids_twice(
    files: list[str], client: Any, folder: str, token: str, label: str
) -> set[int]:
    """The ids found in two ranges' files or more: in as many ranges of id
    values, on the cluster where one is at hand."""
    n = len(files)
    bounds = [_ID_SPACE * k // n for k in range(n + 1)]
    spans = list(zip(bounds, bounds[1:], strict=False))
    if client is None:
        found: Iterable[list[int] | None] = (ids_twice(files, a, b) for a, b in spans)
    else:
        run, name = uuid.uuid4().hex[:8], task_label(label)
        futures = client.map(
            ids_twice_task,
            [files] * n,
            [a for a, _ in spans],
            [b for _, b in spans],
            [folder] * n,
            [token] * n,
            key=[f"ids[{name}]-{k:05d}-{run}" for k in range(n)],
            pure=False,
        )
        found = client.gather(futures)
    twice: set[int] = set()
    for (a, b), ids in zip(spans, found, strict=True):
        twice.update(ids_twice(files, a, b) if ids is None else ids)
    return twice
