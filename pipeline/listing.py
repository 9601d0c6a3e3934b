"""Listing a dataset in parts: here, one part after another, or as Dask tasks.

A folder tree on a parallel file system answers a few thousand stat calls a
second to one client, and a file list of millions of entries is millions of
stats: so a source is listed in units (sub-trees of a folder, chunks of a
list's rows, batches of tar shards), each one call of :func:`list_unit`.
:class:`Lister` runs them here, in order, until a cluster is at hand, and
hands the rest to its workers as tasks, a bounded window of them at a time:
a small dataset is listed in less time than a cluster takes to start (and a
build that finds nothing to do starts none), a large one is listed by every
worker at once.

What a unit finds goes to disk as parts (:mod:`pipeline.parts`), written by
the worker that listed it where it sees the client's folder, else by the
client as the unit's rows arrive: the client holds a window of units, never
the dataset's records. :class:`SourceListing` merges the parts in path
order, as a build plans them.

The units of a folder's walk are listed as one walk would have listed them:
each folder reached through symbolic links walked once, at its first path
in depth-first sorted order (:func:`walk_conflicts`).
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AnyStr

from imgindex.pipeline import ranges
from imgindex.pipeline.discover import (
    Failure,
    pack_rows,
    same_folder,
    unpack_rows,
    walk_folder,
)
from imgindex.pipeline.parts import (
    Part,
    PartWriter,
    Row,
    merge_parts,
    row_of,
)
from imgindex.pipeline.ranges import TOKEN_FILE, compact_parts, label, ready_client
from imgindex.pipeline.spans import task_label

if TYPE_CHECKING:
    from imgindex.pipeline.sources import Source

logger = logging.getLogger(__name__)

# Sub-trees a folder's walk is split into (fewer where the tree has fewer
# folders): enough to keep a few dozen workers busy.
FOLDER_UNITS = 64
LIST_ROWS_PER_UNIT = 10_000
# A .txt list is read by the tasks in spans of this many bytes (about 10,000
# entries of 100 bytes).
LIST_SPAN_BYTES = 1 << 20
ROW_BITS = 32
SHARDS_PER_UNIT = 1_000


@dataclass
class Listing:
    """What one unit listed: its parts, and the entries it could not list."""

    parts: list[Part] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # a file list's row of each failure (see Unit.span); none for the
    # failures of other sources
    failure_rows: list[int] = field(default_factory=list)
    # (device, inode, path) of each folder a folder's unit entered
    folders: list[tuple[int, int, str]] = field(default_factory=list)
    # a span's number (-1: the unit was not a span), and the entries it read
    span: int = -1
    entries: int = 0
    # the rows, packed, where the worker did not see the parts' folder
    packed: bytes | None = None
    # a span of a list that the worker does not see (the client lists it)
    unread: bool = False


@dataclass(frozen=True)
class Unit:
    """One part of a source's listing: a sub-tree of a folder (``start``),
    or some of a list's entries or of a tar source's shards (``entries``),
    a list's with their rows and other columns (JSON text)."""

    start: str = ""
    entries: tuple[str, ...] = ()
    rows: tuple[int, ...] = ()
    metas: tuple[str | None, ...] = ()
    # A .txt list's lines that start in this byte range, or a .parquet
    # list's row groups [first, stop), read by the task itself: the client
    # never reads the list. A span does not know how many entries come
    # before it, so its rows are ``number << 32 | entry`` (entry counted
    # from 1 in the span) until SourceListing numbers them.
    span: tuple[int, int] = ()
    number: int = 0
    groups: bool = False  # ``span`` counts a .parquet list's row groups


def unit_items(source: Source, unit: Unit, listing: Listing) -> Iterator[Row]:
    """What ``unit`` of ``source`` holds, as it is listed; what cannot be
    listed goes to ``listing``'s failures (and the folders entered to its
    folders)."""
    from imgindex.pipeline.sources import (
        read_parquet_groups,
        read_txt_span,
        shard_files,
        stat_entry,
    )

    if source.kind == "folder":
        walk = walk_folder(
            source.base, listing.failures, start=unit.start, entered=listing.folders
        )
        for r in walk:
            yield row_of(r)
        return
    if source.kind == "tar":
        for r in shard_files(source, unit.entries, listing.failures):
            yield row_of(r)
        return
    pairs: Iterable[tuple[str, str | None]]
    rows: Iterable[int]
    if unit.span:
        if unit.groups:
            pairs = read_parquet_groups(source.spec, source.path_column, *unit.span)
        else:
            pairs = ((e, None) for e in read_txt_span(source.spec, *unit.span))
        rows = itertools.count((unit.number << ROW_BITS) + 1)
        listing.span = unit.number
    else:
        pairs = zip(unit.entries, unit.metas or itertools.repeat(None), strict=False)
        rows = unit.rows or range(1, len(unit.entries) + 1)
    for (entry, meta), row in zip(pairs, rows, strict=False):
        listing.entries += 1
        found = stat_entry(source, entry)
        if isinstance(found, Failure):
            listing.failures.append(found)
            listing.failure_rows.append(row)
        else:
            yield row_of(found, row, meta)


def list_unit(source: Source, unit: Unit, folder: str | os.PathLike) -> Listing:
    """List one unit of ``source`` into parts in ``folder``, here
    (:func:`list_unit_task` is the task)."""
    listing = Listing()
    writer = PartWriter(folder)
    writer.extend(unit_items(source, unit, listing))
    listing.parts = writer.close()
    return listing


def list_unit_task(source: Source, unit: Unit, folder: str, token: str) -> Listing:
    """:func:`list_unit` as a Dask task runs it: the worker writes the parts
    where it sees the client's ``folder`` (its token file says so), else
    sends the rows back packed for the client to write."""
    if unit.span and not _list_readable(source.spec):
        return Listing(unread=True)
    if ranges.sees_folder(folder, token):
        return list_unit(source, unit, folder)
    listing = Listing()
    listing.packed = pack_rows(list(unit_items(source, unit, listing)))
    return listing


def _list_readable(spec: str) -> bool:
    """Whether this process can read the list ``spec``: a list of URLs on
    the client's own disk is read there, whatever workers see."""
    from imgindex.pipeline.sources import is_url

    return is_url(spec) or os.path.exists(spec)


def folder_units(
    base: str, folder: str | os.PathLike, target: int | None = None
) -> tuple[Listing, list[Unit]]:
    """Split the walk of ``base`` into at most about ``target`` sub-trees.

    Folders are opened breadth first here until there are ``target`` whose
    sub-trees are left to walk; the images in the folders opened here go to
    parts in ``folder`` as a listing of their own (with the folders opened),
    beside the units of the rest.
    """
    target = target or FOLDER_UNITS
    here = Listing()
    writer = PartWriter(folder)
    deep = [""]  # sub-trees not opened yet, shallowest first
    while deep and len(deep) < target:
        start = deep.pop(0)
        children: list[str] = []
        # Each folder knows only its ancestors, as in one walk: which of two
        # paths to one folder is its own is for walk_conflicts to say, in the
        # walk's order (breadth first here, a link may come first).
        writer.extend(
            row_of(r)
            for r in walk_folder(
                base,
                here.failures,
                start=start,
                entered=here.folders,
                shallow=children,
            )
        )
        deep.extend(children)
    here.parts = writer.close()
    return here, [Unit(start) for start in deep]


def walk_conflicts(listings: Sequence[Listing]) -> tuple[list[str], list[Failure]]:
    """The folders of a walk listed in parts that are not their own: each
    folder entered at several paths (symbolic links from different parts)
    keeps its images at the first path in depth-first sorted order; under
    the others nothing is listed, and each is one failure row saying where
    its images are.

    Returns
    -------
    (dropped folders, their failure rows)
    """
    folders = sorted(
        (f for listing in listings for f in listing.folders),
        key=lambda f: _order(f[2]),
    )
    first: dict[tuple[int, int], str] = {}
    dropped: list[str] = []
    failures: list[Failure] = []
    for dev, ino, path in folders:
        if any(_under(path, d) for d in dropped):
            continue
        winner = first.setdefault((dev, ino), path)
        if winner != path:
            dropped.append(path)
            failures.append(Failure(path, same_folder(winner)))
    return dropped, failures


def _order(path: str) -> str:
    """Depth-first sorted order, component by component: as one string whose
    separator sorts before any character of a name (no list per path)."""
    return path.replace("/", "\0")


def _under(path: AnyStr, folder: AnyStr) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (as text or bytes)."""
    sep = b"/" if isinstance(folder, bytes) else "/"
    return path == folder or path.startswith(folder + sep)


@dataclass
class SourceListing:
    """A whole source listed in parts (:meth:`pipeline.sources.Source.listing`).

    :meth:`items` merges the parts in path order; a path listed at several
    rows of a file list is given once, at its first row, and each other row
    is a failure. ``failures`` are complete once :meth:`items` is.
    """

    parts: list[Part]
    failures: list[Failure]
    # folders of a walk not listed at their path (links to a folder listed
    # at another): what parts hold under them is not the source's
    dropped: list[str] = field(default_factory=list)
    # the entries before each span of a .txt list (Unit.span), by its number
    span_starts: dict[int, int] = field(default_factory=dict)
    # the listing's token (Lister): workers that see its folder see the plan's
    token: str = ""

    def row_number(self, row: int) -> int:
        """A list's row as its reader counts it (entries from 1)."""
        span, entry = row >> ROW_BITS, row & ((1 << ROW_BITS) - 1)
        return self.span_starts.get(span, 0) + entry

    @property
    def count(self) -> int:
        """Rows in the parts (an upper bound on the images)."""
        return sum(p.count for p in self.parts)

    def items(self) -> Iterator[Row]:
        again: list[ListedAgain] = []
        yield from distinct_rows(merge_parts(self.parts), self.dropped_bytes, again)
        self.add_listed_again(again)

    @property
    def dropped_bytes(self) -> tuple[bytes, ...]:
        return tuple(os.fsencode(d) for d in self.dropped)

    def add_listed_again(self, again: Iterable[ListedAgain]) -> None:
        """A failure row for each path listed again, at its reader's row."""
        self.failures.extend(
            _listed_again(path, self.row_number(row)) for path, row in again
        )


def _listed_again(path: str, row: int) -> Failure:
    return Failure(path, f"listed more than once (row {row}); indexed once")


# A path listed at more than one row of a file list: (path, the other row).
ListedAgain = tuple[str, int]


def distinct_rows(
    rows: Iterable[Row], dropped: Sequence[bytes], again: list[ListedAgain]
) -> Iterator[Row]:
    """``rows`` (in path order) but those under the ``dropped`` folders of a
    walk, each path once: at its first row, its other rows go to ``again``."""
    last = None
    for row in rows:
        path = row[0]
        if dropped and any(_under(path, d) for d in dropped):
            continue
        if path == last:
            again.append((os.fsdecode(path), row[1]))
            continue
        last = path
        yield row


def collect_listings(listings: Iterable[Listing], dropped: list[str]) -> SourceListing:
    """The parts and failures of ``listings``: a file list's failure rows
    given once by path (at the first row, the other rows as listed again),
    those under ``dropped`` folders left out."""
    listings = list(listings)
    parts: list[Part] = []
    first: dict[str, tuple[int, Failure]] = {}
    again: list[tuple[str, int]] = []
    plain: list[Failure] = []
    for listing in listings:
        parts.extend(listing.parts)
        rows = listing.failure_rows or [0] * len(listing.failures)
        for f, row in zip(listing.failures, rows, strict=True):
            if dropped and any(_under(f.path, d) and f.path != d for d in dropped):
                continue
            if not row:
                plain.append(f)
                continue
            held = first.get(f.path)
            if held is None or row < held[0]:
                if held is not None:
                    again.append((f.path, held[0]))
                first[f.path] = (row, f)
            else:
                again.append((f.path, row))
    # Where each span's rows start, counted in entries.
    spans = sorted((x.span, x.entries) for x in listings if x.span >= 0)
    counts = itertools.accumulate((n for _, n in spans), initial=0)
    starts = {span: start for (span, _), start in zip(spans, counts, strict=False)}
    collected = SourceListing(parts, [], dropped, starts)
    collected.failures = [
        *plain,
        *(f for _, f in first.values()),
        *(_listed_again(path, collected.row_number(row)) for path, row in again),
    ]
    return collected


class Lister:
    """Runs a source's listing units into parts in ``folder``: here, in
    order, until ``cluster`` gives a client (a ``distributed.Client``, or a
    Future that may resolve to one or to None), then the rest as Dask tasks,
    a window of them at a time."""

    def __init__(
        self, folder: str | os.PathLike, cluster: Any = None, label: str = "listing"
    ):
        self.folder = Path(folder)
        self.cluster = cluster
        self.label = task_label(label)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = uuid.uuid4().hex
        (self.folder / TOKEN_FILE).write_text(self.token)

    def run(self, source: Source, units: Iterable[Unit]) -> Iterator[Listing]:
        units = iter(units)
        unit = next(units, None)
        while unit is not None:
            after = next(units, None)
            client = self._client()
            if client is not None and after is not None:
                yield from self._on_cluster(
                    client, source, itertools.chain([unit, after], units)
                )
                return
            yield list_unit(source, unit, self.folder)
            unit = after

    def compact(self, parts: Sequence[Part]) -> list[Part]:
        """``parts`` merged in groups (on the cluster where one is at hand)
        until at most ``MERGE_FAN_IN`` are left, so that merging them all
        holds a batch of few parts at once."""
        seen = (str(self.folder), self.token)
        name = label("merge", self.label)
        return compact_parts(parts, self.folder, seen, self.cluster, name)

    def _client(self):
        return ready_client(self.cluster)

    def _on_cluster(
        self, client, source: Source, units: Iterator[Unit]
    ) -> Iterator[Listing]:
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]
        for_tasks = source.for_tasks()
        window = max(4, 2 * sum(client.nthreads().values()))
        count = itertools.count()
        pending = as_completed(loop=client.loop)
        unit_of: dict[str, Unit] = {}

        def submit(unit: Unit) -> None:
            future = client.submit(
                list_unit_task,
                for_tasks,
                unit,
                str(self.folder),
                self.token,
                key=f"list[{self.label}]-{next(count):05d}-{run}",
                pure=False,
            )
            unit_of[future.key] = unit
            pending.add(future)

        for unit in itertools.islice(units, window):
            submit(unit)
        try:
            for future in pending:
                listing = future.result()
                done = unit_of.pop(future.key)
                future.release()
                unit = next(units, None)
                if unit is not None:
                    submit(unit)
                if listing.unread:  # the worker cannot see the list: here
                    listing = list_unit(source, done, self.folder)
                elif listing.packed is not None:  # the worker cannot see the folder
                    writer = PartWriter(self.folder)
                    writer.extend(unpack_rows(listing.packed))
                    listing.parts, listing.packed = writer.close(), None
                yield listing
        finally:
            for future in list(pending.futures):
                future.cancel()
        logger.info("listing %s: %d parts on the cluster", self.label, next(count))
