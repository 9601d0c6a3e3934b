"""Queries embedded, and their hits told copies or not, on a cluster's workers.

Thousands of queries are minutes of a model's forward passes and of the
geometric check of `--copies`: on an HPC login node shared with hundreds of
users that is not the client's work. Here the client reads each query's
bytes (I/O only) and scatters them to the workers in batches; each batch's
vectors come back and the client searches its index with them (FAISS on
the client, where the index is open and mapped: the workers need not see
it); with ``copies`` the hits go back out to be checked against their
queries by workers that read the dataset, as at build time. Batches stay in
flight, a few for each worker thread, so that the cluster is kept busy while
the client searches and yields the results in order. A worker lost, frozen
or stuck past its time limit costs no query but the one that stuck it.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from imgindex.pipeline.config import seconds_value
from imgindex.pipeline.dispatch import CPU_PARTITION_SIZE, DispatchSettings, Watchdog
from imgindex.pipeline.errors import DecodeError, ImgindexError
from imgindex.pipeline.search import (
    EmbeddedQueries,
    Hit,
    check_queries,
    embed_queries,
    read_query,
    with_kinds,
)

if TYPE_CHECKING:
    from imgindex.pipeline.search import Searcher

logger = logging.getLogger(__name__)

BATCHES_PER_THREAD = 2  # in flight: one running, one waiting to
# ... and no more queries' bytes than this held for them by the client.
BYTES_IN_FLIGHT = 512 << 20
# Times a batch is sent again after its worker died, before the search fails.
RESENDS = 3


def workers_seeing(client: Any, base: str) -> bool:
    """Whether every worker sees the dataset folder ``base`` (read-only: a
    search writes nothing)."""
    from imgindex.cluster.calls import run_on_each

    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    answers = run_on_each(client, _sees_fn(), workers, None, (base,))
    return all(answer is True for answer in answers.values())


def _sees_fn():
    """Runs on each worker; a closure, so cloudpickle sends it by value."""

    def sees(base: str, dask_worker=None) -> bool:
        import os

        return os.path.isdir(base)

    return sees


def iter_remote_hits(
    searcher: Searcher,
    images: Sequence[Any],
    k: int,
    step: int,
    progress: Callable[[int, int], None] | None,
    unreadable: Callable[[int, DecodeError], None] | None,
    opened: Callable[[Any], str | os.PathLike | BinaryIO],
    copies: bool,
) -> Iterator[list[Hit]]:
    """:meth:`Searcher.iter_hits` on ``searcher.runner``'s cluster: ``step``
    queries a task."""
    search = _RemoteSearch(searcher, images, k, step, unreadable, opened, copies)
    yield from search.run(progress)


@dataclass
class _Task:
    """A task in flight: the queries it carries, of one batch."""

    start: int  # its batch's first query
    queries: tuple[int, ...]
    on_workers: Any  # their bytes, scattered
    found: dict[int, list[Hit]] | None  # the hits it checks; None: it embeds

    @property
    def stage(self) -> str:
        return "embed" if self.found is None else "check"


@dataclass
class _Batch:
    queries: dict[int, io.BytesIO]  # the bytes of those that could be read
    tasks: int = 0  # in flight
    found: dict[int, list[Hit]] = field(default_factory=dict)
    scattered: list[Any] = field(default_factory=list)  # let go when done


class _RemoteSearch:
    """One search's batches, from the queries' bytes to their hits."""

    def __init__(
        self,
        searcher: Searcher,
        images: Sequence[Any],
        k: int,
        step: int,
        unreadable: Callable[[int, DecodeError], None] | None,
        opened: Callable[[Any], str | os.PathLike | BinaryIO],
        copies: bool,
    ):
        from distributed import as_completed

        self.searcher, self.runner = searcher, searcher.runner
        self.images, self.k, self.step = images, k, step
        self.unreadable, self.opened = unreadable, opened
        self.copies = copies
        self.check_here = copies and not searcher.checks_on_workers()
        self.starts = iter(range(0, len(images), step))
        self.batches: dict[int, _Batch] = {}  # by first query, until searched
        self.ready: dict[int, dict[int, list[Hit]]] = {}
        self.running: dict[Any, _Task] = {}  # by future
        self.finished = as_completed(loop=self.runner.client.loop)
        self.held = 0  # bytes of the queries sent, not yet searched and checked
        self.window = BATCHES_PER_THREAD * self.runner.threads
        self.resent: dict[tuple[str, tuple[int, ...]], int] = {}
        self.limit = seconds_value(None, "imgindex.task-timeout")
        # Our keys (tasks and scattered bytes), for the build's watchdog: it
        # drops a frozen worker (SIGSTOP, a dead NFS mount), which keeps its
        # connection and would hold its batches until Dask's worker-ttl, and
        # cancels a task running past its limit (a hit's file on a hung
        # mount) and restarts its worker. Either way the task is sent again.
        self.ours: dict[Any, tuple[Any, Any]] = {}
        self.watchdog = Watchdog(
            self.runner.client,
            DispatchSettings.watching(self.limit),
            self.ours,
            self.runner.cancel_running,
        )

    def run(self, progress: Callable[[int, int], None] | None) -> Iterator[list[Hit]]:
        self.watchdog.start()
        try:
            self.send_all()
            total = len(self.images)
            for start in range(0, total, self.step):
                while start not in self.ready:
                    self.take(next(self.finished))
                    self.send_all()
                found = self.ready.pop(start)
                end = min(start + self.step, total)
                if progress is not None:
                    progress(end, total)
                for n in range(start, end):
                    yield found.get(n, [])
        finally:
            self.watchdog.stop()
            self.runner.cancel_running()

    def failed(self, n: int, error: DecodeError) -> None:
        if self.unreadable is None:
            raise error
        self.unreadable(n, error)

    def send_all(self) -> None:
        while self.send():
            pass

    def send(self) -> bool:
        """Read a batch's queries and send them to be embedded, unless enough
        are in flight."""
        in_flight = len(self.running)
        if in_flight >= self.window or (in_flight >= 2 and self.held > BYTES_IN_FLIGHT):
            return False
        start = next(self.starts, None)
        if start is None:
            return False
        batch = self.batches[start] = _Batch({})
        end = start + self.step
        for n, query in enumerate(self.images[start:end], start=start):
            try:
                batch.queries[n] = read_query(self.opened(query))
            except DecodeError as e:
                self.failed(n, e)
        self.held += _nbytes(batch.queries)
        self.submit(start, tuple(batch.queries), None)
        return True

    def submit(
        self,
        start: int,
        queries: tuple[int, ...],
        found: dict[int, list[Hit]] | None,
        on_workers: Any = None,
    ) -> None:
        """A task for ``queries`` of batch ``start``: their embedding, or
        with ``found`` the check of their hits; their bytes scattered, unless
        ``on_workers`` has them there already."""
        batch = self.batches[start]
        if on_workers is None:
            on_workers = self.scatter(batch, queries)
        task = _Task(start, queries, on_workers, found)
        if found is None:
            spec, turns = self.searcher.spec, self.searcher.turns
            future = self.runner.submit("embed", embed_queries, spec, on_workers, turns)
        else:
            rows = self.searcher.hit_rows(found)
            future = self.runner.submit(
                "check", check_queries, self.searcher.source, on_workers, rows
            )
            # As a build's partition of as many images is given the limit.
            hits = sum(len(r) for r in rows.values())
            self.watchdog.limits[future.key] = self.limit * max(
                1.0, hits / CPU_PARTITION_SIZE
            )
        batch.tasks += 1
        self.running[future] = task
        self.ours[future.key] = (task, future)
        self.finished.add(future)

    def scatter(self, batch: _Batch, queries: tuple[int, ...]) -> Any:
        # Scattered, not task arguments: a batch of photos is tens of MB (a
        # task graph that big is slow, and warned of), and with ``copies``
        # its check reads the same bytes again on the workers. One object
        # (the list inside the list scattered), kept whole on one worker.
        items = [(n, batch.queries[n]) for n in queries]
        # With no worker on the cluster, the scheduler holds the bytes back
        # until one joins, as long as the watchdog waits for one.
        wait = self.watchdog.no_workers if self.watchdog.no_workers > 0 else 1e9
        for tried in range(1, RESENDS + 2):
            try:
                [on_workers] = self.runner.client.scatter(
                    [items], hash=False, timeout=wait
                )
                break
            except OSError as e:
                # The worker chosen froze (the watchdog drops it: its
                # connection closes) or died while the bytes were on their way.
                if self.runner.client.status != "running":
                    raise self.runner.lost_scheduler() from e
                if "No valid workers found" in str(e):  # distributed's words
                    raise self.runner.no_workers(self.watchdog.no_workers) from e
                if tried > RESENDS:
                    raise
                logger.warning(
                    "could not send a batch of queries to the workers (%s); "
                    "sending it again",
                    " ".join(str(e).split())[:200],
                )
        self.ours[on_workers.key] = (None, on_workers)
        batch.scattered.append(on_workers)
        return on_workers

    def take(self, future: Any) -> None:
        """A finished task's result, or what to do about its failure."""
        task = self.running.pop(future)
        self.ours.pop(future.key, None)
        limit = self.watchdog.limits.pop(future.key, self.limit)
        self.batches[task.start].tasks -= 1
        if self.watchdog.no_workers_for is not None:
            raise self.runner.no_workers(self.watchdog.no_workers_for)
        try:
            result = _result(self.runner, future, task.stage)
        except _Lost as lost:
            if future.key in self.watchdog.timed_out:
                self.watchdog.wait_restarted(future.key)
                self.timed_out(task, limit)
            else:
                self.resend(task, str(lost))
            return
        if task.found is None:
            self.embedded(task, result)
        else:
            self.done(task.start, with_kinds(task.found, result))

    def resend(self, task: _Task, lost: str) -> None:
        """A task again, its bytes scattered again: they, or the task, went
        with a worker that died (a node lost mid-search)."""
        tried = (task.stage, task.queries)
        self.resent[tried] = self.resent.get(tried, 0) + 1
        if self.resent[tried] > RESENDS:
            raise ImgindexError(
                f"a search's {task.stage} task was lost {self.resent[tried]} "
                f"times with its worker: {lost}"
            )
        logger.warning(
            "%s: their %s task was lost with a worker (%s); sent again",
            self.named(task.queries),
            task.stage,
            lost,
        )
        batch = self.batches[task.start]
        self.ours.pop(task.on_workers.key, None)
        if task.on_workers in batch.scattered:
            batch.scattered.remove(task.on_workers)
        self.submit(task.start, task.queries, task.found)

    def timed_out(self, task: _Task, limit: float) -> None:
        """A task ran past its limit, and its worker was restarted: its
        queries are sent again one a task, so that one query whose image
        hangs the decoder, or whose hit's file hangs its reader, costs that
        query alone: it is reported unreadable, or its hits undecided."""
        if len(task.queries) > 1:
            logger.warning(
                "%s: their %s task ran past its time limit "
                "(imgindex.task-timeout); sent again one query a task",
                self.named(task.queries),
                task.stage,
            )
            for n in task.queries:
                found = None if task.found is None else _only(task.found, n)
                if task.found is None or found:
                    self.submit(task.start, (n,), found)
            self.done(task.start, {})  # in case none had hits to check
            return
        [n] = task.queries
        if task.found is None:
            self.failed(
                n,
                DecodeError(
                    self.name(task.start, n),
                    f"timed out after {limit:g} s (imgindex.task-timeout) "
                    "while decoding or embedding this query",
                ),
            )
            self.done(task.start, {})
            return
        logger.warning(
            "%s: checking its hits timed out after %g s (imgindex.task-timeout): "
            "they are left undecided",
            self.name(task.start, n),
            limit,
        )
        kinds = {n: ["undecided"] * len(task.found[n])}
        self.done(task.start, with_kinds(task.found, kinds))

    def embedded(self, task: _Task, got: EmbeddedQueries) -> None:
        """Search the index with a batch's vectors; check the hits, or done."""
        batch = self.batches[task.start]
        for n, reason in got.unreadable:
            self.failed(n, DecodeError(self.name(task.start, n), reason))
        self.searcher.check_dim(got.vectors.shape[1])
        found = dict(
            zip(
                got.positions,
                self.searcher.search_embedded(got.vectors, self.k),
                strict=True,
            )
        )
        if not (self.copies and found):
            self.done(task.start, found)
        elif self.check_here:
            queries = {n: batch.queries[n] for n in found}
            self.done(task.start, self.searcher.with_kinds_here(queries, found))
        else:
            self.submit(task.start, task.queries, found, task.on_workers)

    def done(self, start: int, found: dict[int, list[Hit]]) -> None:
        """A task's last word on its queries; the batch's, after its last."""
        batch = self.batches[start]
        batch.found.update(found)
        if batch.tasks:
            return
        del self.batches[start]
        for on_workers in batch.scattered:  # the bytes are let go
            self.ours.pop(on_workers.key, None)
        self.held -= _nbytes(batch.queries)
        self.ready[start] = batch.found

    def name(self, start: int, n: int) -> str:
        """Query ``n``'s name, of batch ``start``."""
        return getattr(self.batches[start].queries[n], "name", "uploaded image")

    def named(self, queries: tuple[int, ...]) -> str:
        first, last = min(queries) + 1, max(queries) + 1
        return f"query {first}" if first == last else f"queries {first}-{last}"


def _only(found: dict[int, list[Hit]], n: int) -> dict[int, list[Hit]]:
    return {n: found[n]} if n in found else {}


def _nbytes(batch: dict[int, Any]) -> int:
    return sum(len(data.getbuffer()) for data in batch.values())


class _Lost(Exception):
    """A task, or the bytes it reads, went with a worker that died."""


def _result(runner: Any, future: Any, stage: str) -> Any:
    """A task's result; its failure on the cluster as one line (an
    environment that differs from the client's, a worker's missing package).

    Raises
    ------
    _Lost
        Where the task or its scattered bytes were lost with a worker.
    """
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    try:
        return runner.gather([future])[0]
    except ImgindexError:
        raise
    except (FutureCancelledError, KilledWorker) as e:
        # The first is a BaseException (asyncio's CancelledError), not an
        # Exception: caught here by name.
        raise _Lost(" ".join(str(e).split())) from e
    except Exception as e:
        cause = e.__cause__ or e.__context__
        why = " ".join(f"{type(e).__name__}: {e}".split())
        if cause is not None:
            why += " (" + " ".join(f"{type(cause).__name__}: {cause}".split()) + ")"
        raise ImgindexError(
            f"a search's {stage} task failed on the cluster: {why}"
        ) from e
