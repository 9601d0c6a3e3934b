"""Per-partition checkpoints, so an interrupted build resumes where it stopped.

The client saves each finished partition as it arrives, with the model spec
and the (path, size, mtime) of every image it covered. A re-run accepts a
saved partition only if the spec matches and none of its files has changed
since, so stale vectors are never reused, and it does not depend on the new
run cutting partitions the same way (the cluster may have another size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.atomic import save_array_file
from pipeline.discover import Failure, ImageRecord
from pipeline.embed import ModelSpec, PartitionResult

logger = logging.getLogger(__name__)


def checkpoint_dir(index_dest: str | Path) -> Path:
    """The folder beside an index where its unfinished build keeps partitions."""
    dest = Path(index_dest)
    return dest.parent / f".{dest.name}.partial"


def spec_key(spec: ModelSpec) -> str:
    text = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def save_partition(
    folder: Path,
    spec: ModelSpec,
    records: Sequence[ImageRecord],
    result: PartitionResult,
) -> None:
    """Save one finished partition atomically under a name derived from its content."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [[r.path, r.size, r.mtime_ns] for r in records]
    info = {
        "spec": spec_key(spec),
        "records": rows,
        "paths": result.paths,
        "failures": [[f.path, f.reason, f.transient] for f in result.failures],
        "worker": result.worker,
        "timings": result.timings,
    }
    text = json.dumps(info, ensure_ascii=True).encode()
    name = hashlib.blake2b(text, digest_size=12).hexdigest()
    blob = np.frombuffer(text, dtype=np.uint8)
    save_array_file(
        folder / f"{name}.npz", ids=result.ids, vectors=result.vectors, info=blob
    )


def load_partitions(
    folder: Path, spec: ModelSpec, wanted: Mapping[str, ImageRecord]
) -> list[tuple[list[ImageRecord], PartitionResult]]:
    """Saved partitions still valid for ``wanted`` (path -> current record).

    A partition is valid if it was made with ``spec`` and every image it
    covered is in ``wanted`` unchanged; others are ignored (and left for
    ``clear_checkpoints``).
    """
    if not folder.is_dir():
        return []
    key = spec_key(spec)
    found = []
    claimed: set[str] = set()
    for path in sorted(folder.glob("*.npz")):
        loaded = _load(path)
        if loaded is None or loaded[0]["spec"] != key:
            continue
        info, result = loaded
        records = [ImageRecord(p, s, m) for p, s, m in info["records"]]
        if all(wanted.get(r.path) == r and r.path not in claimed for r in records):
            claimed.update(r.path for r in records)
            found.append((records, result))
    return found


def _load(path: Path) -> tuple[dict, PartitionResult] | None:
    try:
        with np.load(path) as data:
            info = json.loads(data["info"].tobytes())
            result = PartitionResult(
                ids=data["ids"],
                paths=info["paths"],
                vectors=data["vectors"],
                failures=[Failure(*row) for row in info["failures"]],
                worker=info["worker"],
                timings=info["timings"],
            )
            return info, result
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        logger.warning("ignoring unreadable checkpoint %s: %s", path, e)
        return None


def clear_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
