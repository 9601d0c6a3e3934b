"""Send partitions to the cluster and stream results back: the only caller of submit.

Every partition is submitted at the start, so the scheduler (and its
dashboard) knows the whole job: its progress bar counts the build's
partitions, not a window of them (up to ``max_queued``, about 2.4 KiB each on
the scheduler: records travel packed). Worker memory stays bounded by Dask's own
queuing (``distributed.scheduler.worker-saturation``): the scheduler hands
a worker a new task only as one finishes, and keeps the rest. Where it
would not queue them (queuing switched off, or tasks restricted to GPU
workers, which Dask never queues), partitions go out through a window of
``tasks_per_thread`` per worker thread instead. Each result is handed to
the caller as soon as it arrives. Dask's progress bar counts only the tasks
the scheduler still holds, so where workers write shards (a result is then a
shard's name, counts and failures: about 1 KB) each finished task is held
until the dataset is done and the bar keeps its full total; where vectors
travel back, each result is released as it arrives (worker memory comes
first) and the bar's total shrinks as partitions finish.

What can go wrong, and what happens:
- a bad image: a Failure row inside a normal result (see embed.py);
- a task raises (a flaky file system, a worker short of memory): Dask retries
  it ``retries`` times, then the build fails with the task's error;
- a worker process dies: Dask reschedules its tasks on other workers; if the
  same partition keeps killing workers (KilledWorker), it is split in two and
  each half resubmitted, until the one image responsible is isolated and
  reported; its partition-mates are still indexed;
- a task hangs: Dask has no task timeout (dask/distributed#391), so a watchdog
  cancels partitions running past the limit, restarts their worker, and splits
  them the same way. A task's age is counted on the client's own clock: the
  durations the scheduler holds come from the worker's heartbeats, which a
  frozen worker no longer sends;
- a worker freezes (SIGSTOP, ``scontrol suspend``, a dead NFS mount): it stops
  heartbeating but keeps its connection, so the scheduler would wait for it
  (``worker-ttl``, 5 minutes by default, or never where that is off). The
  watchdog removes a worker silent for ``imgindex.worker-unresponsive`` while
  it holds our tasks (running, queued there, or finished and not yet
  collected), and Dask reschedules them; nothing is split or failed;
- every worker leaves (their batch jobs reached their walltime, someone
  stopped them): Dask would hold the tasks for ever, and the build would
  wait without a word. The watchdog says so once none has been there for
  _NO_WORKERS_GRACE, and the build stops with one line after
  ``imgindex.no-workers-timeout``, unless a worker joins first;
- the scheduler is lost: the build stops with one line; re-running resumes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from imgindex.pipeline.cancel import Cancel, cancel_futures
from imgindex.pipeline.discover import Failure, ImageRecord, pack_records
from imgindex.pipeline.embed import (
    GPU_BATCH_SIZE,
    ModelSpec,
    PartitionResult,
    embed_partition,
)
from imgindex.pipeline.errors import BuildFailed
from imgindex.pipeline.parts import PartSlice
from imgindex.pipeline.sources import Source
from imgindex.pipeline.spans import task_label

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

# Task sizes when imgindex.partition-size is auto: short on CPUs, so the last
# tasks end together; on GPUs, long enough that refilling the decode pipeline
# at each task's start (one batch) costs a few per cent at most.
CPU_PARTITION_SIZE = 32
GPU_PARTITION_BATCHES = 32
# Partitions per submission: each batch is one message to the scheduler and
# one priority step (see _submit_batch).
SUBMIT_BATCH = 100

Partition = Sequence[ImageRecord]
ResultCallback = Callable[[Partition, PartitionResult], None]


@dataclass(frozen=True)
class DispatchSettings:
    retries: int = 3  # retries of a task that raised
    timeout: float = 300.0  # seconds a partition may run; <= 0: no limit
    # partitions in flight per worker thread where the scheduler does not
    # queue them (see the module's docstring); otherwise all are submitted
    tasks_per_thread: int = 3
    # partitions the scheduler may hold at once (each about 2.4 KiB there);
    # a larger build goes out through a window of this many
    max_queued: int = 200_000
    gpu_resource: bool = False  # tasks need the worker resource GPU=1
    unresponsive: float = 60.0  # seconds without a heartbeat: a worker is dropped
    # seconds our tasks may wait on a cluster with no worker; <= 0: for ever
    no_workers: float = 600.0

    @classmethod
    def watching(cls, timeout: float) -> DispatchSettings:
        """The watchdog's settings as configured, with tasks limited to
        ``timeout`` seconds (<= 0: no limit)."""
        from imgindex.pipeline.config import seconds_value

        return cls(
            timeout=timeout,
            unresponsive=seconds_value(None, "imgindex.worker-unresponsive"),
            no_workers=seconds_value(None, "imgindex.no-workers-timeout"),
        )


class PartitionDispatcher:
    """Run ``embed_partition`` over partitions of one dataset on ``client``.

    Parameters
    ----------
    client
        A connected client.
    label
        Dataset name, used in task keys so the dashboard shows one progress
        bar per dataset (``embed[<label>]-<n>-<run id>``).
    source
        The dataset (:class:`pipeline.sources.Source`, or an absolute
        folder), as workers will read it.
    spec
        Model settings sent with every task.
    settings
        Retries, time limit and window size.
    on_result
        Called with each finished partition and its result, in arrival order.
    shard_dir
        Where workers write each partition's shard (a folder they share with
        the client); None: vectors travel back in the results.
    cancel
        Stops :meth:`collect` when requested, from any thread.
    ranks
        Priority ranks shared by the dispatchers of one build (see
        ``_submit_batch``); default: this dispatcher's own.
    """

    def __init__(
        self,
        client: Client,
        label: str,
        source: Source | str,
        spec: ModelSpec,
        settings: DispatchSettings,
        on_result: ResultCallback,
        shard_dir: str | None = None,
        cancel: Cancel | None = None,
        ranks: Iterator[int] | None = None,
    ):
        self.client = client
        self.cancel = cancel or Cancel()
        self.shard_dir = shard_dir
        self.label = task_label(label)
        # Sent with every task: without a tar source's list of shards.
        self.source = source.for_tasks() if isinstance(source, Source) else source
        self.spec = spec
        self.settings = settings
        self.on_result = on_result
        self.run_id = uuid.uuid4().hex[:8]
        self._n_submitted = 0
        self.ranks = ranks if ranks is not None else itertools.count(1)

    def _eligible_threads(self) -> list[int]:
        """Thread counts of the workers that can take our tasks."""
        if not self.settings.gpu_resource:
            return list(self.client.nthreads().values())
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return [w["nthreads"] for w in workers if w["resources"].get("GPU")]

    def threads(self) -> int:
        """Threads of the workers that can take our tasks."""
        return sum(self._eligible_threads()) or 1

    def check_resources(self) -> None:
        """Refuse to queue GPU tasks that no worker could ever run.

        Raises
        ------
        BuildFailed
            If ``gpu_resource`` is asked for and no worker offers it.
        """
        if self.settings.gpu_resource and not self._eligible_threads():
            raise BuildFailed(
                "--gpu-resource asks for workers with the resource GPU, and none "
                "has it; start them with `dask worker --resources GPU=1` or drop "
                "--gpu-resource"
            )

    def on_gpus(self) -> bool:
        """Whether the workers that take our tasks run the model on GPUs.

        Told by the spec's device, or by every such worker offering the
        resource GPU (the GPU guide's layout for GPU nodes); a worker that
        picks cuda by itself without saying so gets CPU-sized tasks.
        """
        if self.spec.device != "auto":
            return self.spec.device == "cuda"
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        offers = [bool(w["resources"].get("GPU")) for w in workers]
        return bool(offers) and (self.settings.gpu_resource or all(offers))

    def partition_size(self, n_images: int, largest: int = 0) -> int:
        """Images per task: at most ``largest`` (0: 32 on CPUs, 32 batches on
        GPUs, so that a GPU's decode pipeline rarely drains between tasks);
        small jobs are cut finer so that every worker thread gets 2 tasks."""
        if largest <= 0:
            if self.on_gpus():
                largest = GPU_PARTITION_BATCHES * (
                    self.spec.batch_size or GPU_BATCH_SIZE
                )
            else:
                largest = CPU_PARTITION_SIZE
        per_task = -(-n_images // (2 * self.threads()))
        return max(1, min(largest, per_task))

    def run(self, partitions: Sequence[Partition]) -> int:
        """Embed every partition, handing each result to ``on_result`` as it arrives.

        :meth:`start`, then :meth:`collect`.
        """
        self.start(partitions)
        return self.collect()

    def start(self, partitions: Sequence[Partition]) -> None:
        """Submit the partitions (all, or a first window) and start the watchdog.

        A build of several datasets starts each before collecting any, so
        the scheduler knows the whole job; ``ranks`` (shared) keeps their
        partitions in that order.

        Raises
        ------
        BuildFailed
            If no worker can take the tasks, or the scheduler is lost.
        """
        from distributed import as_completed

        self.check_resources()
        self._queue = list(reversed(partitions))
        self._in_flight: dict[str, tuple[Partition, object]] = {}  # key -> part, fut
        self._ac = as_completed(loop=self.client.loop)
        self._watchdog = Watchdog(
            self.client, self.settings, self._in_flight, self._cancel_in_flight
        )
        self._window_size = self._window(len(partitions))
        # Single images whose worker died while they were queued or running
        # beside another task: Dask cannot tell which of them killed it, so
        # each runs again alone, at the end, and is blamed only if it kills
        # its worker then.
        self._suspects: list[Partition] = []
        self._alone: set[str] = set()
        self._split: list[Partition] = []
        self._finished: list = []  # held (see the module's docstring)
        try:
            self._fill()
        except BaseException as e:
            raise self._abandoned(e) from None
        self._watchdog.start()

    def collect(self) -> int:
        """Hand each partition's result to ``on_result`` as it arrives.

        Returns the number of results handed over (split partitions count
        each part). Nothing is kept here, so memory stays flat.

        Raises
        ------
        BuildFailed
            If a task keeps raising after its retries, or the scheduler is lost.
        BuildCancelled
            If ``cancel`` was requested.
        """
        n_results = 0
        try:
            with self.cancel.hook(self.abandon):
                self.cancel.check()
                for fut in self._ac:
                    self.cancel.check()
                    if self._watchdog.no_workers_for is not None:
                        raise self._no_workers(self._watchdog.no_workers_for)
                    # Kept in flight while its result is fetched: should its
                    # worker freeze now, the watchdog sees it holds ours.
                    part, _ = self._in_flight[fut.key]
                    result = self._outcome(fut, part)
                    del self._in_flight[fut.key]
                    if self.shard_dir is not None and fut.status == "finished":
                        self._finished.append(fut)
                    del fut  # else the result is released on the worker
                    if result is not None:
                        self.on_result(part, result)
                        n_results += 1
                    del result
                    self._fill()
        except BaseException as e:
            raise self._abandoned(e) from None
        finally:
            self._watchdog.stop()
            self._finished.clear()
        return n_results

    def abandon(self) -> None:
        """Cancel every partition submitted and not yet collected (any thread)."""
        self._cancel_in_flight()
        self._watchdog.stop()

    def _cancel_in_flight(self) -> None:
        # list() of a dict's values runs without giving up the GIL, so the
        # loop in collect() cannot change _in_flight halfway through it.
        futures = [f for _, f in list(self._in_flight.values())]
        with contextlib.suppress(Exception):
            if self.client.status == "running":
                cancel_futures(self.client, futures)

    def _abandoned(self, e: BaseException) -> BaseException:
        """What to raise for ``e``, once no task of ours is left on the cluster.

        A failed or interrupted build must not leave its tasks running on a
        shared cluster (unless the cluster itself is gone).
        """
        self.abandon()
        if isinstance(e, OSError):  # CommClosedError: the scheduler went away
            return self._lost_scheduler()
        return e

    def _fill(self) -> None:
        ac, queue = self._ac, self._queue
        if self._split:  # halves of a partition that failed: ahead of the queue
            self._submit(self._split, again=True)
            self._split = []
        limit = self._window_size or len(queue) + ac.count()
        while queue and ac.count() < limit:
            n = min(len(queue), limit - ac.count(), SUBMIT_BATCH)
            self._submit([queue.pop() for _ in range(n)])
        if not queue and self._suspects and ac.count() == 0:
            self._alone.update(self._submit([self._suspects.pop()], again=True))

    def _submit(self, parts: list[Partition], again: bool = False) -> list[str]:
        futures = self._submit_batch(parts, again)
        for part, fut in zip(parts, futures, strict=True):
            self._in_flight[fut.key] = (part, fut)
        self._ac.update(futures)
        return [fut.key for fut in futures]

    def _outcome(self, fut, part: Partition):
        from distributed import KilledWorker

        watchdog = self._watchdog
        timed_out = fut.key in watchdog.timed_out
        if timed_out:
            # Resubmit only once the stuck worker is back, or the halves could
            # land on it while it restarts and die with it.
            watchdog.wait_restarted(fut.key)
        if fut.status == "finished":
            return fut.result()
        self.cancel.check()  # cancelled by a stop request, not by a lost scheduler
        if self.client.status != "running" or (
            fut.status in ("cancelled", "lost") and not timed_out
        ):
            raise self._lost_scheduler()
        exc = fut.exception() if fut.status == "error" else None
        if timed_out:
            reason = (
                f"timed out after {self.settings.timeout:g} s "
                "(imgindex.task-timeout) while decoding or embedding this image"
            )
        elif isinstance(exc, KilledWorker):
            reason = "worker process died while decoding or embedding this image"
        else:
            raise BuildFailed(
                f"an embedding task of {self.label} failed after "
                f"{self.settings.retries} retries: {type(exc).__name__}: {exc}; "
                "check the workers' logs, or run `imgindex doctor`"
            )
        if len(part) == 1 and not timed_out and fut.key not in self._alone:
            logger.info(
                "%s: %s: its worker died; trying it alone", self.label, part[0].path
            )
            self._suspects.append(part)
            return None
        if len(part) == 1:
            logger.warning("%s: %s: %s", self.label, part[0].path, reason)
            return self._failed(part, reason)
        mid = len(part) // 2
        logger.warning(
            "%s: a partition of %d images %s; splitting it to find the image",
            self.label,
            len(part),
            "timed out" if timed_out else "killed its workers",
        )
        self._split.extend([part[:mid], part[mid:]])
        return None

    def _lost_scheduler(self) -> BuildFailed:
        return BuildFailed(
            f"lost the scheduler {self.client.scheduler.address} while "
            f"embedding {self.label}; finished partitions were saved: once "
            "the cluster is back, run the same command again to resume"
        )

    def _no_workers(self, seconds: float) -> BuildFailed:
        return BuildFailed(
            f"no worker has been on the cluster for {seconds:.0f} s "
            f"(imgindex.no-workers-timeout) while embedding {self.label}; "
            "finished partitions were saved: once workers are back, run the "
            "same command again to resume"
        )

    def _failed(self, part: Partition, reason: str) -> PartitionResult:
        return PartitionResult(
            ids=np.zeros(0, np.int64),
            paths=[],
            vectors=np.zeros((0, 0), np.float32),
            failures=[Failure(r.path, reason, transient=True) for r in part],
            worker="",
        )

    def _window(self, n_partitions: int) -> int | None:
        """Partitions to keep in flight; None: all of them (the scheduler queues)."""
        window = max(2, self.threads() * self.settings.tasks_per_thread)
        if self.settings.gpu_resource:
            return window  # resource-restricted tasks are never queued
        try:
            saturation = self.client.run_on_scheduler(_worker_saturation_fn())
        except Exception as e:  # an old scheduler: keep its workers' memory safe
            logger.debug("could not read worker-saturation: %s", e)
            return window
        if not math.isfinite(saturation):
            logger.info(
                "the scheduler does not queue tasks (worker-saturation %s): "
                "sending %d partitions at a time, so the dashboard shows only those",
                saturation,
                window,
            )
            return window
        if n_partitions > self.settings.max_queued:
            logger.info(
                "%s: %d partitions; the scheduler holds %d at a time "
                "(imgindex.max-queued-partitions)",
                self.label,
                n_partitions,
                self.settings.max_queued,
            )
            return self.settings.max_queued
        return None

    def _submit_batch(self, parts: list[Partition], again: bool) -> list:
        """Submit ``parts`` in one message, one task each.

        Each batch ranks one step below the last (Dask runs higher
        priorities first), counting across the datasets of one build
        (``ranks``), so they run in order; separate builds on one scheduler
        count apart and take turns batch by batch instead of the later one
        waiting for all of the earlier one's partitions. Parts submitted
        ``again`` (halves of a failed partition, a suspect alone) go first,
        so that a dataset's end does not wait behind the queue.
        """
        first = self._n_submitted
        self._n_submitted += len(parts)
        keys = [
            f"embed[{self.label}]-{n:05d}-{self.run_id}"
            for n in range(first, first + len(parts))
        ]
        return self.client.map(
            embed_partition,
            [self.source] * len(parts),
            [self._task_records(part) for part in parts],
            [self.spec] * len(parts),
            [self.shard_dir] * len(parts),
            key=keys,
            retries=self.settings.retries,
            pure=False,
            priority=1 if again else -next(self.ranks),
            resources={"GPU": 1} if self.settings.gpu_resource else None,
        )

    def _task_records(self, part: Partition) -> PartSlice | bytes:
        """A partition as its task carries it: a slice of the plan's parts
        for a worker that sees them (one that writes shards beside the index
        sees the plan beside it too), else its records packed."""
        if isinstance(part, PartSlice) and self.shard_dir is not None:
            return part
        return pack_records(part)


# Seconds without a worker before the watchdog says so: a lone worker that
# it restarts (a task past its limit) is away for a few.
_NO_WORKERS_GRACE = 10.0


class Watchdog(threading.Thread):
    """Cancel partitions running past the limit; drop workers that went silent;
    give up on a cluster left with no worker (``on_no_workers`` is called
    once, to cancel what waits, and ``no_workers_for`` says how long).

    Dask cannot interrupt a running thread; restarting the worker process is
    the only way to get its slot back. ``in_flight`` maps each key of ours
    (a task's, or data scattered for one) to (anything, its future).
    ``limits`` holds a key's own time limit, where it is not
    ``settings.timeout`` (a search's check task is given more for more hits).
    """

    def __init__(
        self,
        client,
        settings: DispatchSettings,
        in_flight: dict,
        on_no_workers: Callable[[], None] | None = None,
    ):
        super().__init__(name="imgindex-watchdog", daemon=True)
        self.client = client
        self.limit = settings.timeout
        self.unresponsive = settings.unresponsive
        self.no_workers = settings.no_workers
        self.on_no_workers = on_no_workers
        # The seconds without a worker after which this gave up; else None.
        self.no_workers_for: float | None = None
        self._none_since: float | None = None
        self._said_none = False
        self.in_flight = in_flight
        self.limits: dict[str, float] = {}
        self.timed_out: set[str] = set()
        # (key, worker) -> first seen running there, on our clock: a task
        # rescheduled elsewhere (its worker dropped) starts a new count.
        self._first_seen: dict[tuple[str, str], float] = {}
        self._expired_at: dict[str, float] = {}
        self._restarted: dict[str, threading.Event] = {}
        self._dropped: set[str] = set()
        self._stopped = threading.Event()
        shortest = min(x for x in (self.limit, self.unresponsive, 8.0) if x > 0)
        self._poll = min(2.0, max(0.2, shortest / 4))
        self._state = _scheduler_state_fn(self.unresponsive)
        self._remove = _remove_worker_fn()
        self._restart = _restart_worker_fn()

    def wait_restarted(self, key: str, timeout: float = 120.0) -> None:
        event = self._restarted.get(key)
        if event is not None:
            event.wait(timeout)

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=10)

    def run(self) -> None:
        while not self._stopped.wait(self._poll):
            try:
                state = self.client.sync(
                    self.client._run_on_scheduler,
                    self._state,
                    callback_timeout=max(10.0, 4 * self._poll),
                )
            except Exception as e:  # scheduler busy or reconnecting: next tick
                logger.debug("watchdog poll failed: %s", e)
                continue
            self.check(state, time.monotonic())

    def check(self, state: dict, now: float) -> None:
        self._check_workers_left(state["workers"], now)
        silent: dict[str, float] = state["silent"]
        processing, holding = state["processing"], state["holding"]
        for address, seconds in silent.items():
            # Running, queued there, or finished and not yet collected: a
            # frozen worker holding only results would otherwise stall the
            # build until Dask's worker-ttl (5 minutes, or never).
            held = [*processing.get(address, ()), *holding.get(address, ())]
            ours = [k for k in held if k in self.in_flight]
            if (
                seconds > self.unresponsive > 0
                and ours
                and address not in self._dropped
            ):
                self._drop(address, seconds)
        for key, address in state["executing"].items():
            limit = self.limits.get(key, self.limit)
            if key not in self.in_flight or limit <= 0:
                continue
            started = self._first_seen.setdefault((key, address), now)
            if silent.get(address, 0.0) > min(10.0, limit):
                continue  # a frozen worker, not a stuck image: dropped above
            # A task seen running long after it was cancelled (the cancel
            # raced the restart and it was rescheduled) is expired again.
            if now - started > limit and (
                now - self._expired_at.get(key, -1e9) > limit
            ):
                self._expire(key, address, now - started, limit)

    def _check_workers_left(self, workers: int, now: float) -> None:
        if workers or not self.in_flight:
            if self._said_none:
                logger.warning("a worker joined the cluster; going on")
            self._none_since, self._said_none = None, False
            return
        if self._none_since is None:
            self._none_since = now
        gone = now - self._none_since
        if gone >= _NO_WORKERS_GRACE and not self._said_none:
            self._said_none = True
            logger.warning(
                "no worker is left on the cluster (batch jobs ended? workers "
                "stopped?); waiting %s for one to join "
                "(imgindex.no-workers-timeout)",
                f"up to {self.no_workers:g} s" if self.no_workers > 0 else "for ever",
            )
        if 0 < self.no_workers <= gone and self.no_workers_for is None:
            self.no_workers_for = self.no_workers  # as configured: the message's
            if self.on_no_workers is not None:
                self.on_no_workers()

    def _drop(self, address: str, seconds: float) -> None:
        logger.warning(
            "worker %s has been unresponsive for %.0f s (frozen or suspended?); "
            "removing it from the cluster so that its tasks run elsewhere",
            address,
            seconds,
        )
        self._dropped.add(address)
        try:
            self.client.sync(
                self.client._run_on_scheduler,
                self._remove,
                address,
                callback_timeout=30,
            )
        except Exception as e:
            logger.warning("could not remove worker %s: %s", address, e)

    def _expire(self, key: str, address: str, seconds: float, limit: float) -> None:
        logger.warning(
            "task %s ran %.0f s (limit %g s) on %s; cancelling it and restarting "
            "that worker",
            key,
            seconds,
            limit,
            address,
        )
        self._restarted[key] = threading.Event()
        self._expired_at[key] = time.monotonic()
        self.timed_out.add(key)
        try:
            # Cancel first, so the restart does not reschedule the stuck task;
            # through our own future, so that as_completed hands it back.
            _, future = self.in_flight[key]
            future.cancel(force=True)
            outcome = self.client.sync(
                self.client._run_on_scheduler,
                self._restart,
                address,
                callback_timeout=60,
            )
            if outcome not in ("OK", "gone"):
                logger.warning("could not restart worker %s: %s", address, outcome)
        except Exception as e:
            logger.warning("could not restart worker %s: %s", address, e)
        finally:
            self._restarted[key].set()


# The functions below run on the scheduler. They are made as closures so that
# cloudpickle sends them by value: the scheduler need not have imgindex.


def _scheduler_state_fn(hold_after: float):
    """The watchdog's view; results held in memory only for workers silent
    longer than ``hold_after`` (<= 0: none), as a build may hold thousands."""

    def state(dask_scheduler=None) -> dict:
        from time import time as now

        t = now()
        workers = dask_scheduler.workers.values()
        return {
            "workers": len(workers),
            # Which tasks run where; the durations beside them come from
            # heartbeats, so the watchdog keeps its own clock instead.
            "executing": {ts.key: ws.address for ws in workers for ts in ws.executing},
            "processing": {
                ws.address: [ts.key for ts in ws.processing] for ws in workers
            },
            "silent": {ws.address: t - ws.last_seen for ws in workers},
            "holding": {
                ws.address: [ts.key for ts in ws.has_what]
                for ws in workers
                if 0 < hold_after < t - ws.last_seen
            },
        }

    return state


def _worker_saturation_fn():
    def saturation(dask_scheduler=None) -> float:
        return float(dask_scheduler.WORKER_SATURATION)

    return saturation


def _restart_worker_fn():
    """Restart a worker through its nanny, once its process is gone; its
    return is not waited for (Client.restart_workers waits up to 2 minutes,
    which a worker that does not come back, or is long in coming, would
    cost the watchdog and the tasks waiting to be sent again)."""

    async def restart(address: str, dask_scheduler=None) -> str:
        from time import time

        worker = dask_scheduler.workers.get(address)
        if worker is None:
            return "gone"
        if worker.nanny is None:  # an in-process or --no-nanny worker
            return "it has no nanny"
        out = await dask_scheduler.restart_workers(
            [address],
            timeout=30,
            wait_for_workers=False,
            on_error="return",
            stimulus_id=f"imgindex-task-timeout-{time()}",
        )
        return out[address]

    return restart


def _remove_worker_fn():
    async def remove(address: str, dask_scheduler=None) -> str:
        return await dask_scheduler.remove_worker(
            address=address, stimulus_id="imgindex-unresponsive", close=True
        )

    return remove
