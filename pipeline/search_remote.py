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
the client searches and yields the results in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from imgindex.pipeline.config import seconds_value
from imgindex.pipeline.dispatch import DispatchSettings, Watchdog
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
    from distributed import as_completed

    runner = searcher.runner
    starts = iter(range(0, len(images), step))
    # Each task in flight: its batch's start, and, for a check, the hits it
    # tells the kinds of (None for an embedding).
    running: dict[Any, tuple[int, dict[int, list[Hit]] | None]] = {}
    finished = as_completed(loop=runner.client.loop)
    ready: dict[int, dict[int, list[Hit]]] = {}
    # batch start -> its queries' bytes, here and scattered to the workers
    sent: dict[int, tuple[dict[int, Any], Any]] = {}
    held = [0]  # bytes of the queries sent, not yet searched and checked
    window = BATCHES_PER_THREAD * runner.threads
    tries: dict[int, int] = {}  # batch start -> times sent again
    check_here = copies and not searcher.checks_on_workers()

    def failed(n: int, error: DecodeError) -> None:
        if unreadable is None:
            raise error
        unreadable(n, error)

    def submit(start, found, stage: str, fn: Callable, *args: Any) -> None:
        future = runner.submit(stage, fn, *args)
        running[future] = (start, found)
        ours[future.key] = (start, future)
        finished.add(future)

    def send() -> bool:
        in_flight = len(running)
        if in_flight >= window or (in_flight >= 2 and held[0] > BYTES_IN_FLIGHT):
            return False
        start = next(starts, None)
        if start is None:
            return False
        batch = {}
        for n, query in enumerate(images[start : start + step], start=start):
            try:
                batch[n] = read_query(opened(query))
            except DecodeError as e:
                failed(n, e)
        held[0] += _nbytes(batch)
        sent[start] = batch, scatter(batch)
        embed(start)
        return True

    def scatter(batch: dict[int, Any]) -> Any:
        # Scattered, not task arguments: a batch of photos is tens of MB (a
        # task graph that big is slow, and warned of), and with ``copies``
        # its check reads the same bytes again on the workers. One object
        # (the list inside the list scattered), kept whole on one worker.
        [on_workers] = runner.client.scatter([list(batch.items())], hash=False)
        ours[on_workers.key] = (None, on_workers)
        return on_workers

    def embed(start: int) -> None:
        spec, turns = searcher.spec, searcher.turns
        submit(start, None, "embed", embed_queries, spec, sent[start][1], turns)

    def check(start: int, found: dict[int, list[Hit]]) -> None:
        rows = searcher.hit_rows(found)
        on_workers = sent[start][1]
        submit(start, found, "check", check_queries, searcher.source, on_workers, rows)

    def resend(start: int, found: dict[int, list[Hit]] | None, lost: str) -> None:
        """A batch's task again, its bytes scattered again: they, or the
        task, went with a worker that died (a node lost mid-search)."""
        tries[start] = tries.get(start, 0) + 1
        stage = "embed" if found is None else "check"
        if tries[start] > RESENDS:
            raise ImgindexError(
                f"a search's {stage} task was lost {tries[start]} times with "
                f"its worker: {lost}"
            )
        logger.warning(
            "queries %d-%d: their %s task was lost with a worker (%s); sent again",
            start + 1,
            min(start + step, len(images)),
            stage,
            lost,
        )
        batch, lost_bytes = sent[start]
        ours.pop(lost_bytes.key, None)
        sent[start] = batch, scatter(batch)
        if found is None:
            embed(start)
        else:
            check(start, found)

    def searched(start: int, got: EmbeddedQueries) -> None:
        batch, _ = sent[start]
        for n, reason in got.unreadable:
            failed(n, DecodeError(getattr(batch[n], "name", "uploaded image"), reason))
        searcher.check_dim(got.vectors.shape[1])
        found = dict(
            zip(got.positions, searcher.search_embedded(got.vectors, k), strict=True)
        )
        if not (copies and found):
            done(start, found)
            return
        if check_here:
            done(start, searcher.with_kinds_here({n: batch[n] for n in found}, found))
            return
        check(start, found)

    def done(start: int, found: dict[int, list[Hit]]) -> None:
        batch, on_workers = sent.pop(start)  # the scattered bytes are let go
        ours.pop(on_workers.key, None)
        held[0] -= _nbytes(batch)
        ready[start] = found

    # A frozen worker (SIGSTOP, a dead NFS mount) keeps its connection and
    # would hold its batches until Dask's worker-ttl: the build's watchdog
    # drops it after imgindex.worker-unresponsive, and its batches are sent
    # again (resend).
    ours: dict[Any, tuple[int | None, Any]] = {}
    watchdog = Watchdog(
        runner.client,
        DispatchSettings(
            timeout=0, unresponsive=seconds_value(None, "imgindex.worker-unresponsive")
        ),
        ours,
    )
    watchdog.start()
    try:
        while send():
            pass
        for start in range(0, len(images), step):
            while start not in ready:
                future = next(finished)
                at, found = running.pop(future)
                ours.pop(future.key, None)
                try:
                    result = _result(runner, future, "check" if found else "embed")
                except _Lost as lost:
                    resend(at, found, str(lost))
                    continue
                if found is None:
                    searched(at, result)
                else:
                    done(at, with_kinds(found, result))
                while send():
                    pass
            found = ready.pop(start)
            end = min(start + step, len(images))
            if progress is not None:
                progress(end, len(images))
            for n in range(start, end):
                yield found.get(n, [])
    finally:
        watchdog.stop()
        runner.cancel_running()


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
