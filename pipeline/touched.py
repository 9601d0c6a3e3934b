"""Files touched but not changed: their vectors kept, not embedded again.

A file whose size is what the index in place recorded but whose modification
time is not may hold the same bytes: a dataset copied without its times
(``cp -r``, most uploads to an object store), restored from a backup, or
touched by a sync tool. The diff (:mod:`pipeline.diff`) writes such images'
ids, with the time the index recorded, to files sorted by id. Here each shard
of the index in place that holds one of them reads their files as they are now
and, where the whole file's digest (``digest``, :mod:`pipeline.traits`) is the
one it stored, writes those images' vectors and traits again as a shard of
this build, stamped with the files' new times. The build takes such shards as
it takes an interrupted run's (``pipeline.build._resume``): their images are
not embedded. A file whose digest differs, that changed again since the
listing, or whose shard stored no digest (written before imgindex kept
one) is embedded, as any changed file is.

Tar shards are not looked at: one touched is read again whole.
"""

from __future__ import annotations

import logging
import os
import uuid
import zipfile
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgindex.pipeline.discover import ImageRecord
from imgindex.pipeline.embed import ModelSpec, PartitionResult
from imgindex.pipeline.errors import DecodeError
from imgindex.pipeline.ranges import map_ranges
from imgindex.pipeline.shards import SUFFIX, open_npz, read_shard, spec_key, write_shard
from imgindex.pipeline.sources import Source, holder_stat, image_file
from imgindex.pipeline.traits import file_hashes, file_hashes_of

logger = logging.getLogger(__name__)

# In the plan's folder: the diff's files of touched images, a range each.
TOUCHED = "touched"
# A row of those files: the image's id, and its mtime as the index recorded it.
TOUCHED_ROW = np.dtype([("id", "<i8"), ("mtime_ns", "<i8")])
# The ``worker`` of the shards written here, which tells them from an
# interrupted run's.
RESTAMPED = "touched, unchanged"


def write_touched(pairs: array, folder: str | os.PathLike) -> str:
    """Write ``pairs`` (id, recorded mtime, flattened) to a new file in
    ``folder``, sorted by id; its path ("" for none)."""
    if not pairs:
        return ""
    rows = np.frombuffer(pairs, np.int64).reshape(-1, 2)
    table = np.zeros(len(rows), TOUCHED_ROW)
    table["id"], table["mtime_ns"] = rows[:, 0], rows[:, 1]
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


def restamp_touched(
    given: TouchedInput,
    shards_dir: Path,
    staging: Path,
    seen: tuple[str, str],
    cluster: object = None,
    name: str = "restamp",
    on_done: Callable[[int], None] | None = None,
) -> int:
    """Write this build's shards, into ``staging``, for the touched images
    of ``given`` whose bytes did not change, from the shards in
    ``shards_dir`` (a task each, on ``cluster``'s workers where it is at
    hand): how many images they hold. ``on_done(n)`` as each task's ``n``
    come back."""
    if not given.files:
        return 0
    shards = [str(p) for p in sorted(shards_dir.glob(f"*{SUFFIX}"))]
    if not shards:
        return 0
    found = map_ranges(
        restamp_shard, [given] * len(shards), shards, staging, seen, cluster, name
    )
    total = 0
    for n in found:
        total += n
        if on_done is not None and n:
            on_done(n)
    logger.info("%s: %d touched images kept (same bytes, new time)", name, total)
    return total


def restamp_shard(given: TouchedInput, shard_path: str, staging: str) -> int:
    """The shard of this build for the touched, unchanged images of the
    shard at ``shard_path``, written into ``staging``; how many it holds."""
    try:
        shard = read_shard(shard_path)
        if not _made_alike(shard.info, given) or not shard.info["paths"]:
            return 0
        with open_npz(shard_path) as data:
            ids = data["ids"]
        touched, recorded = _recorded_mtimes(ids, given.files)
        rows = np.flatnonzero(touched)
        if not len(rows):
            return 0
        traits = shard.traits()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        # The build reports damaged shards where it reads them for the index.
        logger.warning("not reusing shard %s (%s)", shard_path, e)
        return 0
    if traits is None:
        return 0
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
        now = _unchanged(given.source, paths[i], size, digest)
        if now is not None:
            same.append(int(i))
            records.append(now)
    if not same:
        return 0
    try:
        _, vectors = shard.arrays()
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        logger.warning("not reusing shard %s (%s)", shard_path, e)
        return 0
    result = PartitionResult(
        ids[same],
        [r.path for r in records],
        vectors[same],
        [],
        RESTAMPED,
        traits=traits[same],
        preprocess=shard.info.get("preprocess"),
    )
    try:
        write_shard(staging, given.spec, records, result)
    except OSError as e:  # embedded instead, where the build says what is wrong
        logger.warning("could not write a shard into %s (%s)", staging, e)
        return 0
    return len(same)


def _made_alike(info: dict, given: TouchedInput) -> bool:
    """Whether a shard's vectors are what this build would make."""
    made_with = info.get("preprocess")
    return (
        info.get("spec") == spec_key(given.spec)
        and "units" not in info  # tar shards' members
        and (
            made_with is None
            or given.preprocess is None
            or made_with == given.preprocess
        )
    )


def _recorded_mtimes(
    ids: np.ndarray, files: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``ids`` are touched images', and the mtime recorded for each
    of those (a search in each of ``files``, memory-mapped)."""
    touched = np.zeros(len(ids), bool)
    recorded = np.zeros(len(ids), np.int64)
    for file in files:
        table = np.load(file, mmap_mode="r")
        if not len(table):
            continue
        at = np.minimum(np.searchsorted(table["id"], ids), len(table) - 1)
        hit = np.asarray(table["id"][at]) == ids
        touched |= hit
        recorded[hit] = np.asarray(table["mtime_ns"][at])[hit]
    return touched, recorded


def _unchanged(source: Source, rel: str, size: int, digest: int) -> ImageRecord | None:
    """The file record of ``rel`` as it is now, if its bytes are the ones
    hashed to ``digest`` (``size`` of them); else None. A file that changes
    while it is read gives None, or a record the build will not match."""
    try:
        before = holder_stat(source, rel)
        if before[0] != size:
            return None
        opened = image_file(source, rel)
        if isinstance(opened, str):
            now = file_hashes(opened).digest
        else:
            now = file_hashes_of(opened.getbuffer()).digest
        if now != digest or holder_stat(source, rel) != before:
            return None
    except (OSError, DecodeError):
        return None
    return ImageRecord(rel, *before)
