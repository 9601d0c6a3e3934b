"""Build one dataset's index on a Dask cluster: the only caller of client.submit."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
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
from pipeline.embed import ModelSpec, PartitionResult, embed_partition
from pipeline.errors import BuildFailed, DatasetError, IndexDirError
from pipeline.index import build_index, choose_index_key, reconstruct
from pipeline.models import get_model
from pipeline.store import (
    StoredIndex,
    is_index_dir,
    lock_index,
    read_index_dir,
    write_index_dir,
)

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (images done, images to embed)


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
    workers: dict[str, int] = field(default_factory=dict)
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
    discovery_failures: list[Failure]
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
    progress: ProgressCallback | None = None,
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
    progress
        Called as ``progress(done, total)`` while partitions finish.

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
    retries = int(config_value(retries, "imgindex.retries"))
    timeout = seconds_value(task_timeout, "imgindex.task-timeout")
    per_thread = int(config_value(tasks_per_thread, "imgindex.tasks-per-thread"))

    root = check_dataset(dataset).resolve()
    name = root.name
    dest = Path(out).resolve() / name
    summary = BuildSummary(name=name, source=str(root), index=str(dest))
    stages = summary.stage_seconds

    with lock_index(dest):
        t = time.perf_counter()
        plan = _plan(root, dest, spec, rebuild)
        stages["discover"] = time.perf_counter() - t
        summary.added, summary.updated, summary.removed = (
            plan.added,
            plan.updated,
            plan.removed,
        )
        summary.unchanged = len(plan.kept)

        ckdir = checkpoint_dir(dest)
        if rebuild:
            clear_checkpoints(ckdir)
        wanted = {r.path: r for r in plan.to_embed}
        resumed = load_partitions(ckdir, spec, wanted)
        done_paths = {r.path for records, _ in resumed for r in records}
        remaining = [r for r in plan.to_embed if r.path not in done_paths]
        summary.resumed_partitions = len(resumed)
        if resumed:
            logger.info(
                "%s: resuming; %d images already embedded by an interrupted build",
                name,
                len(done_paths),
            )

        t = time.perf_counter()
        runner = _PartitionRunner(
            client,
            name,
            str(root),
            spec,
            ckdir,
            retries=retries,
            timeout=timeout,
            per_thread=per_thread,
            progress=progress,
            total=len(plan.to_embed),
            done=len(done_paths),
        )
        size = runner.partition_size(len(remaining), partition_size)
        partitions = partition_records(remaining, size)
        summary.partitions = len(partitions) + len(resumed)
        results = [result for _, result in resumed] + runner.run(partitions)
        stages["embed"] = time.perf_counter() - t

        t = time.perf_counter()
        manifest, ids, vectors, failures = _assemble(plan, results, spec)
        dim = vectors.shape[1]
        index = build_index(ids, vectors, choose_index_key(len(ids), dim))
        stages["index"] = time.perf_counter() - t

        t = time.perf_counter()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {
            "name": name,
            "source": str(root),
            "model": spec.name,
            "preprocess": asdict(get_model(spec.name, "cpu").preprocess),
            "dim": int(dim),
            "metric": "cosine",
            "index_key": choose_index_key(len(ids), dim),
            "count": int(index.ntotal),
            "failed": len(failures),
            "created": (plan.previous.meta["created"] if plan.previous else now),
            "updated": now,
            "imgindex_version": __version__,
        }
        write_index_dir(dest, index, manifest, meta, failures)
        clear_checkpoints(ckdir)
        stages["write"] = time.perf_counter() - t

    embedded = sum(len(r.ids) for r in results)
    summary.indexed = int(index.ntotal)
    summary.embedded = embedded
    summary.failed = [{"path": f.path, "reason": f.reason} for f in failures]
    summary.workers = dict(Counter(_count_by_worker(results)))
    summary.seconds = round(time.perf_counter() - started, 3)
    attempted = len(plan.to_embed)
    summary.images_per_second = (
        round(attempted / summary.seconds, 2) if attempted else 0.0
    )
    logger.info(
        "%s: %d indexed, %d embedded, %d failed in %.1f s (%s)",
        name,
        summary.indexed,
        embedded,
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

    previous = None
    if dest.exists() and not rebuild:
        if is_index_dir(dest):
            previous = read_index_dir(dest)
            _check_compatible(previous, dest, spec)
        elif any(dest.iterdir()):
            raise IndexDirError(
                f"{str(dest)!r} exists and is not an imgindex index; "
                "choose another --out or remove it"
            )
    old = {r.path: r for r in previous.manifest} if previous else {}
    kept, to_embed = [], []
    updated = 0
    for r in records:
        before = old.get(r.path)
        if before is not None and before == r:
            kept.append(r)
        else:
            to_embed.append(r)
            updated += before is not None
    seen = {r.path for r in records}
    removed = sum(1 for p in old if p not in seen)
    return _Plan(
        records,
        kept,
        to_embed,
        len(to_embed) - updated,
        updated,
        removed,
        discovery_failures,
        previous,
    )


def _check_compatible(previous: StoredIndex, dest: Path, spec: ModelSpec) -> None:
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


def _assemble(plan: _Plan, results: Sequence[PartitionResult], spec: ModelSpec):
    by_path = {r.path: r for r in plan.records}
    new_ids = [r.ids for r in results]
    new_vecs = [r.vectors for r in results]
    new_paths = [p for r in results for p in r.paths]
    failures = list(plan.discovery_failures)
    for r in results:
        failures.extend(r.failures)

    if plan.kept:
        kept_ids = np.array([r.id for r in plan.kept], dtype=np.int64)
        kept_vecs = reconstruct(plan.previous.index, kept_ids)
    else:
        dim = _result_dim(results, spec)
        kept_ids = np.zeros(0, np.int64)
        kept_vecs = np.zeros((0, dim), np.float32)
    ids = np.concatenate([kept_ids, *new_ids])
    vectors = np.concatenate([kept_vecs, *new_vecs]) if len(ids) else kept_vecs
    paths = [r.path for r in plan.kept] + new_paths

    order = np.argsort(np.array(paths, dtype=object), kind="stable") if paths else []
    ids, vectors = ids[order], vectors[order]
    manifest = [by_path[paths[i]] for i in order]
    failures.sort(key=lambda f: f.path)
    return manifest, ids, vectors, failures


def _result_dim(results: Sequence[PartitionResult], spec: ModelSpec) -> int:
    for r in results:
        return r.vectors.shape[1]
    return get_model(spec.name, "cpu").dim


def _count_by_worker(results: Sequence[PartitionResult]):
    for r in results:
        if len(r.ids):
            yield from [r.worker] * len(r.ids)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name)[:40] or "dataset"


class _PartitionRunner:
    """Submit partitions through a bounded window and stream results back.

    Results are checkpointed and released as they arrive, so worker memory
    holds at most the window and a crash loses at most the partitions in
    flight. A worker dying mid-partition is handled by Dask (the task is
    rescheduled); if one partition keeps killing workers it is bisected until
    the image responsible is isolated and reported.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        root: str,
        spec: ModelSpec,
        ckdir: Path,
        *,
        retries: int,
        timeout: float,
        per_thread: int,
        progress: ProgressCallback | None,
        total: int,
        done: int,
    ):
        self.client = client
        self.name = _safe_name(name)
        self.root = root
        self.spec = spec
        self.ckdir = ckdir
        self.retries = retries
        self.timeout = timeout
        self.per_thread = per_thread
        self.progress = progress or (lambda done, total: None)
        self.total = total
        self.done = done
        self.run_id = uuid.uuid4().hex[:8]
        self._n_submitted = 0

    def run(self, partitions: list[tuple[ImageRecord, ...]]) -> list[PartitionResult]:
        from distributed import as_completed

        results: list[PartitionResult] = []
        self.progress(self.done, self.total)
        if not partitions:
            return results
        queue = list(reversed(partitions))
        parts_of: dict[str, tuple[ImageRecord, ...]] = {}
        ac = as_completed(loop=self.client.loop)
        watchdog = _Watchdog(self.client, self.timeout, parts_of)

        def submit_next() -> None:
            part = queue.pop()
            fut = self._submit(part)
            parts_of[fut.key] = part
            ac.add(fut)

        for _ in range(min(len(queue), self._window())):
            submit_next()
        watchdog.start()
        try:
            for fut in ac:
                part = parts_of.pop(fut.key)
                result = self._collect(fut, part, watchdog, queue)
                del fut
                if result is not None:
                    save_partition(self.ckdir, self.spec, part, result)
                    results.append(result)
                    self._advance(len(part))
                while queue and ac.count() < self._window():
                    submit_next()
        finally:
            watchdog.stop()
        return results

    def _collect(self, fut, part, watchdog, queue) -> PartitionResult | None:
        from distributed import KilledWorker

        if fut.status == "finished":
            return fut.result()
        if fut.key in watchdog.timed_out:
            reason = (
                f"partition timed out after {self.timeout:g} s (imgindex.task-timeout)"
            )
            return self._failed_partition(part, reason)
        exc = fut.exception() if fut.status == "error" else None
        if isinstance(exc, KilledWorker):
            if len(part) == 1:
                reason = "worker process died while decoding or embedding this image"
                return self._failed_partition(part, reason)
            mid = len(part) // 2
            logger.warning(
                "%s: partition of %d images killed workers; splitting it",
                self.name,
                len(part),
            )
            queue.extend([part[mid:], part[:mid]])
            return None
        raise BuildFailed(
            f"embedding task for {self.name} failed after {self.retries} retries: "
            f"{type(exc).__name__ if exc else fut.status}: {exc}; "
            "check the workers' logs and run `imgindex doctor`"
        )

    def _failed_partition(self, part, reason: str) -> PartitionResult:
        dim = get_model(self.spec.name, "cpu").dim
        return PartitionResult(
            ids=np.zeros(0, np.int64),
            paths=[],
            vectors=np.zeros((0, dim), np.float32),
            failures=[Failure(r.path, reason) for r in part],
            worker="",
        )

    def _submit(self, part: tuple[ImageRecord, ...]):
        key = f"embed[{self.name}]-{self._n_submitted:05d}-{self.run_id}"
        self._n_submitted += 1
        return self.client.submit(
            embed_partition,
            self.root,
            [r.path for r in part],
            self.spec,
            key=key,
            retries=self.retries,
            pure=False,
        )

    def partition_size(self, n_images: int, largest: int) -> int:
        """Cut small jobs finer so every worker thread gets work (2 tasks each)."""
        per_task = -(-n_images // (2 * self._threads()))
        return max(1, min(largest, per_task))

    def _threads(self) -> int:
        return sum(self.client.nthreads().values()) or 1

    def _window(self) -> int:
        return max(2, self._threads() * self.per_thread)

    def _advance(self, n: int) -> None:
        self.done += n
        self.progress(self.done, self.total)


class _Watchdog:
    """Fail partitions that run past the time limit (Dask has no task timeout).

    Dask cannot interrupt a running thread, so the worker running a hung task
    is restarted after the task is cancelled; its other tasks are rescheduled.
    """

    POLL_SECONDS = 2.0

    def __init__(self, client, limit: float, parts_of: dict):
        self.client = client
        self.limit = limit
        self.parts_of = parts_of
        self.timed_out: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="imgindex-watchdog", daemon=True
        )

    def start(self) -> None:
        if self.limit > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.POLL_SECONDS):
            try:
                running = self.client.run_on_scheduler(_executing_tasks)
            except Exception as e:  # scheduler briefly unreachable: try next tick
                logger.debug("watchdog poll failed: %s", e)
                continue
            for key, (address, seconds) in running.items():
                if (
                    key in self.parts_of
                    and key not in self.timed_out
                    and seconds > self.limit
                ):
                    logger.warning(
                        "task %s ran %.0f s > %.0f s on %s; failing it",
                        key,
                        seconds,
                        self.limit,
                        address,
                    )
                    self.timed_out.add(key)
                    self._kill(key, address)

    def _kill(self, key: str, address: str) -> None:
        from distributed import Future

        try:
            self.client.cancel([Future(key, self.client)], force=True)
            self.client.restart_workers([address], raise_for_error=False)
        except Exception as e:
            logger.warning("could not restart worker %s: %s", address, e)


def _executing_tasks(dask_scheduler=None) -> dict[str, tuple[str, float]]:
    return {
        ts.key: (ws.address, float(duration))
        for ws in dask_scheduler.workers.values()
        for ts, duration in ws.executing.items()
    }
