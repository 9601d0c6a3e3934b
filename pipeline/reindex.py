"""Rebuild an index's FAISS file from its stored shards: nothing is embedded again."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.pipeline.assemble import (
    IndexRequest,
    decide,
    record_keys,
    run_index_build,
    select_by_keys,
)
from imgindex.pipeline.errors import IndexDirError
from imgindex.pipeline.index_build import Runner, ShardRows, StepCallback
from imgindex.pipeline.lock import lock_index
from imgindex.pipeline.meta import now_stamp
from imgindex.pipeline.shards import Shard, clear_staging, iter_shards, staging_dir
from imgindex.pipeline.store import (
    INDEX_FILE,
    SHARDS_DIR,
    iter_manifest,
    miscounted,
    read_index_dir,
    read_metadata,
    recover_index_dir,
    write_index_dir,
)

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)


def reindex(
    index_dir: str | os.PathLike,
    request: IndexRequest | None = None,
    client: Client | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Rebuild ``index_dir``'s index from its shards, as ``request`` says.

    Only rows whose image is in the manifest unchanged are used (see
    :func:`pipeline.assemble.select_by_keys`); every manifest image must get
    exactly one vector. With a ``client`` the index is trained, filled and
    merged on its workers (they must see ``index_dir``); without, here.
    An IVF index of the same type keeps its trained quantizer.
    ``on_step(stage, done, total)`` follows the index tasks.

    Raises
    ------
    IndexDirError
        If shards are missing or damaged for some indexed image (an index
        built before shards existed: rebuild it with ``imgindex build
        --rebuild``), or the index is locked by a build.
    """
    started = time.perf_counter()
    request = request or IndexRequest.from_config()
    dest = Path(index_dir).resolve()
    with lock_index(dest):
        recover_index_dir(dest)
        stored = read_index_dir(dest, manifest=False)
        meta = stored.meta
        selection, used = stored_selection(dest, meta.count)
        choice, trained, trained_for = decide(
            request, meta.count, meta.dim, meta, dest / INDEX_FILE
        )
        staging = staging_dir(dest)
        runner = Runner(client, meta.name, on_step=on_step)
        built = run_index_build(
            runner, selection, meta.dim, choice, staging, request, trained
        )
        meta = dataclasses.replace(
            meta, **built.meta_fields(trained_for), updated=now_stamp()
        )
        write_index_dir(
            dest,
            built.folder,
            iter_manifest(dest),  # copied row by row from the version it replaces
            meta,
            stored.failures,
            stored.failed_records,
            used,
            read_metadata(dest) if meta.metadata_digest else None,
        )
        clear_staging(staging)
    seconds = round(time.perf_counter() - started, 3)
    logger.info("%s: reindexed %d vectors in %.1f s", dest, built.count, seconds)
    return {
        "index": str(dest),
        "index_key": choice.key,
        "index_reason": choice.reason,
        "on_disk": choice.on_disk,
        "count": built.count,
        "copies": built.copies,
        "shards": len(used),
        "search_params": built.search_params,
        "quality": built.quality,
        "trained_on": built.trained_on,
        "stage_seconds": built.task_seconds,
        "seconds": seconds,
    }


def stored_selection(dest: Path, count: int) -> tuple[list[ShardRows], list[Path]]:
    """The shard rows holding the vectors of ``dest``'s ``count`` indexed images.

    Only rows whose image is in the manifest unchanged count (see
    :func:`pipeline.assemble.select_by_keys`); every image must get one.
    The manifest is streamed, never held: 8 bytes an image of keys, and each
    shard's records dropped once its rows are chosen.

    Raises
    ------
    IndexDirError
        If a shard is damaged or some image has no stored vector.
    """
    keys = record_keys(iter_manifest(dest))
    if len(keys) != count:
        raise IndexDirError(miscounted(dest, count, len(keys)))
    selection, used, covered = select_by_keys(_intact_shards(dest), keys)
    del keys
    if not covered.all():
        first = next(
            r for r, has in zip(iter_manifest(dest), covered, strict=True) if not has
        )
        raise IndexDirError(
            f"{int((~covered).sum())} of the {len(covered)} images in "
            f"{str(dest)!r} have no stored vector (e.g. {first.path!r}; indexed "
            "before imgindex kept shards?); rebuild the index with `imgindex "
            "build --rebuild`"
        )
    return selection, used


def _intact_shards(dest: Path) -> Iterator[Shard]:
    for shard in iter_shards(dest / SHARDS_DIR):
        if isinstance(shard, tuple):
            raise IndexDirError(
                f"shard {shard[0]} of {str(dest)!r} is damaged ({shard[1]}); "
                "rebuild the index with `imgindex build --rebuild`"
            )
        yield shard
