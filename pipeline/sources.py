"""Where a dataset's images are, how to list them and how a worker reads them.

A dataset is one of three kinds, on a local file system or behind an fsspec
URL (``s3://``, ``gs://``, ``https://``, ``file://``):

- ``folder``: image files under a folder, walked recursively;
- ``list``: a file list, ``.txt`` (one path or URL a line) or ``.csv`` /
  ``.parquet`` with a path column; relative entries are relative to the list;
- ``tar``: tar shards in the WebDataset layout, given as a brace pattern
  (``shards/{00000..00099}.tar``), a folder of ``.tar`` files, one ``.tar``
  file, or a ``.txt`` list of them. A member is addressed as
  ``<shard>/<member>`` (``00007.tar/cat.jpg``). A build plans such a source
  by its shards (a stat each) and the task that embeds a shard finds its
  members in the one sequential pass that reads them (:class:`ShardStream`);
  the service and the duplicate check read single members (:class:`TarReader`).

Every image gets a path relative to its source (the manifest's path, from
which its id is derived), so ids stay stable for the same (source, entry).
Remote files are opened by the workers themselves, with the storage options
of ``imgindex.storage-options`` (or the protocol's usual environment
variables); those options are never written to meta.json or a log.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import re
import stat
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from imgindex.pipeline.discover import (
    THUMBNAILS_MARKER,
    THUMBNAILS_SKIPPED,
    Failure,
    ImageRecord,
    is_image_name,
    partition_records,
)
from imgindex.pipeline.errors import DatasetError, DecodeError
from imgindex.pipeline.listing import (
    LIST_ROWS_PER_UNIT,
    LIST_SPAN_BYTES,
    SHARDS_PER_UNIT,
    Lister,
    Listing,
    SourceListing,
    Unit,
    collect_listings,
    folder_units,
    walk_conflicts,
)
from imgindex.pipeline.parts import PartRecords, PartWriter, record_of, row_of
from imgindex.pipeline.textspans import lines_in_span, spans

KINDS = ("folder", "list", "tar")
INPUT_FORMATS = ("auto", *KINDS)
LIST_SUFFIXES = (".txt", ".csv", ".parquet")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# fsspec reads remote files in blocks this big, ahead of the reader: a tar
# shard streamed from an object store costs a request per 8 MiB, not per member.
_REMOTE_BLOCK = 8 << 20
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Source:
    """A dataset: what its images are, and what their paths are relative to.

    Made by :func:`parse_source`; sent to workers with every task, so it
    holds no open file and no credentials.
    """

    kind: str  # folder | list | tar
    spec: str  # as meta.json records it: absolute path, URL or shard pattern
    base: str  # what entries' paths are relative to (a folder or URL prefix)
    path_column: str = "path"  # of a .csv / .parquet list
    # The shards of a tar source, relative to ``base`` (or absolute / URLs
    # from a list of shards).
    entries: tuple[str, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        """The index's default name: the folder's, the list's or the shards'."""
        if self.kind == "folder":
            return _basename(self.spec)
        if _BRACE.search(self.spec):
            return _basename(self.base)
        if self.kind == "list" or self.spec.lower().endswith(TAR_SUFFIXES):
            return _stem(_basename(self.spec))
        return _basename(self.base)

    @property
    def remote(self) -> bool:
        return is_url(self.base) or is_url(self.spec)

    def location(self, rel: str) -> str:
        """Where the image ``rel`` is, as users see it (search results,
        failures, the report): a path, a URL, or ``<shard path>/<member>``."""
        if is_url(rel) or os.path.isabs(rel):
            return rel
        if is_url(self.base):
            return f"{self.base.rstrip('/')}/{rel}"
        return os.path.join(self.base, rel)

    def local_file(self, rel: str) -> str | None:
        """The plain local file that holds ``rel`` alone, else None (a tar
        member, a URL): such a file is opened by path, as before sources."""
        if self.kind == "tar":
            return None
        where = self.location(rel)
        return None if is_url(where) else where

    def for_tasks(self) -> Source:
        """This source as each task carries it: without the list of shards,
        which only listing needs."""
        return dataclasses.replace(self, entries=())

    @property
    def by_shard(self) -> bool:
        """Whether a build plans whole tar shards, not images: a shard's
        members are found by the task that embeds it, in the same pass."""
        return self.kind == "tar"

    def listing(self, folder: str | os.PathLike, cluster: Any = None) -> SourceListing:
        """List the source into parts in ``folder`` (:mod:`pipeline.parts`):
        its images, or a tar source's shards (path, size, mtime: a shard
        written again is embedded again), with a file list's other columns;
        unusable entries are failure rows.

        Listing goes in parts (:mod:`pipeline.listing`): here until
        ``cluster`` (a Client, or a Future of one) is at hand, then on its
        workers. The client holds a window of units, not the records.
        """
        lister = Lister(folder, cluster, self.name)
        if self.kind == "folder":
            listing = _folder_listing(self, lister)
        else:
            if self.kind == "list":
                units: Iterable[Unit] = _list_units(self)
            else:
                units = _units(self.entries, SHARDS_PER_UNIT)
            listing = collect_listings(lister.run(self, units), [])
        listing.parts = lister.compact(listing.parts)
        listing.token = lister.token
        return listing

    def records(
        self,
        failures: list[Failure],
        metadata: dict[str, dict[str, Any]] | None = None,
        cluster: Any = None,
    ) -> Iterator[ImageRecord]:
        """:meth:`listing`'s records in path order, through a temporary
        folder; unusable entries are appended to ``failures`` (once all are
        given), and a table's other columns to ``metadata`` (path ->
        {column: value})."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="imgindex-listing-") as folder:
            listing = self.listing(folder, cluster)
            for row in listing.items():
                record = record_of(row)
                if row[5] is not None and metadata is not None:
                    metadata[record.path] = json.loads(row[5])
                yield record
            failures.extend(listing.failures)

    def partitions(
        self, records: Sequence[ImageRecord], size: int, tail_threads: int = 0
    ) -> list[Sequence[ImageRecord]]:
        """Split ``records`` into tasks: at most ``size`` images each, or one
        task a tar shard, so that each is read in one pass. Records kept in
        parts give slices of them (:class:`pipeline.parts.PartSlice`)."""
        if self.by_shard:
            return [(r,) for r in records]
        if isinstance(records, PartRecords):
            return records.slices(size, tail_threads)
        return partition_records(records, size, tail_threads)

    def reader(self, rels: Sequence[str]) -> Reader:
        """Reads the images ``rels`` of one task on a worker."""
        if self.kind == "tar":
            return TarReader(self, rels)
        return FileReader(self)


def as_source(source: Source | str) -> Source:
    """``source``, where a plain string is an absolute folder (as task
    arguments were before sources had kinds)."""
    return Source("folder", source, source) if isinstance(source, str) else source


def source_of(meta) -> Source:
    """The source an index's meta.json names (:class:`pipeline.meta.IndexMeta`)."""
    kind = getattr(meta, "source_kind", "folder") or "folder"
    base = getattr(meta, "source_base", "") or meta.source
    return Source(kind, meta.source, base)


def source_fields(source: Source) -> dict[str, str]:
    """What an index's meta.json records of ``source``: the fields
    :func:`source_of` reads back."""
    return {
        "source": source.spec,
        "source_kind": source.kind,
        "source_base": source.base if source.base != source.spec else "",
    }


def place_gone(source: Source) -> bool:
    """Whether the local folder that ``source``'s images are read from is
    no longer there (the dataset moved, or its disk is not mounted); a
    remote source is not looked at."""
    return not source.remote and not os.path.isdir(source.base)


def moved_hint(meta, index_dir: str | os.PathLike) -> str:
    """What to tell a user of the index ``index_dir`` (``meta`` its
    meta.json) whose dataset's place is gone (:func:`place_gone`); "" where
    it is there."""
    source = source_of(meta)
    if not place_gone(source):
        return ""
    root = os.path.dirname(os.path.abspath(index_dir))
    return (
        f"its dataset {source.spec!r} is not there; if it moved, `imgindex build "
        f"NEW_PLACE --out {root} --moved` points the index at it"
    )


def is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def split_member(rel: str) -> tuple[str, str]:
    """``("a/00007.tar", "cat.jpg")`` from ``"a/00007.tar/cat.jpg"``."""
    for suffix in TAR_SUFFIXES:
        at = rel.find(suffix + "/")
        if at >= 0:
            end = at + len(suffix)
            return rel[:end], rel[end + 1 :]
    raise ValueError(f"{rel!r} is not a tar member's path")


def shard_of(path: str) -> str:
    """The tar shard of a member's path (a shard's own path: itself)."""
    try:
        return split_member(path)[0]
    except ValueError:
        return path


def parse_source(
    dataset: str | os.PathLike,
    input_format: str = "auto",
    path_column: str | None = None,
) -> Source:
    """The :class:`Source` a DATASET argument names.

    ``input_format`` ``auto`` tells the kind by the argument's form: a brace
    pattern or a ``.tar`` is tar shards; a ``.txt`` / ``.csv`` / ``.parquet``
    is a file list (a ``.txt`` listing only ``.tar`` files: tar shards); a
    folder holding images is a folder, one holding only ``.tar`` files is
    tar shards.

    Raises
    ------
    DatasetError
        With a one-line reason naming the dataset, if it does not exist, is
        not readable or is not of the kind asked for.
    """
    if input_format not in INPUT_FORMATS:
        raise DatasetError(
            f"unknown --input-format {input_format!r}; use one of {INPUT_FORMATS}"
        )
    text = os.fspath(dataset)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not is_url(text):
        # Resolved, as a folder always was: an index made through a symbolic
        # link is the same dataset as one made through its target.
        text = os.path.realpath(os.path.expanduser(text))
    kind = input_format if input_format != "auto" else _kind_of(text)
    if kind == "tar":
        return _tar_source(text)
    if kind == "list":
        _check_file(text, "file list")
        return Source("list", text, _parent(text), path_column or "path")
    _check_folder(text)
    return Source("folder", text.rstrip("/") or "/", text.rstrip("/") or "/")


def _kind_of(text: str) -> str:
    lowered = text.lower()
    if _BRACE.search(text) or lowered.endswith(TAR_SUFFIXES):
        return "tar"
    if lowered.endswith(LIST_SUFFIXES):
        if lowered.endswith(".txt") and _lists_tars(text):
            return "tar"
        return "list"
    if is_url(text):
        return "folder"
    if os.path.isdir(text) and _holds_only_tars(text):
        return "tar"
    return "folder"


def _lists_tars(text: str) -> bool:
    try:
        rows = _txt_rows(text)
        first = next(rows, None)
        # The first row that is not a shard ends the look (an image list).
        return first is not None and all(
            r.lower().endswith(TAR_SUFFIXES) for r in itertools.chain([first], rows)
        )
    except (OSError, DatasetError):
        return False  # said properly when the list is read


def _holds_only_tars(folder: str) -> bool:
    """Whether ``folder`` holds tar files and no image (the first few looked at)."""
    tars = False
    try:
        for n, (_, _, files) in enumerate(os.walk(folder)):
            for name in files:
                if is_image_name(name):
                    return False
                tars = tars or name.lower().endswith(TAR_SUFFIXES)
            if n > 100:
                break
    except OSError:
        return False
    return tars


def _tar_source(text: str) -> Source:
    if _BRACE.search(text):
        shards = expand_braces(text)
        base = _parent(text.split("{", 1)[0] + "x")
        return Source(
            "tar", text, base, entries=tuple(_relative(s, base) for s in shards)
        )
    if text.lower().endswith(".txt"):
        _check_file(text, "list of tar shards")
        base = _parent(text)
        return Source("tar", text, base, entries=tuple(_txt_rows(text)))
    if text.lower().endswith(TAR_SUFFIXES):
        _check_file(text, "tar shard")
        base = _parent(text)
        return Source("tar", text, base, entries=(_basename(text),))
    _check_folder(text)
    shards = [rel for rel in _find(text) if rel.lower().endswith(TAR_SUFFIXES)]
    if not shards:
        raise DatasetError(f"dataset folder {text!r} holds no .tar shards")
    base = text.rstrip("/")
    return Source("tar", base, base, entries=tuple(sorted(shards)))


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion, as WebDataset writes shard sets:
    ``{00000..00003}`` (zero-padded ranges) and ``{a,b}``.

    Raises
    ------
    DatasetError
        If a range is malformed or expands to over ten million names.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        if abs(int(hi) - int(lo)) >= 10_000_000:
            raise DatasetError(f"shard pattern {pattern!r} names too many shards")
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DatasetError(
            f"shard pattern {pattern!r}: {{{body}}} is neither a range "
            "{first..last} nor a choice {a,b}"
        )
    return [name for o in options for name in expand_braces(head + o + tail)]


# Listing.


def _folder_listing(source: Source, lister: Lister) -> SourceListing:
    if is_url(source.base):
        # One listing call of the store gives every key under the folder.
        fs, root = _fs(source.base)
        found = fs.find(root, detail=True)
        rels = {full[len(root) :].lstrip("/"): info for full, info in found.items()}
        thumbnails = sorted(
            rel[: -len(THUMBNAILS_MARKER)]
            for rel in rels
            if rel.endswith("/" + THUMBNAILS_MARKER)
        )
        writer = PartWriter(lister.folder)
        for rel in sorted(rels):
            info = rels[rel]
            if (
                info.get("type") == "file"
                and is_image_name(rel)
                and not rel.startswith(tuple(thumbnails))
            ):
                writer.add(
                    row_of(ImageRecord(rel, int(info.get("size") or 0), _stamp(info)))
                )
        skipped = [Failure(t.rstrip("/"), THUMBNAILS_SKIPPED) for t in thumbnails]
        return SourceListing(writer.close(), skipped)
    here, units = folder_units(source.base, lister.folder)
    listings: list[Listing] = [here, *lister.run(source, units)]
    dropped, failures = walk_conflicts(listings)
    collected = collect_listings(listings, dropped)
    collected.failures.extend(failures)
    return collected


def _list_units(source: Source) -> Iterator[Unit]:
    """A file list in units: a ``.txt`` in byte spans and a ``.parquet`` in
    runs of row groups that the tasks read themselves (the client reads a
    Parquet file's footer alone), a ``.csv``'s rows read here as a stream,
    ``LIST_ROWS_PER_UNIT`` to a unit (with a row's other columns as JSON
    text)."""
    if source.spec.lower().endswith(".parquet"):
        yield from _parquet_units(source)
        return
    size = _txt_size(source)
    if size is not None:
        for number, span in enumerate(spans(size, LIST_SPAN_BYTES)):
            yield Unit(span=span, number=number)
        return
    rows = enumerate(read_list(source), start=1)
    while chunk := list(itertools.islice(rows, LIST_ROWS_PER_UNIT)):
        yield Unit(
            entries=tuple(entry for _, (entry, _) in chunk),
            rows=tuple(row for row, _ in chunk),
            metas=tuple(
                json.dumps(others) if others else None for _, (_, others) in chunk
            ),
        )


def _parquet_units(source: Source) -> Iterator[Unit]:
    """Runs of a ``.parquet`` list's row groups of ``LIST_ROWS_PER_UNIT``
    rows or more (a row group is never split: a list written in one row
    group is listed by one task)."""
    import pyarrow.parquet as pq

    path = source.spec
    try:
        with _open(path) as f:
            meta = pq.ParquetFile(f).metadata
            names = meta.schema.to_arrow_schema().names
    except OSError as e:
        raise DatasetError(f"cannot read file list {path!r}: {_one_line(e)}") from None
    except Exception as e:  # pyarrow's ArrowInvalid: not a Parquet file
        raise DatasetError(
            f"file list {path!r} is not a Parquet file ({_one_line(e)})"
        ) from None
    if source.path_column not in names:
        raise DatasetError(_no_column(path, source.path_column, names))
    first = rows = number = 0
    for group in range(meta.num_row_groups):
        rows += meta.row_group(group).num_rows
        if rows >= LIST_ROWS_PER_UNIT or group == meta.num_row_groups - 1:
            yield Unit(span=(first, group + 1), number=number, groups=True)
            first, rows, number = group + 1, 0, number + 1


def read_parquet_groups(
    path: str, column: str, first: int, stop: int
) -> Iterator[tuple[str, str | None]]:
    """The entries of the ``.parquet`` list ``path`` in row groups [first,
    stop), each with its row's other columns as JSON text.

    Raises
    ------
    DatasetError
        If the list cannot be read.
    """
    import pyarrow.parquet as pq

    try:
        with _open(path) as f:
            table = pq.ParquetFile(f)
            groups = list(range(first, stop))
            for batch in table.iter_batches(batch_size=8192, row_groups=groups):
                for row in batch.to_pylist():
                    entry = _table_entry(row[column])
                    if entry:
                        others = _others(row, column)
                        yield entry, json.dumps(others) if others else None
    except OSError as e:
        raise DatasetError(f"cannot read file list {path!r}: {_one_line(e)}") from None


def _table_entry(value: Any) -> str:
    """A table's path cell as an entry ("" for none)."""
    return "" if value is None else str(value).strip()


def _txt_size(source: Source) -> int | None:
    """The size of a ``.txt`` list (None: a table, or a size not known)."""
    if source.spec.lower().endswith((".csv", ".parquet")):
        return None
    try:
        if is_url(source.spec):
            fs, path = _fs(source.spec)
            size = fs.size(path)
            return int(size) if size is not None else None
        return os.path.getsize(source.spec)
    except OSError as e:
        raise DatasetError(
            f"cannot read file list {source.spec!r}: {_one_line(e)}"
        ) from None


def read_txt_span(path: str, start: int, end: int) -> Iterator[str]:
    """The entries of the ``.txt`` list ``path`` on the lines that start in
    the byte range [start, end) (blank lines and ``# comments`` left out).

    Raises
    ------
    DatasetError
        If the list cannot be read, or is not text (see :func:`_list_line`).
    """
    try:
        with _open(path) as f:
            for line in lines_in_span(f, start, end):
                entry = list_entry(_list_line(line, path))
                if entry:
                    yield entry
    except OSError as e:
        raise DatasetError(f"cannot read file list {path!r}: {_one_line(e)}") from None


def _units(entries: Sequence[str], per_unit: int) -> list[Unit]:
    return [
        Unit(entries=tuple(entries[i : i + per_unit]))
        for i in range(0, len(entries), per_unit)
    ]


def stat_entry(source: Source, entry: str) -> ImageRecord | Failure:
    """One entry of a list as a record, or the failure row saying why not."""
    where = source.location(entry)
    try:
        if is_url(where):
            if _undecoded(where):
                return Failure(
                    entry, "not UTF-8, as a URL must be (percent-encode other bytes)"
                )
            fs, path = _fs(where)
            info = fs.info(path)
            return ImageRecord(entry, int(info.get("size") or 0), _stamp(info))
        st = os.stat(where)
    except OSError as e:
        return _unstatable(entry, e, "file")
    if not stat.S_ISREG(st.st_mode):
        return Failure(entry, "not a regular file")
    return ImageRecord(entry, st.st_size, st.st_mtime_ns)


def _undecoded(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8 (surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _http_status(e: BaseException) -> int | None:
    """The HTTP status behind ``e``, if a server answered one: fsspec's HTTP
    file system says "not found" for any status it cannot get through, the
    response's own error being the cause (aiohttp's ``status``); s3fs turns
    a 403 into PermissionError, botocore's error being the cause (its
    ``response`` metadata)."""
    for cause in (e, e.__cause__, e.__context__):
        status = getattr(cause, "status", None)
        if isinstance(status, int):
            return status
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def _unstatable(path: str, e: OSError, what: str) -> Failure:
    """The failure row of ``path``, a ``what`` that could not be stat'ed."""
    status = _http_status(e)
    if status is not None and status != 404:
        if status in (401, 403):
            return Failure(path, f"{what}: permission denied (HTTP {status})")
        return Failure(path, f"cannot stat {what}: HTTP {status}")
    if isinstance(e, FileNotFoundError):
        return Failure(path, f"{what} not found")
    if isinstance(e, PermissionError):
        return Failure(path, f"{what}: permission denied")
    return Failure(path, f"cannot stat {what}: {_one_line(e)}")


def read_list(source: Source) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """The entries of a list source, as written, each with the other columns
    of its row (a table's; None for a ``.txt``, whose blank lines and ``#``
    comments are left out): read as a stream, so a list of any length is
    held a batch at a time.

    Raises
    ------
    DatasetError
        If the list cannot be read, or a table has no such path column.
    """
    path = source.spec
    lowered = path.lower()
    try:
        if lowered.endswith(".csv"):
            yield from _csv_rows(path, source.path_column)
        else:
            yield from ((row, None) for row in _txt_rows(path))
    except UnicodeDecodeError:
        raise DatasetError(f"file list {path!r} is not UTF-8 text") from None
    except OSError as e:
        raise DatasetError(f"cannot read file list {path!r}: {_one_line(e)}") from None


def _txt_rows(path: str) -> Iterator[str]:
    with _open(path) as f:
        for line in f:
            row = list_entry(_list_line(line, path))
            if row:
                yield row


def _list_line(line: bytes, path: str) -> str:
    """A ``.txt`` list's line as the file system names files: UTF-8, any
    other byte kept as ``os.fsdecode`` keeps it. A list that ``find`` wrote
    over a disk of Latin-1 names then finds those files, as a walk of the
    folder does, and they get the same ids.

    Raises
    ------
    DatasetError
        On a NUL byte, which no path holds: the list is UTF-16 or no text.
    """
    if b"\0" in line:
        raise DatasetError(
            f"file list {path!r} is not text: it holds NUL bytes (UTF-16? save "
            "it as UTF-8)"
        )
    return line.decode("utf-8", "surrogateescape")


BOM = "\ufeff"


def list_entry(line: str) -> str:
    """A ``.txt`` list's entry on ``line`` ("" for a blank or ``#`` line).

    A byte-order mark is dropped: Windows editors and Excel begin UTF-8 text
    with one, which would otherwise begin the first path."""
    entry = line.lstrip(BOM).strip()
    return "" if entry.startswith("#") else entry


def _csv_rows(path: str, column: str) -> Iterator[tuple[str, dict[str, Any]]]:
    # utf-8-sig: Excel's "CSV UTF-8" begins with a byte-order mark, which
    # would otherwise begin the first column's name.
    with (
        _open(path) as f,
        io.TextIOWrapper(f, encoding="utf-8-sig", newline="") as text,
    ):
        reader = csv.DictReader(text)
        if column not in (reader.fieldnames or ()):
            raise DatasetError(_no_column(path, column, reader.fieldnames or ()))
        for row in reader:
            entry = (row[column] or "").strip()
            if entry:
                yield entry, _others(row, column)


def _others(row: dict[str, Any], column: str) -> dict[str, Any]:
    """A row's columns but the path, as JSON keeps them (dates and other
    types as text)."""
    return {
        str(k): v if v is None or isinstance(v, (str, int, float, bool)) else str(v)
        for k, v in row.items()
        if k != column and k is not None
    }


def _no_column(path: str, column: str, names: Iterable[str]) -> str:
    return (
        f"file list {path!r} has no column {column!r} (it has "
        f"{', '.join(map(repr, names)) or 'none'}); name the path column "
        "with --path-column"
    )


def shard_files(
    source: Source, shards: Sequence[str], failures: list[Failure]
) -> Iterator[ImageRecord]:
    """Tar ``shards`` as records: one stat each (or one listing of each
    remote folder), never a read of their members."""
    remote: dict[str, dict[str, dict]] = {}
    for shard in shards:
        where = source.location(shard)
        try:
            if is_url(where):
                parent, name = where.rsplit("/", 1)
                if parent not in remote:
                    fs, path = _fs(parent)
                    remote[parent] = {
                        info["name"].rstrip("/").rsplit("/", 1)[-1]: info
                        for info in fs.ls(path, detail=True)
                    }
                info = remote[parent].get(name)
                if info is None:
                    raise FileNotFoundError(where)
                yield ImageRecord(shard, int(info.get("size") or 0), _stamp(info))
            else:
                st = os.stat(where)
                yield ImageRecord(shard, st.st_size, st.st_mtime_ns)
        except OSError as e:
            failures.append(_unstatable(shard, e, "tar shard"))


class ShardStream:
    """The image members of tar shards, each shard read in one sequential
    pass (never unpacked to disk): iterating gives ``(path, bytes)`` in the
    shards' own order.

    Meanwhile ``records`` collects each member's record (its size, and its
    shard's mtime) and ``failures`` each shard that cannot be read whole
    (the members before the damage are still given), or holds no image.
    A second member of one name is a failure; the first is given.
    """

    def __init__(self, source: Source, shards: Sequence[ImageRecord]):
        self.source = source
        self.shards = list(shards)
        self.records: list[ImageRecord] = []
        self.failures: list[Failure] = []

    def __iter__(self) -> Iterator[tuple[str, bytearray]]:
        for shard in self.shards:
            yield from self._members(shard)

    def _members(self, shard: ImageRecord) -> Iterator[tuple[str, bytearray]]:
        found = len(self.records)
        seen: set[str] = set()
        try:
            with (
                _open(self.source.location(shard.path)) as f,
                tarfile.open(fileobj=f, mode="r|*") as tar,
            ):
                for member in tar:
                    if not member.isfile() or not is_image_name(member.name):
                        continue
                    rel = f"{shard.path}/{member.name}"
                    if member.name in seen:
                        self.failures.append(
                            Failure(
                                rel,
                                "a second member of that name; the first is indexed",
                            )
                        )
                        continue
                    seen.add(member.name)
                    data = _member_bytes(tar, member)
                    self.records.append(ImageRecord(rel, member.size, shard.mtime_ns))
                    yield rel, data
        except FileNotFoundError:
            self._fail(shard, "tar shard not found (deleted after discovery?)")
            return
        except PermissionError:
            self._fail(shard, "tar shard: permission denied")
            return
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            what = "damaged tar shard" if seen else "not a readable tar shard"
            self._fail(shard, f"{what}: {_one_line(e)}")
            return
        if len(self.records) == found:
            self._fail(shard, "holds no image members")

    def _fail(self, shard: ImageRecord, reason: str) -> None:
        self.failures.append(Failure(shard.path, reason))


# Reading, on the workers.


class Reader:
    """Reads one task's images: ``read(rel)`` gives an image's bytes, or
    raises DecodeError with the reason it cannot."""

    def read(self, rel: str) -> bytearray:
        """The bytes of ``rel`` (mutable, so torch takes them without a copy)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileReader(Reader):
    """Images that are files of their own (folders and file lists)."""

    def __init__(self, source: Source):
        self.source = source

    def read(self, rel: str) -> bytearray:
        where = self.source.location(rel)
        try:
            if is_url(where):
                with _open(where) as f:
                    return bytearray(f.read())
            return read_file(where)
        except OSError as e:
            raise DecodeError(where, _unreadable(e)) from None


def _unreadable(e: OSError) -> str:
    """Why a file could not be read, in a failure row's words."""
    status = _http_status(e)
    if status in (401, 403):
        return f"permission denied (HTTP {status})"
    if status is not None and status != 404:
        return f"cannot read: HTTP {status}"
    if isinstance(e, FileNotFoundError):
        return "file not found (deleted after discovery?)"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot read: {_one_line(e)}"


class TarReader(Reader):
    """The members ``rels`` of tar shards, each shard read in one sequential
    pass, whatever order the members are asked for in and from whichever
    thread: members passed on the way to the one asked for are kept until
    they are asked for (in a WebDataset shard, the order is the same and
    nothing waits). A pass stays open while others are read, up to
    :data:`OPEN_PASSES` of them: pairs of images from two shards (the
    duplicates' check) go back and forth without reading either again."""

    def __init__(self, source: Source, rels: Sequence[str]):
        self.source = source
        self._wanted: dict[str, set[str]] = {}
        for rel in rels:
            shard, member = split_member(rel)
            self._wanted.setdefault(shard, set()).add(member)
        self._lock = threading.Lock()
        self._passes: OrderedDict[str, _TarPass] = OrderedDict()  # oldest first

    def read(self, rel: str) -> bytearray:
        shard, member = split_member(rel)
        with self._lock:
            tar = self._passes.get(shard)
            if tar is None or (member in tar.passed and member not in tar.kept):
                # A shard not open, or a member asked for again: a new pass.
                if tar is not None:
                    tar.close()
                tar = self._passes[shard] = _TarPass(
                    self.source, shard, self._wanted.get(shard, set())
                )
                while len(self._passes) > OPEN_PASSES:
                    self._passes.popitem(last=False)[1].close()
            self._passes.move_to_end(shard)
            while member not in tar.kept:
                if tar.ended is not None:
                    raise DecodeError(self.source.location(rel), tar.ended)
                tar.advance()
            return tar.kept.pop(member)

    def close(self) -> None:
        with self._lock:
            while self._passes:
                self._passes.popitem()[1].close()


# Tar shards a reader keeps open at once (each holds a file and the members
# it went by that are still to be asked for).
OPEN_PASSES = 8


class _TarPass:
    """One forward pass over a tar shard, keeping the ``wanted`` members it
    goes by until they are asked for."""

    def __init__(self, source: Source, shard: str, wanted: set[str]):
        self.wanted = wanted
        self.kept: dict[str, bytearray] = {}  # read on the way, not asked for yet
        self.passed: set[str] = set()  # members this pass has gone by
        self.ended: str | None = None  # why this pass can go no further
        self._file = None
        self._tar: tarfile.TarFile | None = None
        try:
            self._file = _open(source.location(shard))
            # Stream mode: one forward pass, no seeks (a remote shard is read
            # in large blocks; a local one at disk speed).
            self._tar = tarfile.open(fileobj=self._file, mode="r|*")
        except FileNotFoundError:
            self.ended = "its tar shard is gone (deleted after discovery?)"
        except PermissionError:
            self.ended = "its tar shard: permission denied"
        except (tarfile.TarError, EOFError, OSError) as e:
            self.ended = f"its tar shard is unreadable: {_one_line(e)}"

    def advance(self) -> None:
        assert self._tar is not None
        try:
            member = self._tar.next()
            if member is None:
                self.ended = "not in its tar shard (changed after discovery?)"
                return
            name = member.name
            if name in self.wanted and member.isfile() and name not in self.passed:
                self.kept[name] = _member_bytes(self._tar, member)
            self.passed.add(name)
        except (tarfile.TarError, EOFError, OSError) as e:
            self.ended = f"its tar shard is damaged here: {_one_line(e)}"

    def close(self) -> None:
        for handle in (self._tar, self._file):
            if handle is not None:
                try:
                    handle.close()
                except (OSError, tarfile.TarError):
                    pass
        self._tar = self._file = None
        self.kept = {}


class HandOver(Reader):
    """Bytes read already, as a shard's stream went by: each is handed over
    once, to whichever thread decodes it."""

    def __init__(self) -> None:
        self._data: dict[str, bytearray] = {}

    def paths(self, stream: Iterable[tuple[str, bytearray]]) -> Iterator[str]:
        """The paths of ``stream``, their bytes kept until read."""
        for rel, data in stream:
            self._data[rel] = data
            yield rel

    def read(self, rel: str) -> bytearray:
        data = self._data.pop(rel, None)
        if data is None:  # asked twice: a bug, said as a bad image
            raise DecodeError(rel, "read twice from its tar shard's stream")
        return data


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytearray:
    """A tar member's bytes, read where the stream is.

    Raises
    ------
    EOFError
        If the shard ends inside the member.
    """
    data = bytearray(member.size)
    handle = tar.extractfile(member)
    if handle is not None and handle.readinto(data) != member.size:
        raise EOFError("the member is cut short")
    return data


def read_file(path: str) -> bytearray:
    """A local file's bytes, read in one call.

    Raises
    ------
    OSError
        If it cannot be read, or changed size while read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size)
        if f.readinto(data) != size:
            raise OSError("file changed while read")
    return data


def image_file(
    source: Source, rel: str, reader: Reader | None = None
) -> str | io.BytesIO:
    """What Pillow opens for ``rel``: its local path where it is a file of
    its own, else its bytes (read by ``reader``, or alone) as a file named by
    its location, so that errors name it.

    Raises
    ------
    DecodeError
        If its bytes cannot be read.
    """
    local = source.local_file(rel)
    if local is not None:
        return local
    data = reader.read(rel) if reader is not None else _read_alone(source, rel)
    f = io.BytesIO(data)
    f.name = source.location(rel)
    return f


def read_image(source: Source, rel: str) -> bytearray:
    """One image's bytes, read alone (the service).

    Raises
    ------
    DecodeError
        If they cannot be read.
    """
    local = source.local_file(rel)
    if local is not None:
        try:
            return read_file(local)
        except OSError as e:
            raise DecodeError(local, e.strerror or _one_line(e)) from None
    return _read_alone(source, rel)


def _read_alone(source: Source, rel: str) -> bytearray:
    """``rel``'s bytes through a reader of its own (a tar member: one pass
    over its shard, up to it)."""
    with source.reader([rel]) as reader:
        return reader.read(rel)


def holder_stat(source: Source, rel: str) -> tuple[int, int]:
    """(bytes, mtime in ns) of the file that holds ``rel``: the image's own
    file, or its tar shard (a remote one's last-modified time or ETag hash).

    Raises
    ------
    OSError
    """
    holder = split_member(rel)[0] if source.kind == "tar" else rel
    return file_stat(source, holder)


def file_stat(source: Source, rel: str) -> tuple[int, int]:
    """(bytes, mtime in ns) of the file ``rel`` of ``source`` (an image's
    own, or a tar shard), as :func:`holder_stat` gives them.

    Raises
    ------
    OSError
    """
    where = source.location(rel)
    if not is_url(where):
        st = os.stat(where)
        return st.st_size, st.st_mtime_ns
    fs, path = _fs(where)
    info = fs.info(path)
    return int(info.get("size") or 0), _stamp(info)


def content_digest(source: Source, rel: str, reader: Reader | None = None) -> str:
    """The whole image's blake2b digest (hex; :func:`pipeline.traits.file_hash`
    of a file of its own).

    Raises
    ------
    OSError, DecodeError
        If it cannot be read.
    """
    return opened_digest(image_file(source, rel, reader))


def opened_digest(opened: str | os.PathLike | io.BytesIO) -> str:
    """:func:`content_digest` of what :func:`image_file` gives (or of any
    file or bytes).

    Raises
    ------
    OSError
        If a file cannot be read.
    """
    import hashlib

    from imgindex.pipeline.traits import file_hash

    if isinstance(opened, io.BytesIO):
        return hashlib.blake2b(opened.getbuffer(), digest_size=16).hexdigest()
    return file_hash(os.fspath(opened))


# File systems.


def storage_options() -> dict:
    """``imgindex.storage-options``: passed to fsspec as they are (credentials
    among them stay in the config; nothing here writes them anywhere)."""
    import dask.config

    return dict(dask.config.get("imgindex.storage-options", None) or {})


def _fs(url: str):
    import fsspec.core

    return fsspec.core.url_to_fs(url, **storage_options())


def _open(where: str):
    if not is_url(where):
        return open(where, "rb")
    fs, path = _fs(where)
    return fs.open(path, "rb", block_size=_REMOTE_BLOCK, cache_type="readahead")


def _stamp(info: dict) -> int:
    """A remote file's change stamp as an int: its mtime in ns where the
    store gives one, else a hash of its ETag."""
    import hashlib
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    for key in (
        "mtime",
        "LastModified",
        "last_modified",
        "Last-Modified",  # HTTP
        "updated",
        "created",
    ):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return int(value.timestamp() * 1e9)
        try:
            return int(float(value) * 1e9)
        except (TypeError, ValueError):
            pass
        for parse in (datetime.fromisoformat, parsedate_to_datetime):
            try:
                return int(parse(str(value)).timestamp() * 1e9)
            except (TypeError, ValueError, IndexError):
                pass
    tag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "")
    digest = hashlib.blake2b(tag.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _find(folder: str) -> list[str]:
    found = []
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            found.append(os.path.relpath(os.path.join(top, name), folder))
    return found


def _check_folder(text: str) -> None:
    if is_url(text):
        return  # listed by the fsspec file system, which says what is wrong
    if not os.path.exists(text):
        raise DatasetError(f"dataset folder {text!r} does not exist")
    if not os.path.isdir(text):
        raise DatasetError(
            f"dataset {text!r} is not a folder, a file list (.txt, .csv, "
            ".parquet) or a tar shard (.tar)"
        )
    if not os.access(text, os.R_OK | os.X_OK):
        raise DatasetError(f"dataset folder {text!r} is not readable")


def _check_file(text: str, what: str) -> None:
    if is_url(text):
        return
    if not os.path.exists(text):
        raise DatasetError(f"{what} {text!r} does not exist")
    if not os.path.isfile(text):
        raise DatasetError(f"{what} {text!r} is not a file")
    if not os.access(text, os.R_OK):
        raise DatasetError(f"{what} {text!r} is not readable")


def _relative(path: str, base: str) -> str:
    prefix = base.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def _parent(path: str) -> str:
    if is_url(path):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(path) or "."


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _stem(name: str) -> str:
    for suffix in (*TAR_SUFFIXES, *LIST_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _one_line(e: BaseException) -> str:
    from imgindex.pipeline.decode import _one_line as one_line

    return one_line(e)
