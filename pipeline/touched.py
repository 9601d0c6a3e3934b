"""Files touched but not changed: their vectors kept, not embedded again.

A file whose size is what the index in place recorded but whose modification
time is not may hold the same bytes: a dataset copied without its times
(``cp -r``, most uploads to an object store), restored from a backup, or
touched by a sync tool. The diff (:mod:`pipeline.diff`) writes such images'
ids, with the time the index recorded and the time listed now, to files
sorted by id. Here each shard of the index in place that holds one of them
reads their files as they are now and, where a file is as listed and the
whole file's digest (``digest``, :mod:`pipeline.traits`) is the one the shard
stored, writes those images' vectors and traits again as a shard of this
build (in the staging folder's :data:`pipeline.shards.TOUCHED_WORK`), stamped
with the files' new times. The build adds those shards to its own and leaves
their images out of what it embeds: the client holds their ids (8 bytes an
image), never their records. A file whose digest differs, that changed again
since the listing, or whose shard stored no digest (written before imgindex
kept one) is embedded, as any changed file is.

A tar shard touched is read whole on a worker, without decoding: its shard
of the index in place moves to this build's if its members are those it held,
each with the digest stored, and none of them failed.
"""

from __future__ import annotations

import logging
import os
import uuid
import zipfile
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgindex.pipeline.discover import ImageRecord
from imgindex.pipeline.embed import ModelSpec, PartitionResult
from imgindex.pipeline.errors import DecodeError
from imgindex.pipeline.lookup import repeated, rows_in_sorted
from imgindex.pipeline.parts import PartRecords, PartWriter, iter_part
from imgindex.pipeline.ranges import map_ranges
from imgindex.pipeline.shards import (
    SUFFIX,
    TOUCHED_WORK,
    Shard,
    clear_shard_files,
    open_npz,
    read_shard,
    spec_key,
    write_shard,
)
from imgindex.pipeline.sources import (
    ShardStream,
    Source,
    file_stat,
    holder_stat,
    image_file,
    shard_of,
)
from imgindex.pipeline.traits import file_hashes, file_hashes_of

logger = logging.getLogger(__name__)

# In the plan's folder: the diff's files of touched images, a range each.
TOUCHED = "touched"
# A row of those files: the image's id, its mtime as the index recorded it,
# and as the listing found it.
TOUCHED_ROW = np.dtype([("id", "<i8"), ("recorded", "<i8"), ("listed", "<i8")])
# The ``worker`` of the shards written here.
RESTAMPED = "touched, unchanged"


def write_touched(rows: array, folder: str | os.PathLike) -> str:
    """Write ``rows`` (id, recorded mtime, listed mtime: flattened) to a new
    file in ``folder``, sorted by id; its path ("" for none)."""
    if not rows:
        return ""
    columns = np.frombuffer(rows, np.int64).reshape(-1, 3)
    table = np.zeros(len(columns), TOUCHED_ROW)
    for k, name in enumerate(TOUCHED_ROW.names):
        table[name] = columns[:, k]
    table.sort(order="id")
    Path(folder).mkdir(exist_ok=True)
    path = Path(folder, f"{uuid.uuid4().hex[:12]}.npy")
    np.save(path, table)
    return str(path)


@dataclass(frozen=True)
class TouchedInput:
    """What each shard's task reads: the diff's files of touched images, the
    dataset, and what this build's vectors are made with (a shard made
    otherwise is not reused)."""

    files: tuple[str, ...]
    source: Source
    spec: ModelSpec
    preprocess: dict | None
    # Tar shards touched: (path, its members' recorded mtime, size and mtime
    # listed now). A shard is read whole, each member's digest checked.
    units: tuple[tuple[str, int, int, int], ...] = ()


@dataclass(frozen=True)
class Restamped:
    """What a shard's task wrote: a shard (its file name, "" for none), its
    images' ids, and the bytes of the tar shards it took (0 for files)."""

    shard: str = ""
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    nbytes: int = 0


def restamp_touched(
    given: TouchedInput,
    shards_dir: Path,
    staging: Path,
    seen: tuple[str, str] | None,
    cluster: object = None,
    name: str = "restamp",
) -> Iterator[tuple[Path, Restamped]]:
    """Write this build's shards, into ``staging``'s
    :data:`~pipeline.shards.TOUCHED_WORK`, for the touched images of
    ``given`` whose bytes did not change, from the shards in ``shards_dir``
    (a task each, on ``cluster``'s workers where it is at hand): each shard
    written, with what its task says of it, as the task comes back."""
    folder = staging / TOUCHED_WORK
    clear_shard_files(folder)  # an interrupted run's: written again now
    shards = [str(p) for p in sorted(shards_dir.glob(f"*{SUFFIX}"))]
    if not (given.files or given.units) or not shards:
        return
    found = map_ranges(
        restamp_shard, [given] * len(shards), shards, folder, seen, cluster, name
    )
    for one in found:
        if one.shard:
            yield folder / one.shard, one


def claimed_once(
    written: Sequence[tuple[Path, Restamped]],
) -> tuple[list[tuple[Path, Restamped]], list[tuple[Path, Restamped]]]:
    """(those of ``written`` to use, those to drop): a shard that holds an
    image an earlier one holds is dropped whole, and its images embedded, as
    :func:`pipeline.shards.usable_shards` does (two shards of the index in
    place with one file's record: about never)."""
    every = np.concatenate([np.zeros(0, np.int64), *(w.ids for _, w in written)])
    twice = set(repeated(np.sort(every)))
    if not twice:
        return list(written), []
    use, drop = [], []
    claimed: set[int] = set()
    for path, one in written:
        shared = twice.intersection(one.ids.tolist())
        if shared & claimed:
            drop.append((path, one))
        else:
            claimed |= shared
            use.append((path, one))
    return use, drop


def without_ids(
    records: PartRecords, ids: np.ndarray, folder: str | os.PathLike
) -> PartRecords:
    """``records`` but those whose id is in ``ids`` (sorted), as parts written
    to ``folder``: a part at a time, never all of them at once."""
    if not len(ids):
        return records
    writer = PartWriter(folder)
    for part in records.parts:
        rows = list(iter_part(part))
        theirs = np.fromiter((row[4] for row in rows), np.int64, len(rows))
        out = np.isin(theirs, ids, assume_unique=True)
        writer.extend(row for row, drop in zip(rows, out, strict=True) if not drop)
    return PartRecords(writer.close())


def restamp_shard(given: TouchedInput, shard_path: str, folder: str) -> Restamped:
    """The shard of this build for the touched, unchanged images of the
    shard at ``shard_path``, written into ``folder``."""
    try:
        shard = read_shard(shard_path)
        if not _made_alike(shard.info, given) or not shard.info["paths"]:
            return Restamped()
        if "units" in shard.info:
            return _restamp_units(given, shard, folder)
        with open_npz(shard_path) as data:
            ids = data["ids"]
        touched, recorded, listed = _touched_rows(ids, given.files)
        rows = np.flatnonzero(touched)
        if not len(rows):
            return Restamped()
        traits = shard.traits()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        # The build reports damaged shards where it reads them for the index.
        logger.warning("not reusing shard %s (%s)", shard_path, e)
        return Restamped()
    if traits is None:
        return Restamped()
    paths = shard.info["paths"]
    held = {paths[i] for i in rows}
    # The shard's record of each: the one the index in place holds only if
    # its time is the recorded one (an older shard may hold an older file).
    stamps = {p: (s, m) for p, s, m in shard.info["records"] if p in held}
    same: list[int] = []
    records: list[ImageRecord] = []
    for i in rows:
        size, mtime = stamps.get(paths[i], (-1, -1))
        digest = int(traits["digest"][i])
        if mtime != recorded[i] or not digest:
            continue
        now = ImageRecord(paths[i], size, int(listed[i]))
        if _unchanged(given.source, now, digest):
            same.append(int(i))
            records.append(now)
    if not same:
        return Restamped()
    try:
        return _moved(shard, same, traits, records, given, folder)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        logger.warning("not reusing shard %s (%s)", shard_path, e)
        return Restamped()


def _moved(
    shard: Shard,
    rows: list[int],
    traits: np.ndarray,
    records: list[ImageRecord],
    given: TouchedInput,
    folder: str,
    units: list[ImageRecord] | None = None,
) -> Restamped:
    """A shard of this build in ``folder`` holding ``shard``'s ``rows``,
    their files as listed now ``records`` (members of the tar shards
    ``units``, for a tar source).

    Raises
    ------
    OSError, ValueError, zipfile.BadZipFile
        If ``shard`` is damaged.
    """
    ids, vectors = shard.arrays()
    result = PartitionResult(
        ids[rows],
        [r.path for r in records],
        vectors[rows],
        [],
        RESTAMPED,
        traits=traits[rows],
        preprocess=shard.info.get("preprocess"),
        records=None if units is None else records,
    )
    try:
        name = write_shard(
            folder, given.spec, records if units is None else units, result
        )
    except OSError as e:  # embedded instead, where the build says what is wrong
        logger.warning("could not write a shard into %s (%s)", folder, e)
        return Restamped()
    nbytes = sum(u.size for u in units or ())
    return Restamped(name, np.asarray(ids[rows], np.int64), nbytes)


def _restamp_units(given: TouchedInput, shard: Shard, folder: str) -> Restamped:
    """:func:`restamp_shard` for a partition of tar shards: those of its
    shards that are touched, hold no failed member and read now member for
    member as they were (names, sizes, digests) move to this build's shard,
    stamped with their new time.

    Raises
    ------
    OSError, ValueError, zipfile.BadZipFile
        If the shard is damaged.
    """
    touched = {path: rest for path, *rest in given.units}
    failed = {shard_of(f[0]) for f in shard.info["failures"]}
    candidates = [
        ImageRecord(path, size, touched[path][2])
        for path, size, mtime in shard.info["units"]
        if path in touched
        and path not in failed
        and touched[path][0] == mtime
        and touched[path][1] == size
    ]
    if not candidates:
        return Restamped()
    traits = shard.traits()
    if traits is None:
        return Restamped()
    row_at = {p: i for i, p in enumerate(shard.info["paths"])}
    sizes = {p: size for p, size, _ in shard.info["records"]}
    units, rows, records = [], [], []
    for unit in candidates:
        held = [p for p in sizes if shard_of(p) == unit.path]
        found = _same_members(given.source, unit, held, sizes, row_at, traits)
        if found is not None:
            units.append(unit)
            rows += [row_at[r.path] for r in found]
            records += found
    if not rows:
        return Restamped()
    return _moved(shard, rows, traits, records, given, folder, units)


def _same_members(
    source: Source,
    unit: ImageRecord,
    held: list[str],
    sizes: dict[str, int],
    row_at: dict[str, int],
    traits: np.ndarray,
) -> list[ImageRecord] | None:
    """The member records of the tar shard ``unit`` (as listed now), if it
    is as listed before and after it is read and its image members are
    ``held``, each of its recorded size and digest; else None."""
    stamp = (unit.size, unit.mtime_ns)
    try:
        if file_stat(source, unit.path) != stamp:
            return None
        stream = ShardStream(source, [unit])
        for rel, data in stream:
            row = row_at.get(rel)
            digest = int(traits["digest"][row]) if row is not None else 0
            if not digest or file_hashes_of(data).digest != digest:
                return None
        if file_stat(source, unit.path) != stamp:
            return None
    except (OSError, DecodeError):
        return None
    found = stream.records
    if stream.failures or sorted(r.path for r in found) != sorted(held):
        return None
    if any(sizes[r.path] != r.size for r in found):
        return None
    return found


def _made_alike(info: dict, given: TouchedInput) -> bool:
    """Whether a shard's vectors are what this build would make."""
    made_with = info.get("preprocess")
    return info.get("spec") == spec_key(given.spec) and (
        made_with is None or given.preprocess is None or made_with == given.preprocess
    )


def _touched_rows(
    ids: np.ndarray, files: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which of ``ids`` are touched images', and for each of those the mtime
    recorded and the one listed (a search in each of ``files``,
    memory-mapped)."""
    touched = np.zeros(len(ids), bool)
    recorded = np.zeros(len(ids), np.int64)
    listed = np.zeros(len(ids), np.int64)
    for file in files:
        table = np.load(file, mmap_mode="r")
        at = rows_in_sorted(table["id"], ids)
        hit = at >= 0
        touched |= hit
        recorded[hit] = table["recorded"][at[hit]]
        listed[hit] = table["listed"][at[hit]]
    return touched, recorded, listed


def _unchanged(source: Source, listed: ImageRecord, digest: int) -> bool:
    """Whether the file of ``listed`` is as listed, before and after it is
    read, and its bytes are the ones hashed to ``digest``."""
    try:
        if holder_stat(source, listed.path) != (listed.size, listed.mtime_ns):
            return False
        opened = image_file(source, listed.path)
        if isinstance(opened, str):
            now = file_hashes(opened).digest
        else:
            now = file_hashes_of(opened.getbuffer()).digest
        stamp = holder_stat(source, listed.path)
    except (OSError, DecodeError):
        return False
    return now == digest and stamp == (listed.size, listed.mtime_ns)
