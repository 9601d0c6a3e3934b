"""Build a FAISS index from shards as a Dask reduction: train, add, merge, measure.

The client decides and names the work; the vectors only ever move between
shard files and worker processes:

1. ``train``: one worker trains the quantizer on a random sample of rows drawn
   across all shards (data ordered by folder would bias the first rows), and
   returns the empty trained index as bytes. Add tasks take that future as an
   argument, so Dask ships it worker to worker, never through the client.
2. ``add``: each worker fills a copy with a group of shards and writes it as a
   partial index file beside the staging shards.
3. ``merge``: one worker merges the parts, in memory, or (when the index is
   too big for memory) into one on-disk ``index.ivfdata`` with FAISS's
   OnDiskInvertedLists, which ``search`` maps instead of reading.
4. ``exact`` / ``evaluate``: the exact top-k of a sample of queries is
   computed over the shards in parallel; the built index is searched with
   growing nprobe/efSearch until recall@k reaches the target, and one query's
   latency is timed at that setting.

Indexes that cannot be merged (Flat, HNSW) are filled by one ``add`` task, on
a worker. Without a Dask client (workers that cannot see the files), the same
task functions run in this process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgindex.pipeline import index as fx
from imgindex.pipeline.atomic import atomic_file, atomic_path, fsync_path
from imgindex.pipeline.cancel import cancel_futures
from imgindex.pipeline.copies import COPIES_FILE, Copies, DistinctAdder, folder_copies
from imgindex.pipeline.errors import ImgindexError
from imgindex.pipeline.index_policy import IndexChoice
from imgindex.pipeline.shards import open_npz, traits_member

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
PART_BYTES = 256 << 20  # raw vectors per add task, at most (worker memory)
IVF_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
HNSW_STEPS = (16, 32, 64, 128, 256, 512, 1024)
# One query at a time is timed, this many of them, or as many as fit in
# LATENCY_SECONDS but never fewer than LATENCY_MIN: an exact scan of 100,000
# vectors takes 35 ms a query here, so 200 of them were 7 s of a 16 s build.
LATENCY_QUERIES = 200
LATENCY_SECONDS = 1.0
LATENCY_MIN = 20
# Queries at most for an exact (flat) index: its recall is 1 unless it and
# its shards disagree, which 100 queries of 10 neighbours show as well as 500
# (500 were two thirds of the measuring: 0.22 s of 500 vectors' build here).
EXACT_QUERIES = 100
# Vectors up to which an index is measured in one task rather than spread
# over the workers (500 queries x 20,000 x 1,280-d: about 0.2 s of a core).
MEASURE_IN_ONE_TASK = 20_000
# Recall is measured with indexed vectors moved to this cosine from where they
# were: cropped, shrunk, re-encoded copies of photos lie 0.80 (5th percentile)
# to 0.95 from their sources. An indexed vector itself as the query leads a
# graph search straight to its own neighbourhood and overstates recall (HNSW:
# 0.99 for such queries where crops got 0.70).
QUERY_COSINE = 0.8
# The exact truth keeps this many neighbours past the k-th, so that a found
# neighbour scoring as well as the k-th (a copy of a copy: photo archives hold
# dozens of byte-identical files) counts as a hit, not a miss. Scores within
# TIE_COSINE of the k-th are ties: float32 sums of the same products in
# another order differ by ~1e-7.
TIE_ROOM = 100
TIE_COSINE = 1e-5


class ShardDamaged(ValueError):
    """A shard's vectors could not be read (raised on a worker, one line)."""


@dataclass(frozen=True)
class ShardRows:
    """Rows of one shard file that go into the index (None: all of them)."""

    path: str
    rows: np.ndarray | None
    count: int

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        ids, vectors, _ = self._read(with_traits=False)
        return ids, vectors

    def load_with_traits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Ids, vectors and the images' traits (None: the shard stored none)."""
        return self._read(with_traits=True)

    def _read(self, with_traits: bool):
        try:
            with open_npz(self.path) as data:
                ids, vectors = data["ids"], data["vectors"]
                traits = traits_member(data) if with_traits else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise ShardDamaged(f"shard {self.path} is damaged ({e})") from None
        if traits is not None and len(traits) != len(ids):
            raise ShardDamaged(f"shard {self.path} is damaged (traits and ids differ)")
        if self.rows is not None:
            ids, vectors = ids[self.rows], vectors[self.rows]
            traits = None if traits is None else traits[self.rows]
        return ids, np.ascontiguousarray(vectors, dtype=np.float32), traits


@dataclass
class IndexSettings:
    """How to build and tune (dask config ``imgindex.index.*``)."""

    recall_target: float = 0.95
    recall_k: int = 10
    queries: int = 500  # sampled queries for recall and tuning
    seed: int = 0


@dataclass
class BuiltIndex:
    """An index written to ``folder`` (index.faiss, and index.ivfdata if on disk)."""

    folder: Path
    choice: IndexChoice
    count: int  # images the index answers for
    trained_on: int  # vectors in the training sample; 0: not trained by this run
    encoded: int = 0  # vectors encoded by this run (the rest copied as they were)
    search_params: dict[str, int] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    task_seconds: dict[str, float] = field(default_factory=dict)
    copies: int = 0  # images stored as another's identical vector (copies.npy)

    def meta_fields(self, trained_for: int) -> dict[str, Any]:
        """What meta.json records of this index (pipeline/meta.py)."""
        return {
            "index_key": self.choice.key,
            "index_kind": self.choice.kind,
            "index_reason": self.choice.reason,
            "on_disk": self.choice.on_disk,
            "trained_for": trained_for,
            "search_params": self.search_params,
            "quality": self.quality,
            "count": self.count,
            "copies": self.copies,
        }


StepCallback = Callable[[str, int, int], None]
STEP_NAMES = {  # what a person watching the build reads for each stage
    "train": "training the quantizer",
    "load-trained": "reusing the trained quantizer",
    "add": "adding vectors",
    "merge": "merging parts",
    "queries": "sampling queries",
    "exact": "exact neighbours of the queries",
    "evaluate": "tuning and measuring recall",
    "neighbours": "searching each image's neighbours",
    "hash": "hashing files of equal samples",
    "verify": "checking candidate pairs for copies",
    "thumbnails": "making the report's thumbnails",
}


@dataclass(frozen=True)
class Append:
    """Grow the previous index instead of refilling it (incremental builds).

    Only ``rows`` are encoded; an IVF index's previous entries are copied,
    less ``drop``: ids of images since removed or changed (a changed image
    keeps its id, so its old entry goes and its new row comes). A graph
    cannot drop a node, so it is grown only where nothing was removed or
    changed: ``rows`` are added to a copy of it, beside its ``copies`` table.
    """

    base: Path  # the previous version's index.faiss; its quantizer is reused
    rows: list[ShardRows]
    drop: np.ndarray
    copies: np.ndarray | None = None  # a graph's copies table so far


# What a Runner's tasks do, by their keys' prefix, for its error lines.
_DOING = {
    "index": "building the index",
    "duplicates": "looking for duplicates",
    "search": "searching",
}


class Runner:
    """Runs index tasks on a Dask cluster, or here when there is none.

    Keys read ``<prefix>.<stage>[<label>]-<n>-<run>`` so the dashboard's task
    stream and progress bars show train / add / merge / exact / evaluate
    (``index.train[photos]-…``), or the duplicate search's stages under the
    prefix ``duplicates``. Dask names a key's task group after its first
    ``-``-separated word, so the stage and label come before any ``-``: each
    stage of each dataset is its own group, and so stays in its own span.
    ``on_step(stage, done, total)`` is called in this thread as each task
    finishes, so a command line or progress file can follow a long build.

    While it gathers, the build's watchdog drops a worker that froze holding
    one of its tasks or their results (SIGSTOP, a dead NFS mount), so that
    they run elsewhere instead of waiting for Dask's worker-ttl (5 minutes);
    ``watch=False`` where the caller keeps a watchdog of its own.
    """

    def __init__(
        self,
        client=None,
        label: str = "index",
        retries: int = 1,
        on_step: StepCallback | None = None,
        prefix: str = "index",
        watch: bool = True,
    ):
        from imgindex.pipeline.spans import task_label

        self.client = client
        self.prefix = prefix
        self.label = task_label(label)
        self.retries = retries
        self.on_step = on_step
        self.run_id = uuid.uuid4().hex[:8]
        self._n = 0
        self._counts: dict[str, list[int]] = {}  # stage -> [done, submitted]
        self._running: dict[Any, str] = {}  # future -> stage
        self._last_step: tuple[str, int, int] | None = None
        # Every key submitted, for the watchdog: a finished task's result on a
        # frozen worker holds up the tasks that take it (no futures kept here,
        # which would keep the results on the cluster).
        self._keys: dict[str, tuple[str, None]] | None = (
            {} if watch and client is not None else None
        )
        self._watchdog: Any = None  # while gathering, where watched

    @property
    def threads(self) -> int:
        if self.client is None:
            return 1
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return max(1, sum(w["nthreads"] for w in workers))

    def submit(self, stage: str, fn: Callable, *args: Any):
        self._n += 1
        self._counts.setdefault(stage, [0, 0])[1] += 1
        if self.client is None:
            self._report(stage, 0)
            done = _Done(fn(*(_resolved(a) for a in args)))
            self._report(stage, 1)
            return done
        future = self.client.submit(
            fn,
            *args,
            key=f"{self.prefix}.{stage}[{self.label}]-{self._n:05d}-{self.run_id}",
            pure=False,
            retries=self.retries,
        )
        self._running[future] = stage
        if self._keys is not None:
            self._keys[future.key] = (stage, None)
        self._report(stage, 0)
        return future

    def gather(self, futures: Sequence) -> list:
        if self.client is None:
            return [f.result() for f in futures]
        from distributed import as_completed
        from distributed.client import FutureCancelledError

        wanted = list(futures)
        with self._watched(wanted):
            try:
                # Every submitted task counts, not only those gathered: the
                # add tasks finish long before the merge that depends on them.
                if self._running and not all(f.done() for f in wanted):
                    running = as_completed(list(self._running), loop=self.client.loop)
                    for future in running:
                        self._report(self._running.pop(future), 1)
                        if all(f.done() for f in wanted):
                            break
                self._count_finished()
                return self.client.gather(wanted)
            except (FutureCancelledError, OSError) as e:
                # The first is a BaseException: a traceback, were it let out.
                if self.client.status != "running":
                    raise self.lost_scheduler() from e
                if self._watchdog is not None and self._watchdog.no_workers_for:
                    raise self.no_workers(self._watchdog.no_workers_for) from e
                raise

    def lost_scheduler(self) -> ImgindexError:
        """The one line for a scheduler lost while this ran its tasks."""
        doing = _DOING.get(self.prefix, f"running {self.prefix} tasks")
        return ImgindexError(
            f"lost the scheduler {self.client.scheduler.address} while {doing} "
            f"({self.label}); once the cluster is back, run the same command again"
        )

    def no_workers(self, seconds: float) -> ImgindexError:
        """The one line for tasks that waited ``seconds`` on a cluster left
        with no worker (imgindex.no-workers-timeout)."""
        doing = _DOING.get(self.prefix, f"running {self.prefix} tasks")
        return ImgindexError(
            f"no worker has been on the cluster for {seconds:.0f} s "
            f"(imgindex.no-workers-timeout) while {doing} ({self.label}); once "
            "workers are back, run the same command again"
        )

    @contextlib.contextmanager
    def _watched(self, wanted: list) -> Iterator[None]:
        if self._keys is None:
            yield
            return
        from imgindex.pipeline.dispatch import DispatchSettings, Watchdog

        # No time limit: an index's train or merge task may rightly take hours.
        settings = DispatchSettings.watching(timeout=0)
        # Given up on, with no worker left, the tasks wanted go too: a
        # finished one's result went with its worker, to be made again.
        self._watchdog = Watchdog(
            self.client,
            settings,
            self._keys,
            lambda: cancel_futures(self.client, [*wanted, *self._running]),
        )
        self._watchdog.start()
        try:
            yield
        finally:
            self._watchdog.stop()
            self._watchdog = None

    def cancel_running(self) -> None:
        """Cancel the tasks submitted and not yet finished (from any thread)."""
        if self.client is not None:
            cancel_futures(self.client, list(self._running))

    def _count_finished(self) -> None:
        for future, stage in list(self._running.items()):
            if future.done():
                del self._running[future]
                self._report(stage, 1)

    def _report(self, stage: str, finished: int) -> None:
        counts = self._counts[stage]
        counts[0] += finished
        if finished and counts[0] == counts[1]:
            self._show((stage, *counts))  # a stage's last task: show it complete
        # The first stage not finished is the one to show: merge tasks are
        # submitted at once behind the adds, but the adds are what runs.
        current = next(
            (s for s, (done, total) in self._counts.items() if done < total), stage
        )
        self._show((current, *self._counts[current]))

    def _show(self, step: tuple[str, int, int]) -> None:
        if self.on_step is not None and step != self._last_step:
            self._last_step = step
            self.on_step(*step)


class _Done:
    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


def _resolved(arg: Any) -> Any:
    # As Dask does with futures in task arguments, lists included.
    if isinstance(arg, _Done):
        return arg.value
    if isinstance(arg, list):
        return [_resolved(a) for a in arg]
    return arg


def build_from_shards(
    runner: Runner,
    selection: Sequence[ShardRows],
    dim: int,
    choice: IndexChoice,
    folder: Path,
    settings: IndexSettings | None = None,
    trained: Path | None = None,
    append: Append | None = None,
) -> BuiltIndex:
    """Build ``choice`` over ``selection`` into ``folder`` and measure it.

    ``trained``: an existing index file (same key) whose quantizer is reused
    instead of training again (incremental builds); it is read on a worker.
    ``append``: keep that index's entries and encode only ``append.rows``
    (``selection`` is still what the result must hold, and is measured).
    """
    settings = settings or IndexSettings()
    folder.mkdir(parents=True, exist_ok=True)
    timer: dict[str, float] = {}
    rng = np.random.default_rng(settings.seed)
    total = sum(s.count for s in selection)
    key = choice.key
    trained_on = 0

    started = time.perf_counter()
    empty = None
    grows_graph = append is not None and choice.is_graph
    if append is not None and not grows_graph:
        trained = append.base
    if choice.trains and total:
        if trained is not None:
            empty = runner.submit("load-trained", _load_trained, str(trained))
        else:
            sample = sample_rows(selection, choice.train_size, rng)
            trained_on = sum(s.count for s in sample)
            empty = runner.submit("train", _train, key, dim, sample)
            runner.gather([empty])
    timer["train"] = time.perf_counter() - started

    started = time.perf_counter()
    mergeable = choice.is_ivf and empty is not None
    adding = (
        append.rows if append is not None and (mergeable or grows_graph) else selection
    )
    groups = (
        group_shards(adding, runner.threads, PART_BYTES // (4 * dim))
        if mergeable
        else [list(adding)]
    )
    if mergeable and (len(groups) > 1 or append is not None):
        parts = [
            runner.submit(
                "add", _add, empty, key, dim, group, str(folder / f"part-{i:05d}.faiss")
            )
            for i, group in enumerate(groups)
        ]
        base = (str(append.base), append.drop) if append is not None else ()
        merged = runner.submit(
            "merge", _merge, parts, empty, str(folder), choice.on_disk, *base
        )
    else:
        merged = runner.submit(
            "add",
            _add_and_place,
            empty,
            key,
            dim,
            groups[0] if groups else [],
            str(folder),
            choice.on_disk and mergeable,
            *((str(append.base), append.copies) if grows_graph else ()),
        )
    ((count, n_copies),) = runner.gather([merged])
    timer["add+merge"] = time.perf_counter() - started

    started = time.perf_counter()
    quality, params = measure(runner, selection, dim, folder, choice, settings, rng)
    timer["measure"] = time.perf_counter() - started
    return BuiltIndex(
        folder,
        choice,
        int(count),
        trained_on,
        sum(s.count for s in adding),
        params,
        quality,
        {k: round(v, 3) for k, v in timer.items()},
        n_copies,
    )


def measure(
    runner: Runner,
    selection: Sequence[ShardRows],
    dim: int,
    folder: Path,
    choice: IndexChoice,
    settings: IndexSettings,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Recall@k against exact search, tuned search parameters, latency, bytes.

    Queries are indexed vectors drawn at random and moved to QUERY_COSINE of
    where they were, in a random direction: like a user's query, each is near
    an indexed image but is not one, and its source counts among its exact
    neighbours (finding it is most of what a search for a copy is for).
    """
    total = sum(s.count for s in selection)
    index_bytes = _folder_bytes(folder)
    if total < 1:
        return {"bytes": index_bytes, "queries": 0}, {}
    n_queries = settings.queries
    if choice.kind == "flat":
        n_queries = min(n_queries, EXACT_QUERIES)
    sample = sample_rows(selection, min(n_queries, total), rng)
    k = min(settings.recall_k, total)
    width = min(k + TIE_ROOM, total)
    evaluating = (str(folder), choice.on_disk, k, settings.recall_target)
    if total <= MEASURE_IN_ONE_TASK:
        # Milliseconds of work: the hops between five tasks cost more.
        report = runner.submit(
            "evaluate", _measure_whole, sample, selection, width, settings.seed,
            *evaluating,
        )  # fmt: skip
    else:
        queries = runner.submit(
            "queries", _perturbed_rows, sample, QUERY_COSINE, settings.seed
        )
        groups = group_shards(selection, runner.threads, PART_BYTES // (4 * dim))
        partial = [
            runner.submit("exact", _exact_topk, queries, group, width)
            for group in groups
        ]
        truth = runner.submit("exact", _merge_topk, width, *partial)
        report = runner.submit("evaluate", _evaluate, queries, truth, *evaluating)
    (result,) = runner.gather([report])
    params = result.pop("params")
    result["bytes"] = index_bytes
    return result, params


def sample_rows(
    selection: Sequence[ShardRows], n: int, rng: np.random.Generator
) -> list[ShardRows]:
    """``n`` rows drawn uniformly at random from all of ``selection``'s rows."""
    counts = np.array([s.count for s in selection], np.int64)
    total = int(counts.sum())
    n = min(n, total)
    if n <= 0:
        return []
    picked = np.sort(rng.choice(total, size=n, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    which = np.searchsorted(starts, picked, side="right") - 1
    out = []
    for s in np.unique(which):
        shard = selection[s]
        local = picked[which == s] - starts[s]
        rows = local if shard.rows is None else shard.rows[local]
        out.append(ShardRows(shard.path, rows, len(rows)))
    return out


def group_shards(
    selection: Sequence[ShardRows], threads: int, max_rows: int
) -> list[list[ShardRows]]:
    """Consecutive groups of shards, at least one per thread, each <= ``max_rows``."""
    total = sum(s.count for s in selection)
    if not selection:
        return []
    n_groups = max(threads, -(-total // max(1, max_rows)))
    n_groups = min(n_groups, len(selection))
    target = total / n_groups
    groups: list[list[ShardRows]] = [[]]
    filled = 0
    for shard in selection:
        if (
            groups[-1]
            and filled + shard.count > target * 1.0001
            and (len(groups) < n_groups)
        ):
            groups.append([])
            filled = 0
        groups[-1].append(shard)
        filled += shard.count
    return groups


# --- tasks: run on workers; arguments and results are small or buffers ------


def _threads_here(alone: bool) -> None:
    """FAISS's OpenMP threads: all cores for a stage that runs alone.

    Dask's Nanny sets OMP_NUM_THREADS=1 in workers, which FAISS reads at import.
    """
    import faiss

    if alone:
        n = len(os.sched_getaffinity(0))
    else:
        try:
            from distributed import get_worker

            n = get_worker().state.nthreads
        except (ImportError, ValueError):
            n = 1
    faiss.omp_set_num_threads(max(1, n))


def _load_rows(sample: list[ShardRows]) -> tuple[np.ndarray, np.ndarray]:
    loaded = [s.load() for s in sample]
    if not loaded:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return (
        np.concatenate([ids for ids, _ in loaded]),
        np.concatenate([v for _, v in loaded]),
    )


def _perturbed_rows(
    sample: list[ShardRows], cosine: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The sampled rows, each turned to ``cosine`` of itself, norms kept."""
    ids, vectors = _load_rows(sample)
    if not len(ids):
        return ids, vectors
    rng = np.random.default_rng(seed)
    away = rng.standard_normal(vectors.shape).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-12)
    away -= (away * unit).sum(1, keepdims=True) * unit
    away /= np.maximum(np.linalg.norm(away, axis=1, keepdims=True), 1e-12)
    moved = cosine * vectors + np.sqrt(1 - cosine**2) * norms * away
    return ids, moved.astype(np.float32)


def _train(key: str, dim: int, sample: list[ShardRows]) -> np.ndarray:
    _threads_here(alone=True)
    _, vectors = _load_rows(sample)
    index = fx.new_index(key, dim)
    index.train(vectors)
    return fx.serialize(index)


def _load_trained(path: str) -> np.ndarray:
    on_disk = (Path(path).parent / IVFDATA_FILE).exists()
    return fx.serialize(fx.empty_copy(fx.read_index_at(path, on_disk)))


def _fill(
    empty: np.ndarray | None,
    key: str,
    dim: int,
    group: list[ShardRows],
    base: str | None = None,
    copies: np.ndarray | None = None,
):
    """The filled index and its copies table: a graph index (HNSW) stores
    each distinct vector once (pipeline/copies.py), other kinds every row.

    ``base``: a graph's previous version, grown by ``group`` (its table so
    far: ``copies``); a new row equal to a node it holds becomes a copy.
    """
    if base is not None:
        index = fx.read_index_at(base, False)
    else:
        index = fx.deserialize(empty) if empty is not None else fx.new_index(key, dim)
    # A Flat index grows by doubling: without this its peak is ~1.5x its vectors.
    fx.reserve(index, index.ntotal + sum(s.count for s in group))
    adder = DistinctAdder(index, copies) if fx.is_graph(index) else None
    if adder is not None and base is not None:
        for ids, vectors in fx.stored_vectors(index):
            adder.know(ids, vectors)
    for shard in group:
        ids, vectors = shard.load()
        if not len(ids):
            continue
        if adder is not None:
            adder.add(ids, vectors)
        else:
            index.add_with_ids(vectors, ids)
    return index, (adder.table() if adder is not None else None)


def _add(
    empty: np.ndarray | None, key: str, dim: int, group: list[ShardRows], out: str
) -> str:
    _threads_here(alone=False)
    index, _ = _fill(empty, key, dim, group)  # IVF: no copies table
    _write(index, Path(out))
    return out


def _add_and_place(
    empty: np.ndarray | None,
    key: str,
    dim: int,
    group: list[ShardRows],
    folder: str,
    on_disk: bool,
    base: str | None = None,
    copies: np.ndarray | None = None,
) -> tuple[int, int]:
    """One add task that is also the merge: Flat, HNSW (``base``: grown from
    its previous version, see :func:`_fill`), or a single IVF group.

    Returns the images the index answers for, its stored copies included,
    and how many of them are such copies.
    """
    _threads_here(alone=True)
    index, copies = _fill(empty, key, dim, group, base, copies)
    if on_disk:
        part = Path(folder) / "part-00000.faiss"
        _write(index, part)
        return _merge([str(part)], fx.serialize(fx.empty_copy(index)), folder, True)
    if copies is not None and len(copies):
        with atomic_file(Path(folder) / COPIES_FILE) as f:
            np.save(f, copies, allow_pickle=False)
    _write(index, Path(folder) / INDEX_FILE)
    n_copies = 0 if copies is None else len(copies)
    return int(index.ntotal) + n_copies, n_copies


def _merge(
    parts: list[str],
    empty: np.ndarray,
    folder: str,
    on_disk: bool,
    base: str | None = None,
    drop: np.ndarray | None = None,
) -> tuple[int, int]:
    """Merge the parts (after ``base``'s entries less ``drop``) into ``folder``.

    Returns the images the index holds, and 0: IVF keeps no copies table.
    """
    _threads_here(alone=True)
    out = Path(folder)
    if base is not None:
        index = _append_to(base, parts, empty, out, on_disk, drop)
    elif on_disk:
        from faiss.contrib.ondisk import merge_ondisk

        index = fx.deserialize(empty)
        with fx.stdout_silenced():  # FAISS printf()s as it sizes the file
            merge_ondisk(index, list(parts), str(out / IVFDATA_FILE))
    else:
        index = fx.merge_in_memory(map(_read_part, parts))
    if on_disk:
        fsync_path(out / IVFDATA_FILE)
    _write(index, out / INDEX_FILE)
    count = int(index.ntotal)
    del index
    for part in parts:
        Path(part).unlink(missing_ok=True)
    return count, 0


def _append_to(
    base: str,
    parts: list[str],
    empty: np.ndarray,
    out: Path,
    on_disk: bool,
    drop: np.ndarray | None,
):
    """The previous index less ``drop``, plus the parts: nothing encoded again.

    The previous version's files are only read (search may be reading them).
    In memory, it is read whole and ids removed there; on disk, its mapped
    lists are copied into a new ``index.ivfdata`` leaving ``drop`` out.
    """
    if not on_disk:
        index = fx.read_index_at(base, False)
        fx.remove_ids(index, drop if drop is not None else np.zeros(0, np.int64))
        return fx.merge_in_memory(itertools.chain([index], map(_read_part, parts)))
    previous = fx.read_index_at(base, True)
    index = fx.deserialize(empty)
    with fx.stdout_silenced():
        fx.to_disk_lists(index, out / IVFDATA_FILE)
        fx.copy_lists(index, previous, drop)
        for part in parts:
            fx.copy_lists(index, _read_part(part))
    return index


def _read_part(path: str):
    with open(path, "rb") as f:
        return fx.read_index(f)


def _write(index, path: Path) -> None:
    with atomic_path(path) as tmp:
        fx.write_index(index, tmp)


def _exact_topk(
    queries: tuple[np.ndarray, np.ndarray], group: list[ShardRows], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, ids) of each query over ``group``."""
    _, q_vectors = queries
    best_s = np.full((len(q_vectors), k), -np.inf, np.float32)
    best_i = np.full((len(q_vectors), k), -1, np.int64)
    for shard in group:
        ids, vectors = shard.load()
        if not len(ids):
            continue
        scores = q_vectors @ vectors.T
        shard_s, shard_i = _top(scores, np.broadcast_to(ids, scores.shape), k)
        best_s, best_i = _top(
            np.hstack([best_s, shard_s]), np.hstack([best_i, shard_i]), k
        )
    return best_s, best_i


def _merge_topk(k: int, *partials) -> tuple[np.ndarray, np.ndarray]:
    scores = np.hstack([s for s, _ in partials])
    ids = np.hstack([i for _, i in partials])
    return _top(scores, ids, k)


def _top(scores: np.ndarray, ids: np.ndarray, k: int):
    """Each row's ``k`` best (scores, ids), best first.

    Selected in linear time, then sorted: a full sort of each query's scores
    against a 10,000-vector shard took 0.47 s of the 0.55 s spent on that
    shard. Which of several equal scores at the k-th place are kept is
    arbitrary (recall counts scores, so it does not matter).
    """
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, 1)
        ids = np.take_along_axis(ids, part, 1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _measure_whole(
    sample: list[ShardRows],
    selection: list[ShardRows],
    width: int,
    seed: int,
    *evaluating: Any,
) -> dict[str, Any]:
    """The measuring of a small index as one task: queries, the exact
    neighbours, then :func:`_evaluate` (``evaluating``: its last four)."""
    queries = _perturbed_rows(sample, QUERY_COSINE, seed)
    truth = _exact_topk(queries, selection, width)
    return _evaluate(queries, truth, *evaluating)


def _evaluate(
    queries: tuple[np.ndarray, np.ndarray],
    truth: tuple[np.ndarray, np.ndarray],
    folder: str,
    on_disk: bool,
    k: int,
    target: float,
) -> dict[str, Any]:
    """Tune the speed/recall parameter to ``target`` and time one query there."""
    _threads_here(alone=True)
    _, q_vectors = queries
    index = fx.read_index_at(Path(folder) / INDEX_FILE, on_disk)
    copies = folder_copies(folder)
    name = fx.search_param_name(index)
    ivf = fx.ivf_of(index)
    steps: tuple[int, ...] = ()
    if name == "nprobe":
        steps = tuple(s for s in IVF_STEPS if s < ivf.nlist) + (ivf.nlist,)
    elif name == "efSearch":
        steps = HNSW_STEPS
    tried: list[tuple[int, float]] = []
    params: dict[str, int] = {}
    recall = _recall(index, copies, q_vectors, truth, k)
    for value in steps:
        fx.set_search_params(index, {name: value})
        recall = _recall(index, copies, q_vectors, truth, k)
        tried.append((value, round(recall, 4)))
        params = {name: value}
        if recall >= target:
            break
    p50, p99, timed = _latency(index, copies, q_vectors[:LATENCY_QUERIES], k)
    return {
        "recall_at_k": round(recall, 4),
        "k": k,
        "queries": len(q_vectors),
        "target": target,
        "reached": recall >= target,
        "tuned": {name: tried} if name else {},
        "p50_ms": p50,
        "p99_ms": p99,
        "timed": timed,
        "params": params,
    }


def _recall(
    index,
    copies: Copies,
    q_vectors: np.ndarray,
    truth: tuple[np.ndarray, np.ndarray],
    k: int,
) -> float:
    """Share of the k found per query that score at least the exact k-th.

    Measured by score, not by id: among equally good neighbours (ties at the
    k-th score) any k are right. ``truth`` holds each query's exact best
    (scores, ids), at least k wide and best first.
    """
    scores, found = copies.search(index, q_vectors, k)
    exact = scores if fx.scores_exactly(index) else None
    return recall_by_score(found, *truth, k, found_scores=exact)


def recall_by_score(
    found: np.ndarray,
    exact_scores: np.ndarray,
    exact_ids: np.ndarray,
    k: int,
    found_scores: np.ndarray | None = None,
) -> float:
    """Recall@k of ``found`` ids against exact (scores, ids) with ties.

    A found id is a hit when it is one of the exact neighbours that score at
    least the k-th exact score (less TIE_COSINE), or, given the exact
    ``found_scores`` (an index of whole vectors), when it scores that well:
    an image copied more than TIE_ROOM times has more equally good copies
    than the truth keeps. Each query wants as many as it has exact
    neighbours, at most k.
    """
    hits = 0
    wanted = 0
    for q, (row, scores, ids) in enumerate(
        zip(found, exact_scores, exact_ids, strict=True)
    ):
        valid = ids >= 0
        have = min(k, int(valid.sum()))
        if not have:
            continue
        kth = scores[have - 1] - TIE_COSINE
        good = set(ids[valid & (scores >= kth)].tolist())
        right = np.isin(row[:k], list(good))
        if found_scores is not None:
            right |= (row[:k] >= 0) & (found_scores[q, :k] >= kth)
        hits += min(have, int(right.sum()))
        wanted += have
    return hits / wanted if wanted else 1.0


def _latency(
    index, copies: Copies, queries: np.ndarray, k: int
) -> tuple[float, float, int]:
    """p50 and p99 in ms of one query at a time, and how many were timed."""
    times: list[float] = []
    for row in queries:
        t = time.perf_counter()
        copies.search(index, row[None, :], k)
        times.append((time.perf_counter() - t) * 1000)
        if len(times) >= LATENCY_MIN and sum(times) >= LATENCY_SECONDS * 1000:
            break
    if not times:
        return 0.0, 0.0, 0
    p50, p99 = np.percentile(times, [50, 99])
    return round(float(p50), 3), round(float(p99), 3), len(times)


def _folder_bytes(folder: Path) -> int:
    return sum(
        (folder / name).stat().st_size
        for name in (INDEX_FILE, IVFDATA_FILE)
        if (folder / name).exists()
    )
