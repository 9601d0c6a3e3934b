"""Records kept on disk in parts: a dataset's listing and a plan's sets.

Millions of records do not fit in the client as Python objects (about 370
bytes each), so a listing unit writes what it finds as a *part*: a Parquet
file of rows sorted by path, which any Parquet reader opens without imgindex
(``pandas.read_parquet``; paths are bytes, as file names are). Planning
merges the parts in one streaming pass, a batch of each at a time
(:func:`merge_parts`), and writes the plan's sets as parts again
(:class:`PartWriter`); the client holds a batch per part, never the records.
"""

from __future__ import annotations

import heapq
import itertools
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import atomic_path
from pipeline.discover import ImageRecord, image_id

SUFFIX = ".parquet"
# Rows a writer puts in one part; also how many a listing unit holds at once.
ROWS_PER_PART = 100_000
# Rows read from a part at a time while merging, and rows in a row group:
# an open part costs about 260 KiB of buffers at this size (4,096: 970 KiB).
BATCH_ROWS = 512
# Parts merged at once: more are merged in groups first (merge_in_groups).
MERGE_FAN_IN = 64
_COLUMNS = ("path", "size", "mtime_ns", "id", "row", "meta")


@dataclass(frozen=True)
class Part:
    """One part file and how many rows it holds."""

    file: str
    count: int


@dataclass(frozen=True, slots=True)
class Listed:
    """A record as a listing found it: with its row in a file list (0 where
    there is none) and the list's other columns as JSON text (or None)."""

    record: ImageRecord
    row: int = 0
    meta: str | None = None
    known_id: int = -1  # the record's id where a part gave it (hashed once)

    @property
    def id(self) -> int:
        return self.known_id if self.known_id >= 0 else image_id(self.record.path)

    @property
    def order(self) -> tuple[str, int]:
        return self.record.path, self.row


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            # Bytes, as the file system gives names: a name need not be UTF-8
            # (os.fsencode's surrogate escapes are not valid Parquet strings).
            ("path", pa.binary()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("id", pa.int64()),
            ("row", pa.int64()),
            ("meta", pa.string()),
        ]
    )


def write_part(file: str | os.PathLike, items: Sequence[Listed]) -> Part:
    """Write ``items`` sorted by (path, row) to ``file`` (atomically)."""
    import pyarrow.parquet as pq

    ordered = sorted(items, key=lambda x: x.order)
    table = _table(ordered)
    # Opened here: pyarrow takes only UTF-8 paths, and an index's name (its
    # dataset folder's) need not be.
    with atomic_path(Path(file)) as tmp, open(tmp, "wb") as f:
        pq.write_table(table, f, row_group_size=BATCH_ROWS)
    return Part(os.fspath(file), len(ordered))


def write_merged(file: str | os.PathLike, parts: Sequence[Part]) -> Part:
    """Merge ``parts`` into one part ``file``, streaming (a batch of each
    part in memory at once)."""
    import pyarrow.parquet as pq

    schema = _schema()
    count = 0
    with (
        atomic_path(Path(file)) as tmp,
        open(tmp, "wb") as f,
        pq.ParquetWriter(f, schema) as out,
    ):
        merged = merge_parts(parts)
        while batch := list(itertools.islice(merged, 8 * BATCH_ROWS)):
            out.write_table(_table(batch), row_group_size=BATCH_ROWS)
            count += len(batch)
    return Part(os.fspath(file), count)


def _table(items: Sequence[Listed]):
    import pyarrow as pa

    return pa.Table.from_pydict(
        {
            "path": [os.fsencode(x.record.path) for x in items],
            "size": [x.record.size for x in items],
            "mtime_ns": [x.record.mtime_ns for x in items],
            "id": [x.id for x in items],
            "row": [x.row for x in items],
            "meta": [x.meta for x in items],
        },
        schema=_schema(),
    )


def iter_part(part: Part) -> Iterator[Listed]:
    """The rows of ``part``, in its order, a batch at a time."""
    import pyarrow.parquet as pq

    # Without pre-buffering an open part holds a row group, not its file.
    with open(part.file, "rb") as raw, pq.ParquetFile(raw, pre_buffer=False) as f:
        for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=list(_COLUMNS)):
            cols = batch.to_pydict()
            for path, size, mtime, id_, row, meta in zip(
                cols["path"],
                cols["size"],
                cols["mtime_ns"],
                cols["id"],
                cols["row"],
                cols["meta"],
                strict=True,
            ):
                record = ImageRecord(os.fsdecode(path), size, mtime)
                yield Listed(record, row, meta, id_)


def merge_parts(parts: Iterable[Part]) -> Iterator[Listed]:
    """The rows of all ``parts`` (each sorted) in (path, row) order."""
    return heapq.merge(*(iter_part(p) for p in parts), key=lambda x: x.order)


class PartWriter:
    """Writes rows into parts of ``folder``, ``rows`` at most each (each
    sorted on its own: rows added in order make parts in order)."""

    def __init__(self, folder: str | os.PathLike, rows: int = ROWS_PER_PART):
        self.folder = Path(folder)
        self.rows = rows
        self.parts: list[Part] = []
        self._pending: list[Listed] = []
        # Unique across processes and hosts: workers write into one folder.
        self._prefix = uuid.uuid4().hex[:12]

    def add(self, item: Listed) -> None:
        self._pending.append(item)
        if len(self._pending) >= self.rows:
            self._flush()

    def extend(self, items: Iterable[Listed]) -> None:
        for item in items:
            self.add(item)

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
            for item in iter_part(part):
                yield item.record

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PartRecords | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"PartRecords({len(self)} records in {len(self.parts)} parts)"


def remove_parts(folder: str | os.PathLike) -> None:
    """Remove the part files in ``folder`` (and their temporary files), and
    the folder if that leaves it empty: nothing else in it is ours."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and (path.suffix == SUFFIX or ".tmp-" in path.name):
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
