"""Listing a dataset in parts: here, one part after another, or as Dask tasks.

A folder tree on a parallel file system answers a few thousand stat calls a
second to one client, and a file list of millions of entries is millions of
stats: so a source is listed in units (sub-trees of a folder, chunks of a
list's rows, batches of tar shards), each one call of :func:`list_unit`.
:class:`Lister` runs them here, in order, until a cluster is at hand, and
hands the rest to its workers as tasks, gathered in order: a small dataset
is listed in less time than a cluster takes to start (and a build that finds
nothing to do starts none), a large one is listed by every worker at once.

The units of a folder's walk are merged as one walk would have listed them
(:func:`merge_walks`): in depth-first sorted order, each folder reached
through symbolic links walked once, at its first path in that order.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.discover import (
    Failure,
    ImageRecord,
    pack_records,
    same_folder,
    unpack_records,
    walk_folder,
)
from pipeline.spans import task_label

if TYPE_CHECKING:
    from pipeline.sources import Source

logger = logging.getLogger(__name__)

# Sub-trees a folder's walk is split into (fewer where the tree has fewer
# folders): enough to keep a few dozen workers busy.
FOLDER_UNITS = 64
LIST_ROWS_PER_UNIT = 10_000
SHARDS_PER_UNIT = 1_000


@dataclass
class Listing:
    """What one unit listed."""

    records: list[ImageRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # (device, inode, path) of each folder a folder's unit entered
    folders: list[tuple[int, int, str]] = field(default_factory=list)
    # records in depth-first sorted order (folders opened one level at a
    # time are not)
    ordered: bool = True


@dataclass(frozen=True)
class Unit:
    """One part of a source's listing: a sub-tree of a folder (``start``),
    or some of a list's entries or of a tar source's shards (``entries``)."""

    start: str = ""
    entries: tuple[str, ...] = ()


def list_unit(source: Source, unit: Unit) -> Listing:
    """List one unit of ``source``, here (:func:`list_unit_packed` is the task)."""
    from pipeline.sources import shard_files, stat_entries

    listing = Listing()
    if source.kind == "folder":
        listing.records = list(
            walk_folder(
                source.base,
                listing.failures,
                start=unit.start,
                entered=listing.folders,
            )
        )
    elif source.kind == "list":
        listing.records = list(stat_entries(source, unit.entries, listing.failures))
    else:
        listing.records = list(shard_files(source, unit.entries, listing.failures))
    return listing


def list_unit_packed(source: Source, unit: Unit) -> tuple[bytes, list, list]:
    """:func:`list_unit` as a Dask task sends it back: the records packed
    (a third of the bytes and of the time of pickling them one by one)."""
    listing = list_unit(source, unit)
    return pack_records(listing.records), listing.failures, listing.folders


def folder_units(base: str, target: int | None = None) -> tuple[Listing, list[Unit]]:
    """Split the walk of ``base`` into at most about ``target`` sub-trees.

    Folders are opened breadth first here until there are ``target`` whose
    sub-trees are left to walk; the images in the folders opened here come
    back as a listing of their own (with the folders opened), beside the
    units of the rest.
    """
    target = target or FOLDER_UNITS
    here = Listing()
    deep = [""]  # sub-trees not opened yet, shallowest first
    while deep and len(deep) < target:
        folder = deep.pop(0)
        children: list[str] = []
        # Each folder knows only its ancestors, as in one walk: which of two
        # paths to one folder is its own is for merge_walks to say, in the
        # walk's order (breadth first here, a link may come first).
        here.records.extend(
            walk_folder(
                base,
                here.failures,
                start=folder,
                entered=here.folders,
                shallow=children,
            )
        )
        deep.extend(children)
    here.ordered = len(here.folders) <= 1
    return here, [Unit(folder) for folder in deep]


def merge_walks(listings: Sequence[Listing]) -> Listing:
    """Listings of parts of one folder tree as one walk would have made them.

    A folder entered at several paths (symbolic links from different parts)
    keeps its images at the first path in depth-first sorted order; under
    the others nothing is listed, and each is one failure row saying where
    its images are.
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
    merged = Listing(failures=failures)
    for listing in listings:
        if not dropped:
            merged.records.extend(listing.records)
            merged.failures.extend(listing.failures)
            continue
        merged.records.extend(
            r for r in listing.records if not any(_under(r.path, d) for d in dropped)
        )
        merged.failures.extend(
            f
            for f in listing.failures
            if not any(_under(f.path, d) and f.path != d for d in dropped)
        )
    listed = [listing for listing in listings if listing.records]
    if len(listed) > 1 or (listed and not listed[0].ordered):
        merged.records.sort(key=lambda r: _order(r.path))
    return merged


def _order(path: str) -> str:
    """Depth-first sorted order, component by component: as one string whose
    separator sorts before any character of a name (no list per path)."""
    return path.replace("/", "\0")


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


class Lister:
    """Runs a source's listing units: here, in order, until ``cluster``
    gives a client (a ``distributed.Client``, or a Future that may resolve
    to one or to None), then the rest as Dask tasks, in order."""

    def __init__(self, cluster: Any = None, label: str = "listing"):
        self.cluster = cluster
        self.label = task_label(label)

    def run(self, source: Source, units: Sequence[Unit]) -> Iterator[Listing]:
        for i, unit in enumerate(units):
            client = self._client()
            if client is not None and len(units) - i > 1:
                yield from self._on_cluster(client, source, units[i:])
                return
            yield list_unit(source, unit)

    def _client(self):
        cluster = self.cluster
        if isinstance(cluster, Future):
            if not cluster.done() or cluster.exception() is not None:
                return None
            return cluster.result()
        return cluster

    def _on_cluster(
        self, client, source: Source, units: Sequence[Unit]
    ) -> Iterator[Listing]:
        run = uuid.uuid4().hex[:8]
        keys = [f"list[{self.label}]-{n:05d}-{run}" for n in range(len(units))]
        futures = client.map(
            list_unit_packed,
            [source.for_tasks()] * len(units),
            list(units),
            key=keys,
            pure=False,
        )
        logger.info("listing %s: %d parts on the cluster", self.label, len(units))
        try:
            for i, future in enumerate(futures):
                packed, failures, folders = future.result()
                futures[i] = None  # its result is not held twice
                yield Listing(unpack_records(packed), failures, folders)
        finally:
            for future in futures:
                if future is not None:
                    future.cancel()
