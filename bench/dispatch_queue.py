"""Memory with every partition of a build known to the scheduler at once.

The dispatcher submits all partitions at the start and lets Dask's queuing
(``distributed.scheduler.worker-saturation``) hand them out, so that the
dashboard shows the whole build. This measures what that costs: a real
``dask scheduler`` and two one-thread ``dask worker`` processes with the real
model, and the real dispatcher given ``--partitions`` partitions of 32
records each (paths as long as a camera-trap archive's; the files do not
exist, so each task reads nothing, writes a shard of 32 failures and
returns, which keeps the queue full while memory is sampled; finished tasks
are held, as in a build whose workers write shards). It runs for
``--seconds``, then cancels the build, the way `imgindex serve` cancels one.

The reference, in the same run on a fresh cluster: the same dispatcher
holding only a window of ``tasks-per-thread`` partitions per worker thread
in flight (how it worked before; still how it works where Dask cannot
queue). Peak RSS of the client, the scheduler and the largest worker are
sampled every 0.2 s.

    python bench/dispatch_queue.py [--partitions 100000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*, behind the installed imgindex

from bench.processes import DaskProcesses  # noqa: E402

RECORDS_PER_PARTITION = 32


def partitions(n: int):
    from imgindex.pipeline.discover import ImageRecord

    def record(i: int) -> ImageRecord:
        site, day, shot = i // 400_000, (i // 4_000) % 100, i % 4_000
        path = f"site-{site:03d}/2024-{1 + day // 28:02d}-{1 + day % 28:02d}/"
        return ImageRecord(f"{path}IMG_{shot:06d}.JPG", 2_500_000, 1_700_000_000 + i)

    per = RECORDS_PER_PARTITION
    return [tuple(record(p * per + j) for j in range(per)) for p in range(n)]


class PeakSampler(threading.Thread):
    """Peak RSS of this process, the scheduler, and each worker process."""

    def __init__(self, scheduler_pid: int, workers_pid: int):
        super().__init__(daemon=True)
        self.me = psutil.Process()
        self.scheduler = psutil.Process(scheduler_pid)
        self.workers = psutil.Process(workers_pid)
        self.peaks = {"client": 0, "scheduler": 0, "worker": 0}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                self._sample()
            except psutil.Error:
                continue

    def _sample(self) -> None:
        self.peaks["client"] = max(self.peaks["client"], self.me.memory_info().rss)
        rss = self.scheduler.memory_info().rss
        self.peaks["scheduler"] = max(self.peaks["scheduler"], rss)
        # `dask worker` -> nannies -> worker processes: the leaves are workers.
        for p in self.workers.children(recursive=True):
            if not p.children():
                self.peaks["worker"] = max(self.peaks["worker"], p.memory_info().rss)


def run(work: Path, n: int, seconds: float, windowed: bool) -> dict:
    from distributed import Client

    from imgindex.cluster.worker import setup_workers
    from imgindex.pipeline.cancel import Cancel
    from imgindex.pipeline.dispatch import DispatchSettings, PartitionDispatcher
    from imgindex.pipeline.embed import ModelSpec
    from imgindex.pipeline.errors import BuildCancelled

    folder = work / ("window" if windowed else "queue")
    folder.mkdir(parents=True, exist_ok=True)
    images = work / "images"  # empty: every record is a missing file
    images.mkdir(exist_ok=True)
    shards = folder / "shards"  # as a build's staging folder: results stay small
    shards.mkdir(exist_ok=True)
    procs = DaskProcesses(folder, ["--nworkers", "2", "--nthreads", "1"], 2)
    parts = partitions(n)
    try:
        with Client(procs.address) as client:
            spec = ModelSpec.from_config()
            setup_workers(client, spec, wait_for_models=True)
            sampler = PeakSampler(procs.procs[0].pid, procs.procs[1].pid)
            sampler.start()
            done = [0]
            cancel = Cancel()
            dispatcher = PartitionDispatcher(
                client,
                "bench",
                str(images),
                spec,
                DispatchSettings(timeout=0),
                lambda part, result: done.__setitem__(0, done[0] + 1),
                shard_dir=str(shards),
                cancel=cancel,
            )
            if windowed:
                window = dispatcher.threads() * dispatcher.settings.tasks_per_thread
                dispatcher._window = lambda n: window  # the former behaviour
            known: dict[str, int] = {}
            cancelled_at = [0.0]

            def watch() -> None:
                time.sleep(min(20.0, seconds / 2))
                known.update(client.run_on_scheduler(_scheduler_counts))
                time.sleep(max(0.0, seconds - min(20.0, seconds / 2)))
                cancelled_at[0] = time.perf_counter()
                cancel.request()

            threading.Thread(target=watch, daemon=True).start()
            started = time.perf_counter()
            dispatcher.start(parts)
            submitted = time.perf_counter() - started
            try:
                dispatcher.collect()
            except BuildCancelled:
                pass
            took = time.perf_counter() - started
            # Until the scheduler answers again: it handles a cancel in its event loop.
            client.run_on_scheduler(_scheduler_counts)
            cancel_took = time.perf_counter() - cancelled_at[0]
            sampler.stopped.set()
            sampler.join()
    finally:
        procs.close()
    log = (folder / "scheduler.log").read_text(errors="replace")
    return {
        "partitions": n,
        "window": windowed,
        "seconds": round(took, 1),
        "submit_seconds": round(submitted, 1),
        "finished": done[0],
        "cancel_seconds": round(cancel_took, 1),
        "per_key_cancel_lines": log.count("Scheduler cancels key"),
        "known_mid_run": known,
        "peak_mib": {k: round(v / 2**20) for k, v in sampler.peaks.items()},
    }


def _scheduler_counts(dask_scheduler=None) -> dict:
    """Embed tasks the scheduler holds, queued, and on each worker."""
    tasks = [ts for key, ts in dask_scheduler.tasks.items() if "embed[" in str(key)]
    return {
        "tasks": len(tasks),
        "queued": len(dask_scheduler.queued),
        "most_on_one_worker": max(
            (len(ws.processing) for ws in dask_scheduler.workers.values()), default=0
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dispatch-queue-"))
    rows = [
        run(work, args.partitions, args.seconds, windowed=False),
        run(work, args.partitions, args.seconds, windowed=True),
    ]
    for row in rows:
        print(json.dumps(row), flush=True)
    queue, window = rows
    print(
        f"\n| dispatch | scheduler knows (mid-run) | client peak | scheduler peak "
        f"| worker peak | partitions finished in {args.seconds:g} s | cancel |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("all submitted, Dask queues", queue), ("window", window)):
        p = r["peak_mib"]
        print(
            f"| {name} | {r['known_mid_run'].get('tasks', 0):,} tasks, at most "
            f"{r['known_mid_run'].get('most_on_one_worker', 0)} on a worker | "
            f"{p['client']:,} MiB | {p['scheduler']:,} MiB | {p['worker']:,} MiB "
            f"| {r['finished']:,} | {r['cancel_seconds']:g} s |"
        )


if __name__ == "__main__":
    main()
