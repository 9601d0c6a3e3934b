"""Plan a build: discover the dataset and diff it against the index in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.discover import Failure, ImageRecord
from pipeline.embed import ModelSpec
from pipeline.errors import DatasetError, IndexDirError
from pipeline.sources import Source, metadata_digest, split_member
from pipeline.store import (
    StoredIndex,
    foreign_entries,
    is_empty_dir,
    is_index_dir,
    read_index_dir,
)


@dataclass
class Plan:
    """What a build must do: the incremental diff against the index in place."""

    records: list[ImageRecord]
    kept: list[ImageRecord]
    to_embed: list[ImageRecord]
    added: int
    updated: int
    removed: int
    known_failures: list[Failure]  # found while planning: no task needed
    unchanged: int
    previous: StoredIndex | None
    # Tar shards: ``records`` and ``to_embed`` are shards, ``kept`` their
    # images; ``known_records`` are the files behind the known failures of
    # the shards kept (pipeline/sources.py).
    by_shard: bool = False
    known_records: list[ImageRecord] = field(default_factory=list)
    # A table's other columns, by path: they go into the manifest.
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def metadata_digest(self) -> str:
        return metadata_digest(self.metadata)


def plan_build(
    source: Source, dest: Path, spec: ModelSpec, rebuild: bool, cluster: Any = None
) -> Plan:
    """List ``source`` and diff it against the index at ``dest``; the listing
    goes to ``cluster``'s workers once it is at hand (a Client, or a Future
    of one: :class:`pipeline.listing.Lister`).

    Raises
    ------
    DatasetError, IndexDirError
        If the dataset is empty, or ``dest`` is not an index this build may
        replace (another dataset's, another model's, not imgindex's at all).
    """
    discovery_failures: list[Failure] = []
    metadata: dict[str, dict[str, Any]] = {}
    records = list(source.records(discovery_failures, metadata, cluster))
    if not records and not discovery_failures:
        raise DatasetError(f"dataset {source.spec!r} contains no image files")
    records = _drop_id_collisions(records, discovery_failures)

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
            previous = read_index_dir(dest)
            try:
                _check_compatible(previous, dest, source, spec)
            except IndexDirError:
                previous.close()  # its index file stays open until read or closed
                raise
    if source.by_shard:
        return _plan_shards(records, discovery_failures, previous)
    old = {r.path: r for r in previous.manifest} if previous else {}
    old_bad = previous.failed_records if previous else {}
    old_reasons = {f.path: f for f in previous.failures} if previous else {}
    kept, to_embed, known_bad = [], [], []
    updated = 0
    for r in records:
        if old.get(r.path) == r:
            kept.append(r)
        elif old_bad.get(r.path) == r:
            # Failed before and unchanged since: it would fail again.
            known_bad.append(old_reasons[r.path])
        else:
            to_embed.append(r)
            updated += r.path in old or r.path in old_bad
    seen = {r.path for r in records}
    removed = sum(1 for p in old if p not in seen)
    return Plan(
        metadata={r.path: metadata[r.path] for r in records if r.path in metadata},
        records=records,
        kept=kept,
        to_embed=to_embed,
        added=len(to_embed) - updated,
        updated=updated,
        removed=removed,
        known_failures=discovery_failures + known_bad,
        unchanged=len(kept) + len(known_bad),
        previous=previous,
    )


def _check_compatible(
    previous: StoredIndex, dest: Path, source: Source, spec: ModelSpec
) -> None:
    held = previous.meta.source
    if held != source.spec and Path(held) != Path(source.spec):
        raise IndexDirError(
            f"index {str(dest)!r} holds another dataset ({held!r}), not "
            f"{source.spec!r}; give this one another name with --name, or pass "
            "--rebuild to replace that index"
        )
    model = previous.meta.model
    if model != spec.name:
        raise IndexDirError(
            f"index {str(dest)!r} was built with model {model!r}, not {spec.name!r}; "
            "pass --rebuild to replace it, or choose another --out"
        )


def _plan_shards(
    shards: list[ImageRecord],
    discovery_failures: list[Failure],
    previous: StoredIndex | None,
) -> Plan:
    """The diff of tar shards against the index in place: a shard whose
    images (and failed images) were all indexed from it as it is now is kept
    whole; any other is embedded whole. Image counts of a shard embedded
    again are known only once it is read: ``added`` stays 0 here, and
    ``updated`` counts the images it held before."""
    members: dict[str, list[ImageRecord]] = {}
    stamps: dict[str, set[int]] = {}
    bad: dict[str, list[Failure]] = {}
    if previous is not None:
        for r in previous.manifest:
            shard = _shard_path(r.path)
            members.setdefault(shard, []).append(r)
            stamps.setdefault(shard, set()).add(r.mtime_ns)
        for f in previous.failures:
            held = previous.failed_records.get(f.path)
            if held is not None:  # transient ones are tried again
                shard = _shard_path(f.path)
                bad.setdefault(shard, []).append(f)
                stamps.setdefault(shard, set()).add(held.mtime_ns)
    kept: list[ImageRecord] = []
    known_bad: list[Failure] = []
    known_records: list[ImageRecord] = []
    to_embed: list[ImageRecord] = []
    updated = 0
    for shard in shards:
        if stamps.get(shard.path) == {shard.mtime_ns}:
            kept.extend(members.get(shard.path, ()))
            for f in bad.get(shard.path, ()):
                known_bad.append(f)
                known_records.append(previous.failed_records[f.path])
        else:
            to_embed.append(shard)
            updated += len(members.get(shard.path, ()))
    current = {s.path for s in shards}
    removed = sum(len(m) for s, m in members.items() if s not in current)
    return Plan(
        records=shards,
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
    )


def _shard_path(path: str) -> str:
    """The tar shard of a member's path (a shard's own path: itself)."""
    try:
        return split_member(path)[0]
    except ValueError:
        return path


def _drop_id_collisions(
    records: list[ImageRecord], failures: list[Failure]
) -> list[ImageRecord]:
    owner: dict[int, str] = {}
    unique = []
    for r in records:
        first = owner.setdefault(r.id, r.path)
        if first != r.path:  # 63-bit hash: ~never, but never silently
            failures.append(Failure(r.path, f"id collision with {first!r}; rename one"))
        else:
            unique.append(r)
    return unique
