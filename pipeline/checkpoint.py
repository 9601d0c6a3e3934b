"""Per-partition checkpoints, so an interrupted build resumes where it stopped.

Each finished partition is saved by the client as it arrives, under a key
derived from the model spec and the partition's (path, size, mtime) rows: a
re-run that partitions the same files the same way finds it and skips the
task; a changed file changes the key, so stale vectors are never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.discover import Failure, ImageRecord
from pipeline.embed import ModelSpec, PartitionResult
from pipeline.store import save_array_file

logger = logging.getLogger(__name__)


def checkpoint_dir(index_dest: str | Path) -> Path:
    """The folder beside an index where its unfinished build keeps partitions."""
    dest = Path(index_dest)
    return dest.parent / f".{dest.name}.partial"


def partition_key(spec: ModelSpec, records: Sequence[ImageRecord]) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for r in records:
        h.update(r.path.encode("utf-8", "surrogateescape"))
        h.update(f"\0{r.size}\0{r.mtime_ns}\n".encode())
    return h.hexdigest()


def save_partition(folder: Path, key: str, result: PartitionResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "paths": result.paths,
        "failures": [[f.path, f.reason] for f in result.failures],
        "worker": result.worker,
        "timings": result.timings,
    }
    blob = np.frombuffer(json.dumps(info, ensure_ascii=True).encode(), dtype=np.uint8)
    save_array_file(
        folder / f"{key}.npz", ids=result.ids, vectors=result.vectors, info=blob
    )


def load_partition(folder: Path, key: str) -> PartitionResult | None:
    """The saved result of partition ``key``, or None if absent or unreadable."""
    path = folder / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            info = json.loads(data["info"].tobytes())
            return PartitionResult(
                ids=data["ids"],
                paths=info["paths"],
                vectors=data["vectors"],
                failures=[Failure(p, r) for p, r in info["failures"]],
                worker=info["worker"],
                timings=info["timings"],
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        logger.warning("ignoring unreadable checkpoint %s: %s", path, e)
        path.unlink(missing_ok=True)
        return None


def clear_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
