"""Records kept on disk in parts: a dataset's listing and a plan's sets.

Millions of records do not fit in the client as Python objects (about 370
bytes each), so a listing unit writes what it finds as a *part*: a Parquet
file of rows sorted by path, which any Parquet reader opens without imgindex
(``pandas.read_parquet``; paths are bytes, as file names are). The diff
and the manifest merge parts in path ranges, a Dask task each
(:mod:`pipeline.ranges`), a batch of each part at a time, and write the
plan's sets as parts again (:class:`PartWriter`): the client holds no
records.

In memory a row is a plain tuple, ``(path, row, size, mtime_ns, id, meta)``
with the path as bytes: tuples compare in (path, row) order by themselves,
so sorting and merging them needs no key and no object per row. Bytes order
is not ``str`` order for names that are not UTF-8; parts only need one order
throughout. A build writes its manifest in this order too (a merge of the
kept parts and those of the shards' images); imgindex 0.4 wrote text order,
so the diff puts the index in place's manifest into parts before merging.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgindex.pipeline.atomic import atomic_path
from imgindex.pipeline.discover import ImageRecord, image_id, tapered

SUFFIX = ".parquet"
# What a plan's folders hold: parts, and the diff's ids and the manifest's
# lines with their ids beside them (pipeline/diff.py, pipeline/manifest_merge.py).
OURS = (SUFFIX, ".npy", ".jsonl", ".ids")
# Rows a writer puts in one part; also how many a listing unit holds at once.
ROWS_PER_PART = 20_000
# Rows read from a part at a time while merging, and rows in a row group:
# an open part costs about 260 KiB of buffers at this size (4,096: 970 KiB).
BATCH_ROWS = 512
# Parts merged at once: more are merged in groups first
# (pipeline.ranges.compact_parts).
MERGE_FAN_IN = 64
# A file list's row (0: none), and its other columns as JSON text (or None).
Row = tuple[bytes, int, int, int, int, str | None]
COLUMNS = ("path", "row", "size", "mtime_ns", "id", "meta")


@dataclass(frozen=True)
class Part:
    """One part file and how many rows it holds."""

    file: str
    count: int


def row_of(record: ImageRecord, row: int = 0, meta: str | None = None) -> Row:
    """``record`` as a part's row (its id hashed here, once)."""
    path = record.path
    return (os.fsencode(path), row, record.size, record.mtime_ns, image_id(path), meta)


def record_of(row: Row) -> ImageRecord:
    return ImageRecord(os.fsdecode(row[0]), row[2], row[3])


def _schema():
    import pyarrow as pa

    # Bytes, as the file system gives names: a name need not be UTF-8
    # (os.fsencode's surrogate escapes are not valid Parquet strings).
    return pa.schema(
        [
            ("path", pa.binary()),
            ("row", pa.int64()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("id", pa.int64()),
            ("meta", pa.string()),
        ]
    )


def _table(rows: Sequence[Row]):
    import pyarrow as pa

    columns = list(zip(*rows, strict=True)) if rows else [()] * len(COLUMNS)
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, _schema(), strict=True)],
        schema=_schema(),
    )


def write_part(file: str | os.PathLike, rows: Iterable[Row]) -> Part:
    """Write ``rows`` sorted to ``file`` (atomically)."""
    import pyarrow.parquet as pq

    table = _table(sorted(rows))
    # Opened here: pyarrow takes only UTF-8 paths, and an index's name (its
    # dataset folder's) need not be.
    with atomic_path(Path(file)) as tmp, open(tmp, "wb") as f:
        pq.write_table(table, f, row_group_size=BATCH_ROWS)
    return Part(os.fspath(file), table.num_rows)


def write_merged(file: str | os.PathLike, parts: Sequence[Part]) -> Part:
    """Merge ``parts`` into one part ``file``, streaming (a batch of each
    part in memory at once)."""
    import pyarrow.parquet as pq

    count = 0
    with (
        atomic_path(Path(file)) as tmp,
        open(tmp, "wb") as f,
        pq.ParquetWriter(f, _schema()) as out,
    ):
        merged = merge_parts(parts)
        while batch := list(itertools.islice(merged, 8 * BATCH_ROWS)):
            out.write_table(_table(batch), row_group_size=BATCH_ROWS)
            count += len(batch)
    return Part(os.fspath(file), count)


def iter_part(part: Part) -> Iterator[Row]:
    """The rows of ``part``, in its order, a batch at a time."""
    import pyarrow.parquet as pq

    # Without pre-buffering an open part holds a row group, not its file.
    with open(part.file, "rb") as raw, pq.ParquetFile(raw, pre_buffer=False) as f:
        for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
            yield from zip(*(c.to_pylist() for c in batch.columns), strict=True)


def merge_parts(parts: Iterable[Part]) -> Iterator[Row]:
    """The rows of all ``parts`` (each sorted) in order."""
    return heapq.merge(*(iter_part(p) for p in parts))


def merge_group(parts: Sequence[Part], folder: str | os.PathLike) -> Part:
    """Merge ``parts`` into one part in ``folder``, and remove them."""
    name = f"{uuid.uuid4().hex[:12]}-merged{SUFFIX}"
    merged = write_merged(Path(folder, name), parts)
    for part in parts:
        Path(part.file).unlink(missing_ok=True)
    return merged


def union_rows(*sorted_rows: Iterable[Row]) -> Iterator[Row]:
    """The rows of the sorted streams ``sorted_rows`` merged, each path once
    (the first stream's row wins)."""
    last = None
    for row in heapq.merge(*sorted_rows, key=_path_key):
        if row[0] != last:
            yield row
            last = row[0]


def _path_key(row: Row) -> bytes:
    return row[0]


def with_meta_of(rows: Iterable[Row], source: Iterable[Row]) -> Iterator[Row]:
    """``rows``, each with the meta of ``source``'s row of its path where it
    has one (both in path order: one pass over each)."""
    source = iter(source)
    other = next(source, None)
    for row in rows:
        while other is not None and other[0] < row[0]:
            other = next(source, None)
        if other is not None and other[0] == row[0] and other[5] is not None:
            row = (*row[:5], other[5])
        yield row


class PartWriter:
    """Writes rows into parts of ``folder``, ``rows`` at most each (each
    sorted on its own: rows added in order make parts in order)."""

    def __init__(self, folder: str | os.PathLike, rows: int = ROWS_PER_PART):
        self.folder = Path(folder)
        self.rows = rows
        self.parts: list[Part] = []
        self._pending: list[Row] = []
        # Unique across processes and hosts: workers write into one folder.
        self._prefix = uuid.uuid4().hex[:12]

    def add(self, row: Row) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.rows:
            self._flush()

    def extend(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self.add(row)

    def close(self) -> list[Part]:
        """Write what is pending; the parts written, in order."""
        self._flush()
        return self.parts

    def _flush(self) -> None:
        if self._pending:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"{self._prefix}-{len(self.parts):05d}{SUFFIX}"
            self.parts.append(write_part(self.folder / name, self._pending))
            self._pending = []


def read_rows(file: str, start: int, stop: int) -> list[Row]:
    """Rows [start, stop) of the part ``file``: only the row groups that
    hold them are read."""
    import pyarrow.parquet as pq

    with open(file, "rb") as raw, pq.ParquetFile(raw, pre_buffer=False) as f:
        groups: list[int] = []
        first = offset = 0
        for group in range(f.metadata.num_row_groups):
            n = f.metadata.row_group(group).num_rows
            if offset < stop and offset + n > start:
                first = first if groups else offset
                groups.append(group)
            offset += n
        if not groups:
            return []
        table = f.read_row_groups(groups, columns=list(COLUMNS))
        table = table.slice(start - first, stop - start)
        return list(zip(*(c.to_pylist() for c in table.columns), strict=True))


@dataclass(frozen=True)
class PartSlice(Sequence[ImageRecord]):
    """Rows [start, stop) of one part: a partition as a task carries it, for
    the worker that embeds it to read (about 150 bytes pickled, whatever the
    partition's size). Indexing and iterating read the rows (the client does
    so only for a partition it must split or fail)."""

    file: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("a part's slice takes no step")
            return PartSlice(self.file, self.start + start, self.start + stop)
        return self.records()[i]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records())

    def records(self) -> list[ImageRecord]:
        return [record_of(row) for row in read_rows(self.file, self.start, self.stop)]


class PartRecords:
    """Records kept in parts, read back part after part when iterated:
    what a plan holds instead of a list of records."""

    def __init__(self, parts: Sequence[Part] = ()):
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(p.count for p in self.parts)

    def __bool__(self) -> bool:
        return any(p.count for p in self.parts)

    def __iter__(self) -> Iterator[ImageRecord]:
        for part in self.parts:
            for row in iter_part(part):
                yield record_of(row)

    def with_meta(self) -> Iterator[tuple[ImageRecord, dict | None]]:
        """The records part after part, each with its file list's other
        columns (None where it has none)."""
        for part in self.parts:
            for row in iter_part(part):
                yield record_of(row), None if row[5] is None else json.loads(row[5])

    def slices(self, size: int, tail_threads: int = 0) -> list[PartSlice]:
        """The records in partitions of at most ``size``, as slices of the
        parts (none spans two), the last ones smaller as
        :func:`pipeline.discover.partition_records` makes them."""
        head, small = tapered(len(self), size, tail_threads)
        out: list[PartSlice] = []
        offset = 0  # rows of the parts before this one
        for part in self.parts:
            i = 0
            while i < part.count:
                if offset + i < head:
                    stop = min(part.count, i + size, head - offset)
                else:
                    stop = min(part.count, i + small)
                out.append(PartSlice(part.file, i, stop))
                i = stop
            offset += part.count
        return out

    def without(self, paths: set[str], folder: str | os.PathLike) -> PartRecords:
        """These records but ``paths``, as parts written to ``folder``."""
        return self.where(lambda row: os.fsdecode(row[0]) not in paths, folder)

    def where(
        self, keep: Callable[[Row], bool], folder: str | os.PathLike
    ) -> PartRecords:
        """The records whose rows ``keep`` holds true for, as parts written
        to ``folder``."""
        writer = PartWriter(folder)
        for part in self.parts:
            writer.extend(filter(keep, iter_part(part)))
        return PartRecords(writer.close())

    def __repr__(self) -> str:
        return f"PartRecords({len(self)} records in {len(self.parts)} parts)"


def remove_parts(folder: str | os.PathLike) -> None:
    """Remove the part files in ``folder`` (and their temporary files), and
    the folder if that leaves it empty: nothing else in it is ours."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and (path.suffix in OURS or ".tmp-" in path.name):
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
