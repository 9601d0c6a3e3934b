"""Plan a build: discover the dataset and diff it against the index in place."""

from __future__ import annotations

import itertools
import os
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgindex.pipeline.diff import EMBED, IDS, KEPT, RangeInput, diff_listing
from imgindex.pipeline.discover import Failure, ImageRecord, image_id
from imgindex.pipeline.embed import ModelSpec
from imgindex.pipeline.errors import DatasetError, IndexDirError
from imgindex.pipeline.listing import SourceListing
from imgindex.pipeline.parts import (
    SUFFIX,
    Part,
    PartRecords,
    PartWriter,
    iter_part,
    record_of,
    remove_parts,
    row_of,
    write_part,
)
from imgindex.pipeline.ranges import TOKEN_FILE, compact_parts, label, map_ranges
from imgindex.pipeline.sources import Source, is_url, shard_of
from imgindex.pipeline.store import (
    MANIFEST_FILE,
    StoredIndex,
    foreign_entries,
    is_empty_dir,
    is_index_dir,
    iter_manifest,
    read_index_dir,
)
from imgindex.pipeline.textspans import spans
from imgindex.pipeline.touched import TOUCHED


@dataclass
class Plan:
    """What a build must do: the incremental diff against the index in place.

    ``kept`` is kept in parts on disk (:mod:`pipeline.parts`), and so is
    ``to_embed`` for a folder or a file list, in path order (for tar shards
    ``kept`` is in parts each in order: merge them): millions of them never
    sit in the client while planning.
    """

    kept: PartRecords
    to_embed: Sequence[ImageRecord]
    added: int
    updated: int
    removed: int
    known_failures: list[Failure]  # found while planning: no task needed
    unchanged: int
    previous: StoredIndex | None
    # The files behind the known failures that are not the listing's own
    # (those it found unusable have none).
    known_records: list[ImageRecord] = field(default_factory=list)
    # Tar shards: ``to_embed`` are shards and ``kept`` their images.
    by_shard: bool = False
    # A table's other columns: their names, and a digest of their values
    # (the values travel in the parts' rows into the manifest).
    metadata_columns: list[str] = field(default_factory=list)
    metadata_digest: str = ""
    # The listing's token: workers that see the plan's folder hold it
    # (pipeline.ranges.sees_folder).
    token: str = ""
    # Where the index in place says its dataset was, if it has moved here
    # since (--moved); "" if not.
    moved_from: str = ""
    # Files of the images to embed whose size is as the index in place
    # recorded but not their mtime: their bytes may be the same
    # (pipeline.touched), and how many images they name.
    touched: list[str] = field(default_factory=list)
    n_touched: int = 0
    # Tar shards: those to embed read at one time and listed at another
    # (path, recorded mtime, listed size and mtime).
    touched_units: list[tuple[str, int, int, int]] = field(default_factory=list)


def plan_dir(dest: Path) -> Path:
    """Where planning keeps its parts while a build runs: beside the index."""
    return dest.parent / f".{dest.name}.plan"


def clear_plan(work: Path) -> None:
    """Remove a plan's parts (and the folder, where nothing else is in it)."""
    (work / LISTING / TOKEN_FILE).unlink(missing_ok=True)
    for sub in (
        LISTING,
        PREVIOUS,
        EMBED,
        KEPT,
        IDS,
        TOUCHED,
        REMAINING,
        INDEXED,
        MANIFEST,
    ):
        remove_parts(work / sub)
    remove_parts(work)


# The plan's folders: the listing's parts, the index in place's manifest
# (then the diff's own: pipeline.diff), what is left to embed after a
# resume; then what the shards hold, and the manifest (kept and indexed
# merged).
LISTING, PREVIOUS, REMAINING = "listing", "previous", "remaining"
INDEXED, MANIFEST = "indexed", "manifest"


def plan_build(
    source: Source,
    dest: Path,
    spec: ModelSpec,
    rebuild: bool,
    cluster: Any = None,
    moved: bool = False,
) -> Plan:
    """List ``source`` and diff it against the index at ``dest``; the listing
    goes to ``cluster``'s workers once it is at hand (a Client, or a Future
    of one: :class:`pipeline.listing.Lister`). The plan's parts stay in
    :func:`plan_dir` until :func:`clear_plan`. ``moved``: an index in place
    that names another dataset of the same kind is this one's, moved here;
    its images are matched by their paths within the dataset.

    Raises
    ------
    DatasetError, IndexDirError
        If the dataset is empty, or ``dest`` is not an index this build may
        replace (another dataset's, another model's, not imgindex's at all).
    """
    root = Path(source.base)
    if not source.remote and (dest == root or root.is_relative_to(dest)):
        raise IndexDirError(
            f"the index would be written to {str(dest)!r}, which holds the dataset "
            "itself; choose an --out outside the dataset's parent folder"
        )
    previous = None
    if dest.exists() and not is_empty_dir(dest):
        # Checked with --rebuild too: replacing the index directory deletes
        # it, and a folder that is not ours may hold anything.
        if not is_index_dir(dest):
            extra = foreign_entries(dest)
            what = f"it holds {extra[0]!r}" if extra else "its meta.json is not ours"
            raise IndexDirError(
                f"{str(dest)!r} exists and is not an imgindex index ({what}); "
                "imgindex never replaces it: choose another --out or --name"
            )
        if not rebuild:
            previous = read_index_dir(dest, streamed=True)
    work = plan_dir(dest)
    try:
        moved_from = ""
        if previous is not None:
            moved_from = _check_compatible(previous, dest, source, spec, moved)
        clear_plan(work)  # an interrupted build's
        listing = source.listing(work / LISTING, cluster)
        if not listing.count and not listing.failures:
            raise DatasetError(f"dataset {source.spec!r} contains no image files")
        if source.by_shard:
            shards = [record_of(row) for row in listing.items()]
            plan = _plan_shards(shards, listing.failures, previous, work)
            plan.token = listing.token
        else:
            plan = _diff(listing, previous, work, cluster, source.name)
        plan.moved_from = moved_from
        return plan
    except BaseException:
        if previous is not None:
            previous.close()  # its index file stays open until read or closed
        clear_plan(work)
        raise


def _diff(
    listing: SourceListing,
    previous: StoredIndex | None,
    work: Path,
    cluster: Any = None,
    name: str = "dataset",
) -> Plan:
    """The listing's parts against the index in place, in path ranges (on
    the workers where ``cluster`` is at hand: :mod:`pipeline.diff`): the
    images to embed and those kept go to parts of their own."""
    seen = (str(work / LISTING), listing.token)
    old_bad = {
        f.path: (previous.failed_records[f.path], f)
        for f in (previous.failures if previous else ())
        if f.path in previous.failed_records
    }
    given = RangeInput(
        listing=tuple(listing.parts),
        previous=tuple(_previous_parts(previous, work, seen, cluster, name)),
        dropped=listing.dropped_bytes,
        old_bad=old_bad,
        first_build=previous is None,
    )
    found = diff_listing(given, work, seen, cluster, name)
    listing.add_listed_again(found.again)
    kept_records, to_embed = PartRecords(found.kept), PartRecords(found.embed)
    known_records, known_bad = found.known_records, found.known_bad
    if found.twice:
        # About never: the parts are written again without them (the first
        # ones stay until the plan is cleared).
        collided = _id_collisions(
            found.twice, [*kept_records.parts, *to_embed.parts], known_records
        )
        kept_records = kept_records.without(set(collided), work / KEPT)
        to_embed = to_embed.without(set(collided), work / EMBED)
        known_records = [r for r in known_records if r.path not in collided]
        known_bad = [f for f in known_bad if f.path not in collided]
        listing.failures.extend(collided.values())
    n_embed = len(to_embed)
    updated = min(found.updated, n_embed)
    return Plan(
        kept=kept_records,
        to_embed=to_embed,
        added=n_embed - updated,
        updated=updated,
        removed=found.old - found.still_there,
        known_failures=listing.failures + known_bad,
        unchanged=len(kept_records) + len(known_bad),
        previous=previous,
        known_records=known_records,
        metadata_columns=sorted(found.metadata.columns),
        metadata_digest=found.metadata.hexdigest(),
        token=listing.token,
        touched=found.touched,
        n_touched=found.n_touched,
    )


def _previous_parts(
    previous: StoredIndex | None,
    work: Path,
    seen: tuple[str, str],
    cluster: Any = None,
    name: str = "dataset",
) -> list[Part]:
    """``previous``'s manifest as parts, read in byte spans (on ``cluster``'s
    workers where it is at hand: :func:`pipeline.ranges.map_ranges`), each
    span's records sorted into a part: the manifest need not be in bytes
    order (those of imgindex 0.4 and before are in text order).

    Raises
    ------
    IndexDirError
        If the manifest is malformed or disagrees with meta.json.
    """
    if previous is None:
        return []
    folder = previous.folder
    size = (folder / MANIFEST_FILE).stat().st_size
    pieces = spans(size, MANIFEST_SPAN_BYTES)
    read = map_ranges(
        _span_part,
        [str(folder)] * len(pieces),
        pieces,
        work / PREVIOUS,
        seen,
        cluster,
        label("previous", name),
    )
    parts = list(read)
    previous.check_count(sum(p.count for p in parts))
    return compact_parts(parts, work / PREVIOUS, seen, cluster, label("merge", name))


# Bytes of a manifest a task reads into a part (about 35,000 rows).
MANIFEST_SPAN_BYTES = 4 << 20


def _span_part(folder: str, span: tuple[int, int], out: str) -> Part:
    """The manifest rows of the index ``folder`` that start in ``span``, as a
    part in ``out``."""
    os.makedirs(out, exist_ok=True)
    rows = (row_of(r) for r in iter_manifest(folder, span))
    return write_part(Path(out, f"{uuid.uuid4().hex[:12]}{SUFFIX}"), rows)


def _check_compatible(
    previous: StoredIndex, dest: Path, source: Source, spec: ModelSpec, moved: bool
) -> str:
    """Where the index in place says its dataset was, if not at ``source``
    but ``moved`` allows it ("" if it is ``source``'s).

    Raises
    ------
    IndexDirError
        If the index in place is another dataset's (unless ``moved``) or
        another model's.
    """
    held, held_kind = previous.meta.source, previous.meta.source_kind or "folder"
    moved_from = ""
    if held != source.spec and Path(held) != Path(source.spec):
        if not moved:
            # A shard pattern names no one file to look for.
            missing = held_kind != "tar" and not (is_url(held) or os.path.lexists(held))
            gone = ", now gone" if missing else ""
            raise IndexDirError(
                f"index {str(dest)!r} holds another dataset ({held!r}{gone}), not "
                f"{source.spec!r}; pass --moved if it is that dataset moved here "
                "(only new and changed images are embedded), --name to give this "
                "one another name, or --rebuild to replace that index"
            )
        if held_kind != source.kind:
            raise IndexDirError(
                f"index {str(dest)!r} holds a {_KIND_NAMES[held_kind]} ({held!r}), "
                f"not a {_KIND_NAMES[source.kind]} like {source.spec!r}: --moved "
                "keeps an index only for a dataset of its kind; give this one "
                "another name with --name, or pass --rebuild to replace that index"
            )
        moved_from = held
    model = previous.meta.model
    if model != spec.name:
        raise IndexDirError(
            f"index {str(dest)!r} was built with model {model!r}, not {spec.name!r}; "
            "pass --rebuild to replace it, or choose another --out"
        )
    return moved_from


_KIND_NAMES = {"folder": "folder", "list": "file list", "tar": "set of tar shards"}


def _plan_shards(
    shards: list[ImageRecord],
    discovery_failures: list[Failure],
    previous: StoredIndex | None,
    work: Path,
) -> Plan:
    """The diff of tar shards against the index in place: a shard whose
    images (and failed images) were all indexed from it as it is now is kept
    whole; any other is embedded whole. Image counts of a shard embedded
    again are known only once it is read: ``added`` stays 0 here, and
    ``updated`` counts the images it held before. The index in place is read
    in one pass, its images of shards unchanged since going to parts: the
    client holds a few numbers a shard, not its images."""
    now = {s.path: s.mtime_ns for s in shards}
    held: Counter[str] = Counter()  # images indexed from each shard
    stamps: dict[str, set[int]] = {}  # the shard's mtimes they were read at
    bad: dict[str, list[Failure]] = {}
    same = PartWriter(work / KEPT)  # images of a shard with its mtime unchanged
    if previous is not None:
        for r in previous.records():
            shard = shard_of(r.path)
            held[shard] += 1
            stamps.setdefault(shard, set()).add(r.mtime_ns)
            if now.get(shard) == r.mtime_ns:
                same.add(row_of(r))
        for f in previous.failures:
            record = previous.failed_records.get(f.path)
            if record is not None:  # transient ones are tried again
                shard = shard_of(f.path)
                bad.setdefault(shard, []).append(f)
                stamps.setdefault(shard, set()).add(record.mtime_ns)
    unchanged = {p for p, mtime in now.items() if stamps.get(p) == {mtime}}
    # Each part in order, not all of them: the manifest's order need not be
    # the parts' (see _previous_parts).
    kept = PartRecords(compact_parts(same.close(), work / KEPT))
    # Read at two mtimes, the current one among them (failed at one, indexed
    # at another): embedded whole, so its images read now are not kept. Any
    # other changed shard has no image in ``same``: nothing to rewrite.
    mixed = {p for p, at in stamps.items() if now.get(p) in at} - unchanged
    if mixed:
        kept = kept.where(
            lambda row: shard_of(os.fsdecode(row[0])) not in mixed, work / KEPT
        )
    known_bad: list[Failure] = []
    known_records: list[ImageRecord] = []
    to_embed: list[ImageRecord] = []
    touched: list[tuple[str, int, int, int]] = []
    updated = 0
    for shard in shards:
        if shard.path in unchanged:
            for f in bad.get(shard.path, ()):
                known_bad.append(f)
                known_records.append(previous.failed_records[f.path])
        else:
            to_embed.append(shard)
            updated += held[shard.path]
            # Read at one time, another now: its bytes may be the same
            # (pipeline.touched reads it, and compares its members').
            at = stamps.get(shard.path, set())
            if len(at) == 1 and shard.mtime_ns not in at and not bad.get(shard.path):
                touched.append((shard.path, *at, shard.size, shard.mtime_ns))
    removed = sum(n for p, n in held.items() if p not in now)
    return Plan(
        kept=kept,
        to_embed=to_embed,
        added=0,
        updated=updated,
        removed=removed,
        known_failures=discovery_failures + known_bad,
        unchanged=len(kept) + len(known_bad),
        previous=previous,
        by_shard=True,
        known_records=known_records,
        touched_units=touched,
        n_touched=sum(held[path] for path, *_ in touched),
    )


def _id_collisions(
    twice: set[int], parts: Sequence[Part], known: Sequence[ImageRecord]
) -> dict[str, Failure]:
    """The failure row of each image whose id (one of ``twice``) another
    image has already (the first path in order keeps it), by path: a 63-bit
    hash collides about never, but never silently."""
    listed = ((os.fsdecode(x[0]), x[4]) for part in parts for x in iter_part(part))
    known_ids = ((r.path, image_id(r.path)) for r in known)
    pairs = sorted(
        (path, id_) for path, id_ in itertools.chain(listed, known_ids) if id_ in twice
    )
    owner: dict[int, str] = {}
    failures: dict[str, Failure] = {}
    for path, id_ in pairs:
        first = owner.setdefault(id_, path)
        if first != path:
            failures[path] = Failure(path, f"id collision with {first!r}; rename one")
    return failures
