"""Let imgindex request its own worker nodes from a batch system (dask-jobqueue).

Optional: ``pip install 'imgindex[jobqueue]'``. Cores, memory, queue, account
and walltime come from dask-jobqueue's own configuration
(``jobqueue.<system>.*`` in ``~/.config/dask/jobqueue.yaml``), as its users
already write them.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import dask.config

from cluster.connect import Connection
from pipeline.config import config_value, seconds_value
from pipeline.errors import ImgindexError, SchedulerUnreachable

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


def make_jobqueue_cluster(system: str, gpu_resource: bool = False) -> Any:
    """A dask-jobqueue cluster whose jobs run single-threaded imgindex workers.

    Each job runs one worker process per core (``processes = cores``), the
    layout that keeps torch fastest on CPUs; with ``gpu_resource`` each
    worker offers ``GPU=1`` for ``--gpu-resource`` builds.

    Raises
    ------
    ImgindexError
        If dask-jobqueue is missing, the system unknown, or its config incomplete.
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ImgindexError(
            "--jobqueue needs dask-jobqueue: pip install 'imgindex[jobqueue]'"
        ) from None
    if system not in SYSTEMS:
        raise ImgindexError(
            f"unknown batch system {system!r}; choose one of {', '.join(SYSTEMS)}"
        )
    cls = getattr(dask_jobqueue, SYSTEMS[system])
    cores = dask.config.get(f"jobqueue.{system}.cores", None)
    kwargs: dict[str, Any] = {"scheduler_options": {"dashboard_address": ":0"}}
    if cores:
        kwargs["processes"] = int(cores)
    if gpu_resource:
        extra = dask.config.get(f"jobqueue.{system}.worker-extra-args", None) or []
        kwargs["worker_extra_args"] = [*extra, "--resources", "GPU=1"]
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ImgindexError(
            f"dask-jobqueue cannot describe {system} jobs: {e}; set "
            f"jobqueue.{system}.cores and jobqueue.{system}.memory (README, "
            "'Requesting nodes from a batch system')"
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
) -> Connection:
    """Submit ``jobs`` batch jobs and return a client once a worker has joined.

    Raises
    ------
    SchedulerUnreachable
        If no worker joins within ``imgindex.worker-wait`` (the jobs are cancelled).
    """
    from distributed import Client

    jobs = int(config_value(jobs, "imgindex.jobqueue.jobs"))
    wait = seconds_value(worker_wait, "imgindex.worker-wait")
    cluster = make_jobqueue_cluster(system, gpu_resource)
    submit = cluster.job_cls.submit_command
    if shutil.which(submit) is None:
        _close_quietly(cluster)
        raise ImgindexError(
            f"--jobqueue {system} submits jobs with `{submit}`, which is not on "
            "this machine's PATH; run imgindex on a login node of the cluster"
        )
    cluster.scale(jobs=jobs)
    client = Client(cluster, set_as_default=False)
    logger.warning(
        "submitted %d %s job(s); waiting up to %g s for a worker", jobs, system, wait
    )
    try:
        client.wait_for_workers(1, timeout=wait)
    except TimeoutError:
        client.close()
        _close_quietly(cluster)
        raise SchedulerUnreachable(
            f"no {system} job started a worker within {wait:g} s "
            "(imgindex.worker-wait); check the queue (squeue/qstat) and the "
            "jobs' logs, or raise imgindex.worker-wait"
        ) from None
    reason = f"remote jobqueue {system}: {jobs} job(s) submitted"
    return Connection(
        client,
        "remote",
        cluster.scheduler_address,
        reason,
        client.dashboard_link or "",
        cluster,
    )
