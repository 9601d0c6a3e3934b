"""Rebuild an index's FAISS file from its stored shards: nothing is embedded again."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import IndexDirError
from pipeline.index import build_index, choose_index_key, reserve
from pipeline.lock import lock_index
from pipeline.shards import iter_shards
from pipeline.store import (
    SHARDS_DIR,
    read_index_dir,
    recover_index_dir,
    write_index_dir,
)

logger = logging.getLogger(__name__)


def reindex(
    index_dir: str | os.PathLike, index_key: str | None = None
) -> dict[str, Any]:
    """Rebuild ``index_dir``'s index from its shards, reading one shard at a time.

    Only rows whose image is in the manifest unchanged are used: a shard row
    of an image since removed or changed (an incremental build keeps the old
    shard while another of its images is current) is skipped. Every manifest
    image must get exactly one vector.

    Raises
    ------
    IndexDirError
        If shards are missing or damaged for some indexed image (an index
        built before shards existed: rebuild it with ``imgindex build
        --rebuild``), or the index is locked by a build.
    """
    started = time.perf_counter()
    dest = Path(index_dir).resolve()
    with lock_index(dest):
        recover_index_dir(dest)
        stored = read_index_dir(dest)
        meta = stored.meta
        current = {r.id: r for r in stored.manifest}
        key = index_key or choose_index_key(len(current), meta.dim)
        index = build_index(np.zeros(0, np.int64), np.zeros((0, meta.dim)), key)
        reserve(index, len(current))
        covered: set[int] = set()
        used: list[Path] = []
        for shard in iter_shards(dest / SHARDS_DIR):
            if isinstance(shard, tuple):
                raise IndexDirError(
                    f"shard {shard[0]} of {str(dest)!r} is damaged ({shard[1]}); "
                    "rebuild the index with `imgindex build --rebuild`"
                )
            try:
                ids, vectors = shard.arrays()
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise IndexDirError(
                    f"shard {shard.path} of {str(dest)!r} is damaged ({e}); "
                    "rebuild the index with `imgindex build --rebuild`"
                ) from None
            records = {r.path: r for r in shard.records}
            keep = np.fromiter(
                (
                    int(i) in current
                    and int(i) not in covered
                    and current[int(i)] == records.get(path)
                    for i, path in zip(ids, shard.info["paths"], strict=True)
                ),
                bool,
                len(ids),
            )
            if keep.any():
                index.add_with_ids(vectors[keep], ids[keep])
                covered.update(int(i) for i in ids[keep])
                used.append(shard.path)
        missing = len(current) - len(covered)
        if missing:
            raise IndexDirError(
                f"{missing} of the {len(current)} images in {str(dest)!r} have no "
                "stored vector (indexed before imgindex kept shards?); rebuild the "
                "index with `imgindex build --rebuild`"
            )
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = dataclasses.replace(
            meta, index_key=key, count=int(index.ntotal), updated=now
        )
        write_index_dir(
            dest,
            index,
            stored.manifest,
            meta,
            stored.failures,
            stored.failed_records,
            used,
        )
    seconds = round(time.perf_counter() - started, 3)
    logger.info("%s: reindexed %d vectors in %.1f s", dest, index.ntotal, seconds)
    return {
        "index": str(dest),
        "index_key": key,
        "count": int(index.ntotal),
        "shards": len(used),
        "seconds": seconds,
    }
