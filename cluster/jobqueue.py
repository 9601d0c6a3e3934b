"""Let imgindex request its own worker nodes from a batch system (dask-jobqueue).

Optional: ``pip install 'imgindex[jobqueue]'``. Cores, memory, queue, account
and walltime come from dask-jobqueue's own configuration
(``jobqueue.<system>.*`` in ``~/.config/dask/jobqueue.yaml``), as its users
already write them.

What a real queue does, and what imgindex does about it:

- it rejects a job (no such partition, account, walltime or memory): the
  submission's own error is reported at once, in one line;
- it holds jobs for minutes or hours: while they are pending, imgindex waits
  and says why (SLURM's reason), up to ``imgindex.jobqueue.queue-wait``;
  once a job runs, its worker must join within ``imgindex.worker-wait``;
- a job ends without a worker joining: the build stops, naming the job log.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import dask.config

from imgindex.cluster.connect import Connection
from imgindex.pipeline.config import config_value, seconds_value
from imgindex.pipeline.errors import ImgindexError, SchedulerUnreachable

logger = logging.getLogger(__name__)

SYSTEMS = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "htcondor": "HTCondorCluster",
    "oar": "OARCluster",
    "moab": "MoabCluster",
}


def _import_dask_jobqueue():
    """Import dask_jobqueue, keeping our SIGINT handler.

    dask-jobqueue 0.9 replaces the SIGINT handler with ``sys.exit()`` on import
    (dask/dask-jobqueue#696), so Ctrl-C exited 0 silently, leaving jobs queued.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:
        raise ImgindexError(
            "--jobqueue needs dask-jobqueue: pip install 'imgindex[jobqueue]'"
        ) from None
    finally:
        with contextlib.suppress(ValueError, TypeError):  # not the main thread
            signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


def make_jobqueue_cluster(
    system: str, gpu_resource: bool = False, log_directory: str | None = None
) -> Any:
    """A dask-jobqueue cluster whose jobs run single-threaded imgindex workers.

    Each job runs one worker process per core (``processes = cores``), the
    layout that keeps torch fastest on CPUs; with ``gpu_resource`` each
    worker offers ``GPU=1`` for ``--gpu-resource`` builds. Job logs go to
    ``log_directory`` (dask-jobqueue's default is the current folder).

    Raises
    ------
    ImgindexError
        If dask-jobqueue is missing, the system unknown, or its config incomplete.
    """
    dask_jobqueue = _import_dask_jobqueue()
    if system not in SYSTEMS:
        raise ImgindexError(
            f"unknown batch system {system!r}; choose one of {', '.join(SYSTEMS)}"
        )
    cls = getattr(dask_jobqueue, SYSTEMS[system])
    cores = dask.config.get(f"jobqueue.{system}.cores", None)
    memory = dask.config.get(f"jobqueue.{system}.memory", None)
    if not cores or not memory:
        raise ImgindexError(
            f"dask-jobqueue cannot describe {system} jobs without their size: set "
            f"jobqueue.{system}.cores and jobqueue.{system}.memory in "
            "~/.config/dask/jobqueue.yaml (docs/guide/hpc.md, 'Requesting nodes from a "
            "batch system')"
        )
    # The user's own scheduler options (jobqueue.yaml) win over our default.
    options = dict(dask.config.get(f"jobqueue.{system}.scheduler-options", {}) or {})
    options.setdefault("dashboard_address", ":0")
    kwargs: dict[str, Any] = {"scheduler_options": options, "processes": int(cores)}
    if log_directory:
        kwargs["log_directory"] = log_directory
    if gpu_resource:
        extra = dask.config.get(f"jobqueue.{system}.worker-extra-args", None) or []
        kwargs["worker_extra_args"] = [*extra, "--resources", "GPU=1"]
    try:
        return cls(**kwargs)
    except ValueError as e:
        text = " ".join(str(e).split())[:200]
        raise ImgindexError(
            f"dask-jobqueue cannot describe {system} jobs ({text}); check "
            f"jobqueue.{system}.* in ~/.config/dask/jobqueue.yaml"
        ) from None


def _close_quietly(cluster: Any) -> None:
    try:
        cluster.close()
    except Exception as e:  # jobs that never started leave it half-made
        logger.debug("closing the jobqueue cluster: %s", e)


def start_jobqueue(
    system: str,
    jobs: int | None = None,
    gpu_resource: bool = False,
    worker_wait: float | str | None = None,
    log_directory: str | Path | None = None,
) -> Connection:
    """Submit ``jobs`` batch jobs and return a client once a worker has joined.

    Raises
    ------
    ImgindexError
        If the batch system rejects the job (its own reason, in one line).
    SchedulerUnreachable
        If the jobs stay queued past ``imgindex.jobqueue.queue-wait``, or no
        worker joins within ``imgindex.worker-wait`` of a job starting (the
        jobs are cancelled either way).
    """
    from distributed import Client

    jobs = int(config_value(jobs, "imgindex.jobqueue.jobs"))
    # The user's log-directory (jobqueue.yaml) wins; else one under --out, not
    # a slurm-N.out per job in whatever folder imgindex was started from.
    logs = dask.config.get(f"jobqueue.{system}.log-directory", None) or (
        str(log_directory) if log_directory else None
    )
    cluster = make_jobqueue_cluster(system, gpu_resource, logs)
    submit = cluster.job_cls.submit_command
    if shutil.which(submit.split()[0]) is None:
        _close_quietly(cluster)
        raise ImgindexError(
            f"--jobqueue {system} submits jobs with `{submit}`, which is not on "
            "this machine's PATH; run imgindex on a login node of the cluster"
        )
    try:
        _submit(cluster, system, jobs)
        client = Client(cluster, set_as_default=False)
        try:
            _wait_for_a_worker(cluster, client, system, worker_wait, logs)
        except BaseException:
            client.close()
            raise
    except BaseException:
        _close_quietly(cluster)  # cancels the jobs
        raise
    reason = f"remote jobqueue {system}: {jobs} job(s) submitted"
    return Connection(
        client,
        "remote",
        cluster.scheduler_address,
        reason,
        client.dashboard_link or "",
        cluster,
        job_logs=logs or "",
    )


def _submit(cluster: Any, system: str, jobs: int) -> None:
    """Submit the jobs now, so that a rejection is raised here, once.

    ``cluster.scale()`` submits from a loop callback, where a rejection
    becomes two logged tracebacks and a false "submitted"; so the spec is
    grown here and the cluster's own reconciliation awaited
    (``SpecCluster._correct_state``; distributed is pinned below 2027).
    """
    while len(cluster.worker_spec) < jobs:
        cluster.worker_spec.update(cluster.new_worker_spec())
    try:
        cluster.sync(cluster._correct_state)
    except RuntimeError as e:
        raise ImgindexError(
            f"{system} rejected the job: {_submission_error(str(e))}; check "
            f"jobqueue.{system}.* in ~/.config/dask/jobqueue.yaml"
        ) from None
    ids = [j.job_id for j in cluster.workers.values() if getattr(j, "job_id", None)]
    logger.warning("submitted %d %s job(s): %s", len(ids), system, " ".join(ids))


def _submission_error(text: str) -> str:
    """The batch system's own words from dask-jobqueue's multi-line error."""
    _, _, stderr = text.partition("stderr:")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [" ".join(text.split())[:200]])[-1]


def _wait_for_a_worker(cluster, client, system: str, worker_wait, logs) -> None:
    wait = seconds_value(worker_wait, "imgindex.worker-wait")
    queue_wait = seconds_value(None, "imgindex.jobqueue.queue-wait")
    started = time.monotonic()
    running_since: float | None = None
    said = None
    ids = [j.job_id for j in cluster.workers.values() if getattr(j, "job_id", None)]
    while True:
        try:
            client.wait_for_workers(1, timeout=2)
            return
        except TimeoutError:
            pass
        states = job_states(system, ids)
        now = time.monotonic()
        text = describe(states) if states else "waiting for a worker to join"
        if text != said:
            logger.warning("%s", text)
            said = text
        if states and all(s == "GONE" for s, _ in states.values()):
            raise SchedulerUnreachable(
                f"every {system} job ended without starting a worker; see the job "
                f"logs in {logs or 'the current folder'}"
            )
        if states and not any(s == "RUNNING" for s, _ in states.values()):
            if now - started > queue_wait:
                raise SchedulerUnreachable(
                    f"no {system} job started within {queue_wait:g} s "
                    f"(imgindex.jobqueue.queue-wait; {text}); the jobs were "
                    "cancelled: try a less busy queue, or raise the limit"
                )
            continue
        running_since = running_since or now
        if now - running_since > wait:
            what = (
                f"a {system} job is running but no worker joined within {wait:g} s"
                if states
                else f"no {system} job started a worker within {wait:g} s of submission"
            )
            raise SchedulerUnreachable(
                f"{what} (imgindex.worker-wait, --worker-wait); the jobs were "
                f"cancelled; see their logs in {logs or 'the current folder'}"
            )


def job_states(system: str, ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id -> (PENDING | RUNNING | GONE, reason) where the system can say; else {}.

    Only SLURM is asked (``squeue``); other systems are treated as running,
    so ``imgindex.worker-wait`` applies to them from submission.
    """
    if system != "slurm" or not ids or shutil.which("squeue") is None:
        return {}
    try:
        answer = subprocess.run(
            ["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if answer.returncode != 0 and "Invalid job id" not in answer.stderr:
        return {}  # squeue cannot reach slurmctld: we know nothing
    out = answer.stdout
    states = {i: ("GONE", "") for i in ids}
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2 and parts[0] in states:
            state = parts[1] if parts[1] in ("PENDING", "RUNNING") else "RUNNING"
            if parts[1] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                state = "GONE"
            states[parts[0]] = (state, parts[2] if len(parts) > 2 else "")
    return states


def describe(states: dict[str, tuple[str, str]]) -> str:
    """One line: "1 job pending: Resources; 1 running"."""
    pending = [reason for state, reason in states.values() if state == "PENDING"]
    running = sum(1 for state, _ in states.values() if state == "RUNNING")
    parts = []
    if pending:
        reasons = ", ".join(sorted({r for r in pending if r and r != "None"}))
        n = len(pending)
        text = f"{n} job{'s' if n != 1 else ''} pending"
        parts.append(f"{text}: {reasons}" if reasons else text)
    if running:
        parts.append(f"{running} running, waiting for its worker")
    gone = len(states) - len(pending) - running
    if gone:
        parts.append(f"{gone} ended")
    return "; ".join(parts)
