"""The manifest of a build, merged in path ranges on the workers.

The manifest is the images kept from the index in place merged with those
the new shards hold, each path once. Both are parts (:mod:`pipeline.parts`),
so the merge splits into path ranges (:mod:`pipeline.ranges`): a task each,
which writes its range's rows as parts (what the index stage reads) and as
the manifest file's lines with their ids (:mod:`pipeline.manifest_ids`). The
client joins the ranges' files as bytes: it parses no row of the manifest.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgindex.pipeline.manifest_ids import ManifestWriter
from imgindex.pipeline.parts import (
    Part,
    PartRecords,
    PartWriter,
    Row,
    record_of,
    union_rows,
    with_meta_of,
)
from imgindex.pipeline.ranges import (
    PathRange,
    label,
    map_ranges,
    merged_in_range,
    path_ranges,
)
from imgindex.pipeline.store import ManifestLines


@dataclass(frozen=True)
class ManifestInput:
    """The parts a manifest is merged from: the images kept and those the
    shards hold, and the parts whose rows carry a file list's other columns
    for the latter (the plan's images to embed; none for other sources)."""

    kept: tuple[Part, ...]
    indexed: tuple[Part, ...]
    metas: tuple[Part, ...] = ()


@dataclass
class ManifestRange:
    """One range of the manifest: its rows as parts and as lines."""

    parts: list[Part] = field(default_factory=list)
    lines: str = ""


def manifest_range(
    given: ManifestInput, within: PathRange, folder: str
) -> ManifestRange:
    """The manifest's rows in ``within``, written to ``folder``."""
    indexed: Iterable[Row] = merged_in_range(given.indexed, within)
    if given.metas:
        indexed = with_meta_of(indexed, merged_in_range(given.metas, within))
    writer = PartWriter(folder)
    lines = Path(folder, f"{uuid.uuid4().hex[:12]}.jsonl")
    with ManifestWriter(lines) as manifest:
        # The kept row first, as planned (a path is in both only where a
        # resumed run's shard holds it too).
        for row in union_rows(merged_in_range(given.kept, within), indexed):
            writer.add(row)
            meta = None if row[5] is None else json.loads(row[5])
            manifest.write(record_of(row), meta)
    return ManifestRange(writer.close(), str(lines))


def merge_manifest(
    given: ManifestInput,
    folder: str | os.PathLike,
    seen: tuple[str, str] | None = None,
    cluster: Any = None,
    name: str = "dataset",
) -> tuple[PartRecords, ManifestLines]:
    """The manifest merged in path ranges into ``folder`` (on ``cluster``'s
    workers where it is at hand: :func:`pipeline.ranges.map_ranges`): its
    rows as parts in path order, and its lines for the index directory."""
    os.makedirs(folder, exist_ok=True)
    ranges = path_ranges([*given.kept, *given.indexed])
    inputs = [given] * len(ranges)
    merged = map_ranges(
        manifest_range, inputs, ranges, folder, seen, cluster, label("manifest", name)
    )
    parts: list[Part] = []
    files: list[str] = []
    for one in merged:
        parts += one.parts
        files.append(one.lines)
    return PartRecords(parts), ManifestLines(tuple(files))
