"""Build one dataset's index: plan what to embed, dispatch it, assemble, write."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import __version__
from pipeline.checkpoint import (
    checkpoint_dir,
    clear_checkpoints,
    load_partitions,
    save_partition,
)
from pipeline.config import config_value, seconds_value
from pipeline.discover import (
    Failure,
    ImageRecord,
    check_dataset,
    discover_images,
    partition_records,
)
from pipeline.dispatch import DispatchSettings, PartitionDispatcher
from pipeline.embed import ModelSpec, PartitionResult
from pipeline.errors import BuildFailed, DatasetError, IndexDirError
from pipeline.index import build_index, choose_index_key, reconstruct
from pipeline.lock import lock_index
from pipeline.models import get_model
from pipeline.store import (
    StoredIndex,
    foreign_entries,
    is_empty_dir,
    is_index_dir,
    read_index_dir,
    recover_index_dir,
    write_index_dir,
)

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

# (images done, images to embed, of which failed)
ProgressCallback = Callable[[int, int, int], None]


@dataclass
class BuildSummary:
    """What one dataset's build did; the per-dataset part of ``build --json``."""

    name: str
    source: str
    index: str
    indexed: int = 0
    embedded: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    partitions: int = 0
    resumed_partitions: int = 0
    resumed_images: int = 0
    workers: dict[str, int] = field(default_factory=dict)
    # Summed over this run's tasks: where worker time went.
    task_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Plan:
    records: list[ImageRecord]
    kept: list[ImageRecord]
    to_embed: list[ImageRecord]
    added: int
    updated: int
    removed: int
    known_failures: list[Failure]  # found while planning: no task needed
    unchanged: int
    previous: StoredIndex | None


def run_build(
    client: Client,
    dataset: str | Path,
    out: str | Path,
    *,
    spec: ModelSpec | None = None,
    partition_size: int | None = None,
    rebuild: bool = False,
    retries: int | None = None,
    task_timeout: float | str | None = None,
    tasks_per_thread: int | None = None,
    gpu_resource: bool | None = None,
    progress: ProgressCallback | None = None,
    name: str | None = None,
) -> BuildSummary:
    """Embed ``dataset`` on ``client``'s cluster and write ``out/<name>/``.

    Parameters
    ----------
    client
        A connected ``distributed.Client``; how it was obtained is not our concern.
    dataset
        Folder of images, walked recursively. Workers open files by absolute
        path, so remote workers must see it at the same path (a shared FS).
    out
        Root folder; the index goes to ``out/<dataset folder name>``.
    spec
        Model, device and decode settings sent to workers with every task.
    rebuild
        Ignore an existing index and its checkpoints; embed everything.
    gpu_resource
        Run tasks only on workers started with ``--resources GPU=1``.
    progress
        Called as ``progress(done, total, failed)`` as partitions finish.
    name
        The index's name under ``out`` (default: the dataset folder's name).

    Returns
    -------
    BuildSummary

    Raises
    ------
    DatasetError, IndexDirError, IndexLocked, BuildFailed
    """
    started = time.perf_counter()
    spec = spec or default_spec()
    partition_size = int(config_value(partition_size, "imgindex.partition-size"))
    settings = DispatchSettings(
        retries=int(config_value(retries, "imgindex.retries")),
        timeout=seconds_value(task_timeout, "imgindex.task-timeout"),
        tasks_per_thread=int(
            config_value(tasks_per_thread, "imgindex.tasks-per-thread")
        ),
        gpu_resource=bool(config_value(gpu_resource, "imgindex.gpu-resource")),
        unresponsive=seconds_value(None, "imgindex.worker-unresponsive"),
    )

    root = check_dataset(dataset).resolve()
    name = name or root.name
    # Loaded here too: its dim and preprocessing go into meta.json, and an
    # unknown model fails before any task is sent.
    model = get_model(spec.name, "cpu")
    dest = Path(out).resolve() / name
    summary = BuildSummary(name=name, source=str(root), index=str(dest))
    stages = summary.stage_seconds

    if dest.exists() and not dest.is_dir():
        raise IndexDirError(
            f"{str(dest)!r} is a file, not an index directory; choose another "
            "--out or --name"
        )
    with lock_index(dest):
        recovered = recover_index_dir(dest)
        if recovered:
            logger.warning("%s: %s", dest, recovered)
        t = time.perf_counter()
        plan = _plan(root, dest, spec, rebuild)
        stages["discover"] = time.perf_counter() - t
        summary.added, summary.updated = plan.added, plan.updated
        summary.removed, summary.unchanged = plan.removed, plan.unchanged

        t = time.perf_counter()
        ckdir = checkpoint_dir(dest)
        if rebuild:
            clear_checkpoints(ckdir)
        key = choose_index_key(len(plan.kept) + len(plan.to_embed), model.dim)
        sink = _IndexSink(plan, model.dim, key)
        resumed = load_partitions(ckdir, spec, {r.path: r for r in plan.to_embed})
        for _, result in resumed:
            sink.add(result, new=False)
        done_paths = {r.path for records, _ in resumed for r in records}
        remaining = [r for r in plan.to_embed if r.path not in done_paths]
        summary.resumed_partitions = len(resumed)
        summary.resumed_images = len(done_paths)
        if resumed:
            logger.info(
                "%s: resuming; %d images embedded before", name, len(done_paths)
            )
        stages["prepare"] = time.perf_counter() - t

        t = time.perf_counter()
        tracker = _Progress(progress, len(plan.to_embed), len(done_paths))
        tracker.failed = len(sink.failures) - len(plan.known_failures)

        def on_result(part, result) -> None:
            try:
                save_partition(ckdir, spec, part, result)
            except OSError as e:
                raise IndexDirError(
                    f"could not save finished work in {str(ckdir)!r}: "
                    f"{e.strerror or e}; free space there and run the same "
                    "command again: it resumes"
                ) from None
            tracker.advance(len(part), len(result.failures))
            sink.add(result, new=True)

        dispatcher = PartitionDispatcher(
            client, name, str(root), spec, settings, on_result
        )
        size = dispatcher.partition_size(len(remaining), partition_size)
        partitions = partition_records(remaining, size)
        summary.partitions = len(partitions) + len(resumed)
        tracker.advance(0, 0)
        dispatcher.run(partitions)
        stages["embed"] = time.perf_counter() - t

        t = time.perf_counter()
        manifest, failures, failed_records = sink.finish(plan)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {
            "name": name,
            "source": str(root),
            "model": spec.name,
            "preprocess": asdict(model.preprocess),
            "dim": int(model.dim),
            "metric": "cosine",
            "index_key": key,
            "count": int(sink.index.ntotal),
            "failed": len(failures),
            "created": (plan.previous.meta["created"] if plan.previous else now),
            "updated": now,
            "imgindex_version": __version__,
        }
        write_index_dir(dest, sink.index, manifest, meta, failures, failed_records)
        clear_checkpoints(ckdir)
        stages["write"] = time.perf_counter() - t

    summary.indexed = int(sink.index.ntotal)
    summary.embedded = sink.embedded
    summary.failed = [{"path": f.path, "reason": f.reason} for f in failures]
    summary.workers = dict(sink.by_worker)
    summary.task_seconds = {k: round(v, 3) for k, v in sink.task_seconds.items()}
    summary.seconds = round(time.perf_counter() - started, 3)
    attempted = len(plan.to_embed)
    if attempted:
        summary.images_per_second = round(attempted / summary.seconds, 2)
    logger.info(
        "%s: %d indexed, %d embedded, %d failed in %.1f s (%s)",
        name,
        summary.indexed,
        sink.embedded,
        len(failures),
        summary.seconds,
        ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()),
    )
    return summary


def default_spec(
    model: str | None = None, device: str | None = None, batch_size: int | None = None
) -> ModelSpec:
    """The ModelSpec from flags, falling back to the ``imgindex`` config."""
    return ModelSpec(
        name=config_value(model, "imgindex.model"),
        device=config_value(device, "imgindex.device"),
        batch_size=int(config_value(batch_size, "imgindex.batch-size")),
        max_pixels=int(config_value(None, "imgindex.max-image-pixels")),
    )


def _plan(root: Path, dest: Path, spec: ModelSpec, rebuild: bool) -> _Plan:
    discovery_failures: list[Failure] = []
    records = list(discover_images(root, discovery_failures))
    if not records and not discovery_failures:
        raise DatasetError(f"dataset folder {str(root)!r} contains no image files")
    records = _drop_id_collisions(records, discovery_failures)

    if dest == root or root.is_relative_to(dest):
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
            _check_compatible(previous, dest, root, spec)
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
    return _Plan(
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
    previous: StoredIndex, dest: Path, root: Path, spec: ModelSpec
) -> None:
    source = previous.meta["source"]
    if Path(source) != root:
        raise IndexDirError(
            f"index {str(dest)!r} holds another dataset ({source!r}), not "
            f"{str(root)!r}; give this one another name with --name, or pass "
            "--rebuild to replace that index"
        )
    model = previous.meta.get("model")
    if model != spec.name:
        raise IndexDirError(
            f"index {str(dest)!r} was built with model {model!r}, not {spec.name!r}; "
            "pass --rebuild to replace it, or choose another --out"
        )


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


class _IndexSink:
    """The FAISS index, filled as partitions arrive.

    Each partition's vectors go into the index the moment they arrive and are
    then dropped, so the client holds the index plus one partition: its
    memory is the vectors plus a constant (measured in bench/). An unchanged
    Flat index is updated in place: stale ids removed, new vectors added.
    """

    CHUNK = 65_536  # vectors reconstructed from an old index at a time

    def __init__(self, plan: _Plan, dim: int, key: str):
        self.dim = dim
        self.paths = [r.path for r in plan.kept]
        self.failures = list(plan.known_failures)
        self.embedded = 0
        self.by_worker: Counter = Counter()
        self.task_seconds: Counter = Counter()
        self.index = self._start(plan, key)
        # Ids already in the index: a new vector under one of them would make
        # the same image appear twice in every result list.
        self.present = np.sort(np.fromiter((r.id for r in plan.kept), np.int64))

    def _start(self, plan: _Plan, key: str):
        previous = plan.previous
        if previous is None or not plan.kept:
            return build_index(np.zeros(0, np.int64), np.zeros((0, self.dim)), key)
        kept = {r.path for r in plan.kept}
        stale = np.array(
            [r.id for r in previous.manifest if r.path not in kept], np.int64
        )
        if previous.meta.get("index_key") == key and "HNSW" not in key:
            index = previous.index  # HNSW has no remove_ids; Flat is edited in place
            if len(stale):
                index.remove_ids(stale)
            return index
        index = build_index(np.zeros(0, np.int64), np.zeros((0, self.dim)), key)
        ids = np.array([r.id for r in plan.kept], np.int64)
        for i in range(0, len(ids), self.CHUNK):
            chunk = ids[i : i + self.CHUNK]
            index.add_with_ids(reconstruct(previous.index, chunk), chunk)
        return index

    def add(self, result: PartitionResult, new: bool) -> None:
        self.failures.extend(result.failures)
        if not len(result.ids):
            return
        if result.vectors.shape[1] != self.dim:
            raise BuildFailed(
                f"worker {result.worker} returned {result.vectors.shape[1]}-d vectors, "
                f"expected {self.dim}: its model differs; run `imgindex doctor`"
            )
        twice = np.isin(result.ids, self.present)
        if twice.any():
            path = result.paths[int(np.argmax(twice))]
            raise BuildFailed(
                f"{path!r} would be added to the index a second time; its index "
                "directory is inconsistent: pass --rebuild"
            )
        self.index.add_with_ids(result.vectors, result.ids)
        self.paths.extend(result.paths)
        # Held by the index now. A new empty array, not a slice: a slice would
        # keep every partition's buffer alive until the build ends.
        result.vectors = np.empty((0, self.dim), np.float32)
        if new:
            self.embedded += len(result.ids)
            self.by_worker[result.worker] += len(result.ids)
            self.task_seconds.update(result.timings)

    def finish(self, plan: _Plan):
        """(manifest in path order, failures in path order, their file records)."""
        by_path = {r.path: r for r in plan.records}
        manifest = [by_path[p] for p in sorted(self.paths)]
        failures = sorted(self.failures, key=lambda f: f.path)
        failed_records = {
            f.path: by_path[f.path] for f in failures if f.path in by_path
        }
        return manifest, failures, failed_records


class _Progress:
    def __init__(self, callback: ProgressCallback | None, total: int, done: int):
        self.callback = callback
        self.total = total
        self.done = done
        self.failed = 0

    def advance(self, n: int, failed: int) -> None:
        self.done += n
        self.failed += failed
        if self.callback is not None:
            self.callback(self.done, self.total, self.failed)
