"""Work on parts in path ranges, a Dask task each.

Parts (:mod:`pipeline.parts`) are each sorted by path, so work that merges
several of them (the diff, the manifest) splits into ranges of paths done
one by one: split at paths taken from the parts' Parquet footers (the first
path of each row group, with its row count: no row is read for it), a range
reads only the row groups of each part that overlap it. Ranges in order give
results in path order. :func:`map_ranges` runs a function over the ranges on
a cluster's workers, or here.
"""

from __future__ import annotations

import heapq
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imgindex.pipeline import parts as part_files
from imgindex.pipeline.parts import BATCH_ROWS, COLUMNS, Part, Row, merge_group
from imgindex.pipeline.spans import task_label

logger = logging.getLogger(__name__)

# Rows a range holds, about: the unit of the tasks (a task holds a batch of
# each part it reads, and what its work keeps per row).
ROWS_PER_RANGE = 250_000

# The file in a plan's folder that tells a worker it sees the client's
# folder (and not another of the same name): it holds the folder's token.
TOKEN_FILE = ".listing"

T = TypeVar("T")
R = TypeVar("R")


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


def path_ranges(
    parts: Sequence[Part], rows_per_range: int | None = None
) -> list[PathRange]:
    """Ranges of about ``rows_per_range`` (:data:`ROWS_PER_RANGE`) rows of
    ``parts`` each, split at the first paths of their row groups (read from
    the footers)."""
    import pyarrow.parquet as pq

    total = sum(p.count for p in parts)
    wanted = -(-total // max(1, rows_per_range or ROWS_PER_RANGE))
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


def merged_in_range(parts: Iterable[Part], within: PathRange) -> Iterator[Row]:
    """The rows of ``parts`` (each sorted) in ``within``, merged in order."""
    return heapq.merge(*(rows_in_range(p, within) for p in parts))


def map_ranges(
    func: Callable[[T, R, str], Any],
    inputs: Sequence[T],
    ranges: Sequence[R],
    work: str | os.PathLike,
    seen: tuple[str, str] | None = None,
    cluster: Any = None,
    name: str = "ranges",
) -> Iterator[Any]:
    """``func(input, range, work)`` for each range, in range order: as tasks
    ``<name>-…`` on ``cluster``'s workers (a Client, or a Future of one)
    where it is at hand and there are several ranges, else here. ``seen``
    is a folder and its token (:class:`pipeline.listing.Lister`): a worker
    that does not see them leaves its range to this process."""
    work = os.fspath(work)
    client = ready_client(cluster) if len(ranges) > 1 and seen else None
    if client is None:
        for given, within in zip(inputs, ranges, strict=True):
            yield func(given, within, work)
        return
    run, n = uuid.uuid4().hex[:8], len(ranges)
    logger.info("%s: %d tasks on the cluster", name, n)
    futures = client.map(
        _range_task,
        [func] * n,
        inputs,
        ranges,
        [work] * n,
        [seen] * n,
        key=[f"{name}-{k:05d}-{run}" for k in range(n)],
        pure=False,
    )
    unseen = 0
    try:
        for given, within, future in zip(inputs, ranges, futures, strict=True):
            result = future.result()
            future.release()
            if isinstance(result, _Unseen):
                unseen += 1
                result = func(given, within, work)
            yield result
        if unseen:
            logger.info(
                "%s: %d of %d done here (the workers do not see %s)",
                name,
                unseen,
                n,
                seen[0],
            )
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)


@dataclass(frozen=True)
class _Unseen:
    """What a range's task returns where it does not see the folder."""


def _range_task(func, given, within, work: str, seen: tuple[str, str]):
    return func(given, within, work) if sees_folder(*seen) else _Unseen()


def compact_parts(
    parts: Sequence[Part],
    folder: str | os.PathLike,
    seen: tuple[str, str] | None = None,
    cluster: Any = None,
    name: str = "merge",
) -> list[Part]:
    """``parts`` merged in groups into ``folder`` until at most
    ``MERGE_FAN_IN`` are left (on the cluster where one is at hand: see
    :func:`map_ranges`), so that a merge of them all holds a batch of few
    parts at once."""
    parts = [p for p in parts if p.count]
    while len(parts) > part_files.MERGE_FAN_IN:
        step = part_files.MERGE_FAN_IN
        groups = [parts[i : i + step] for i in range(0, len(parts), step)]
        merged = map_ranges(
            _merge_group, groups, [None] * len(groups), folder, seen, cluster, name
        )
        parts = list(merged)
    return parts


def _merge_group(group: list[Part], _: None, folder: str) -> Part:
    return group[0] if len(group) == 1 else merge_group(group, folder)


def sees_folder(folder: str, token: str) -> bool:
    """Whether this process sees the client's ``folder`` (not another one
    of that name): its token file holds ``token``."""
    try:
        return Path(folder, TOKEN_FILE).read_text() == token
    except OSError:
        return False


def ready_client(cluster: Any):
    """``cluster``'s Client if it is at hand now: ``cluster`` is a Client, a
    Future that may resolve to one (or to None), or None."""
    if isinstance(cluster, Future):
        if not cluster.done() or cluster.exception() is not None:
            return None
        return cluster.result()
    return cluster


def label(kind: str, name: str) -> str:
    """A task name ``kind[name]``, as the dashboard groups them."""
    return f"{kind}[{task_label(name)}]"
