"""An index's ``meta.json``: one typed record for build, store, search and info."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imgindex.pipeline.errors import IndexDirError

# 2: the index directory holds shards/. Format 1 (no shards) is still read;
# its images get shards when they are next embedded.
# 3: its graph index stores identical vectors once and copies.npy lists the
# rest (pipeline/copies.py). Only such an index is written as format 3, so
# that releases before 0.3, which would count its vectors short, refuse it.
FORMAT_VERSION = 2
WITH_COPIES_FORMAT = 3
# 4: its images come from a file list or tar shards (source_kind), whose
# paths a release before 0.4 would take for a folder's.
OTHER_SOURCE_FORMAT = 4
READABLE_FORMATS = (1, 2, 3, 4)


@dataclass(frozen=True)
class IndexMeta:
    """What an index is: which images, which model, how many vectors, since when."""

    name: str
    source: str  # the dataset: absolute folder, list file, shard pattern or URL
    model: str
    dim: int
    count: int  # images in the index (its vectors, plus the copies)
    created: str  # ISO 8601, UTC
    imgindex_version: str
    metric: str = "cosine"
    index_key: str = "IDMap2,Flat"  # the FAISS factory string
    index_kind: str = "flat"  # flat | hnsw | ivf-flat | ivf-pq | custom
    index_reason: str = ""  # why this index (pipeline/index_policy.py)
    on_disk: bool = False  # inverted lists in index.ivfdata, mapped by search
    trained_for: int = 0  # vectors in the collection when the quantizer was trained
    # Search-time settings tuned at build time to reach the recall target
    # (nprobe, efSearch), and what was measured: recall_at_k, p50_ms, bytes...
    search_params: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    failed: int = 0
    updated: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    # Images embedded by each model runtime over the index's builds (torch,
    # onnxruntime): the vectors agree either way, so this is a record only.
    runtimes: dict[str, Any] = field(default_factory=dict)
    # Images whose vector is another's, stored once (copies.npy)
    copies: int = 0
    # What ``source`` is (pipeline/sources.py) and what the manifest's paths
    # are relative to ("": ``source`` itself, as before sources had kinds).
    source_kind: str = "folder"
    source_base: str = ""
    # A file list's other columns, kept in the manifest's rows as "meta"
    # (pipeline/sources.py), and their digest: an edit of them is seen.
    metadata_columns: list[str] = field(default_factory=list)
    metadata_digest: str = ""
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dumps(self) -> str:
        written = WITH_COPIES_FORMAT if self.copies else FORMAT_VERSION
        if self.source_kind != "folder":
            written = OTHER_SOURCE_FORMAT
        return json.dumps({**self.to_json(), "format": written}, indent=2)

    @classmethod
    def loads(cls, data: bytes | str, path: Path) -> IndexMeta:
        """Parse and check a meta.json read from ``path`` (named in errors).

        Raises
        ------
        IndexDirError
            If it is not JSON, of a format this version cannot read, or a field
            is missing or of the wrong type.
        """
        where = str(path)
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise IndexDirError(
                f"{where!r} is not valid JSON; rebuild the index with "
                "`imgindex build --rebuild`"
            ) from None
        if not isinstance(raw, dict):
            raise IndexDirError(f"{where!r} is not an imgindex meta file")
        if raw.get("format") not in READABLE_FORMATS:
            raise IndexDirError(
                f"{str(path.parent)!r} has format {raw.get('format')!r}; this "
                f"imgindex reads formats {READABLE_FORMATS}: rebuild it with "
                "`imgindex build --rebuild`"
            )
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                required = f.default is dataclasses.MISSING and (
                    f.default_factory is dataclasses.MISSING
                )
                if required:
                    raise IndexDirError(_malformed(where, f.name, "missing"))
                continue
            value = raw[f.name]
            if not _is_of(value, f.type):
                raise IndexDirError(_malformed(where, f.name, repr(value)[:40]))
            values[f.name] = value
        return cls(**values)


def now_stamp() -> str:
    """The time now as meta.json (``created``, ``updated``) and progress
    files record times: ISO 8601, UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _malformed(where: str, key: str, what: str) -> str:
    return (
        f"{where!r} is malformed ({key!r} is {what}); rebuild the index with "
        "`imgindex build --rebuild`"
    )


def _is_of(value: Any, annotation: str) -> bool:
    # Annotations are strings here (from __future__ import annotations).
    if isinstance(value, bool) != (annotation == "bool"):
        return False
    kinds = {
        "str": str,
        "int": int,
        "bool": bool,
        "str | None": (str, type(None)),
        "dict[str, Any]": dict,
        "list[str]": list,
    }
    return isinstance(value, kinds[annotation])
