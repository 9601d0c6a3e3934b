"""What an index directory holds, as ``imgindex info --json`` and the service say it."""

from __future__ import annotations

import os
from typing import Any

from imgindex.pipeline.shards import shard_stats
from imgindex.pipeline.sources import place_gone, source_of
from imgindex.pipeline.store import SHARDS_DIR, StoredIndex, read_index_dir


def describe_index(
    index_dir: str | os.PathLike, stored: StoredIndex | None = None
) -> dict[str, Any]:
    """The ``info --json`` object of ``index_dir`` (or of ``stored``, read
    already with ``by_id=True``: the manifest is checked, not parsed).

    Raises
    ------
    IndexDirError
        If it is not an index directory, or its index file is damaged.
    """
    own = stored is None
    stored = stored or read_index_dir(index_dir, by_id=True)
    try:
        stored.check()  # a damaged index.faiss is not reported as healthy
        stored.lookup()  # nor a manifest out of step with meta.json
    finally:
        if own:
            stored.close()
    m = stored.meta
    return {
        "name": m.name,
        "source": m.source,
        "source_kind": m.source_kind,
        # False where its local folder is gone: moved, or not mounted here.
        "source_found": not place_gone(source_of(m)),
        "metadata_columns": m.metadata_columns,
        "model": m.model,
        "dim": m.dim,
        "metric": m.metric,
        "index_key": m.index_key,
        "index_kind": m.index_kind,
        "index_reason": m.index_reason,
        "on_disk": m.on_disk,
        "search_params": m.search_params,
        "quality": m.quality,
        "count": m.count,
        "copies": m.copies,
        "failed": len(stored.failures),
        "created": m.created,
        "updated": m.updated,
        "imgindex_version": m.imgindex_version,
        "shards": shard_stats(stored.path / SHARDS_DIR),
        "failures": [{"path": f.path, "reason": f.reason} for f in stored.failures],
    }
