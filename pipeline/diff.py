"""The incremental diff in path ranges: a Dask task each, on the workers.

A listing's parts and the index in place's manifest, put into parts, are
each sorted by path, so the diff of one against the other is a merge, split
into path ranges (:mod:`pipeline.ranges`). Each range is merged on its own,
by :func:`diff_range`, which writes the images to embed and those kept as
parts of its own; the ranges' parts, in range order, are in path order. The
client holds each range's counts and failure rows, never the images.

Ids are checked for collisions the same way, in ranges of id values: each
path range writes its ids sorted to a ``.npy`` file, and each id range
reads its slice of every file (a search in a memory map) and sorts it.

Without a cluster, or for a listing of one range, it all runs here, the
same functions in the same order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import uuid
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgindex.pipeline.discover import Failure, ImageRecord
from imgindex.pipeline.listing import ListedAgain, distinct_rows
from imgindex.pipeline.lookup import repeated
from imgindex.pipeline.parts import Part, PartWriter, Row, record_of
from imgindex.pipeline.ranges import (
    PathRange,
    label,
    map_ranges,
    merged_in_range,
    path_ranges,
)
from imgindex.pipeline.touched import TOUCHED, write_touched

# The plan's folders this writes: what to embed, what is kept, the ranges'
# ids.
EMBED, KEPT, IDS = "embed", "kept", "ids"
_ID_SPACE = 1 << 63  # ids are non-negative int64 (pipeline.discover.image_id)


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
    # The .npy file of the range's images of unchanged size and another
    # mtime (pipeline.touched); "" for none.
    touched: str = ""
    n_touched: int = 0


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
    touched = array("q")  # id, recorded and listed mtime: 24 bytes an image
    old_rows = _Counted(merged_in_range(given.previous, within))
    old = next(old_rows, None)
    listed = merged_in_range(given.listing, within)
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
            if before is not None and before[2] == row[2]:
                touched.extend((row[4], before[3], row[3]))
    found.old = old_rows.count + sum(1 for _ in old_rows)
    found.embed, found.kept = embed.close(), kept.close()
    ordered = np.sort(np.frombuffer(ids, np.int64))
    found.twice = repeated(ordered)
    folder = Path(work, IDS)
    folder.mkdir(exist_ok=True)
    found.ids = str(folder / f"{uuid.uuid4().hex[:12]}.npy")
    np.save(found.ids, ordered)
    found.touched = write_touched(touched, Path(work, TOUCHED))
    found.n_touched = len(touched) // 3
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


def ids_twice(files: Sequence[str], span: tuple[int, int], work: str) -> list[int]:
    """The ids in [lo, hi) = ``span`` found more than once across ``files``
    (each sorted)."""
    lo, hi = span
    slices = []
    for file in files:
        ids = np.load(file, mmap_mode="r")
        a, b = np.searchsorted(ids, [lo, hi])
        slices.append(np.asarray(ids[a:b]))
    ordered = np.sort(np.concatenate(slices)) if slices else np.empty(0, np.int64)
    return repeated(ordered)


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
    id_files: list[str] = field(default_factory=list)  # a range's ids each
    touched: list[str] = field(default_factory=list)  # ranges' touched images
    n_touched: int = 0

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
        self.id_files.append(found.ids)
        if found.touched:
            self.touched.append(found.touched)
        self.n_touched += found.n_touched


def diff_listing(
    given: RangeInput,
    work: str | os.PathLike,
    seen: tuple[str, str],
    cluster: Any = None,
    name: str = "dataset",
    rows_per_range: int | None = None,
) -> Diff:
    """The diff of ``given``'s listing against its index in place, in path
    ranges: on ``cluster``'s workers (a Client, or a Future of one) where it
    is at hand and the listing spans several ranges, else here. ``seen`` is
    the listing's folder and token (:class:`pipeline.listing.Lister`): a
    worker that does not see them leaves its range to the client."""
    ranges = path_ranges(given.listing, rows_per_range)
    inputs = [_for_range(given, r, len(ranges)) for r in ranges]
    total = Diff()
    found = map_ranges(
        diff_range, inputs, ranges, work, seen, cluster, label("diff", name)
    )
    for one in found:
        total.add(one)
    files = total.id_files
    if len(files) > 1:
        n = len(files)
        bounds = [_ID_SPACE * k // n for k in range(n + 1)]
        spans = list(zip(bounds, bounds[1:], strict=False))
        twice = map_ranges(
            ids_twice, [files] * n, spans, work, seen, cluster, label("ids", name)
        )
        total.twice = set(itertools.chain.from_iterable(twice))
    for file in files:
        Path(file).unlink(missing_ok=True)
    return total


def _for_range(given: RangeInput, within: PathRange, ranges: int) -> RangeInput:
    """``given`` with the failures of the index in place in ``within`` only
    (a task carries those of its range)."""
    if ranges == 1:
        return given
    old_bad = {p: v for p, v in given.old_bad.items() if os.fsencode(p) in within}
    return dataclasses.replace(given, old_bad=old_bad)
