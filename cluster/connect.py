"""Connect to the configured scheduler, or start a LocalCluster, and say why."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from imgindex.pipeline.config import config_value, seconds_value
from imgindex.pipeline.errors import (
    ConfigError,
    InvalidSchedulerAddress,
    SchedulerUnreachable,
)

logger = logging.getLogger(__name__)


@dataclass
class Connection:
    """A connected client and how it was obtained (reported in ``build --json``)."""

    client: Any  # distributed.Client
    kind: str  # "remote" | "local"
    address: str
    reason: str
    dashboard: str
    cluster: Any = None  # the LocalCluster we own, closed with the client
    job_logs: str = ""  # where batch jobs write their logs (--jobqueue)
    most_workers: int = 0
    owned: bool = True  # False: the caller's client, left open
    # A LocalCluster started because the configured scheduler could not be
    # used (a long-lived caller, the service, tries that scheduler again).
    fell_back: bool = False

    def close(self) -> None:
        if not self.owned:
            return
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def to_json(self) -> dict[str, Any]:
        n = self.n_workers()
        reason = self.reason
        if self.kind == "remote" and self.cluster is None and self.owned:
            # Counted now, not at connection: workers may have joined since.
            reason = f"remote {self.address}: {n} worker{'s' if n != 1 else ''}"
        report: dict[str, Any] = {
            "kind": self.kind,
            "address": self.address,
            "reason": reason,
            "dashboard": self.dashboard,
            "workers": n,
        }
        if self.job_logs:
            report["job_logs"] = self.job_logs
        return report

    def n_workers(self) -> int:
        """The most workers seen so far (late joiners count, lost ones stay)."""
        try:
            n = len(self.client.scheduler_info(n_workers=-1)["workers"])
        except Exception:  # the scheduler is gone
            n = 0
        self.most_workers = max(self.most_workers, n)
        return self.most_workers

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Target:
    """Where to look for a scheduler, and which setting named it."""

    address: str | None
    scheduler_file: str | None
    source: str  # e.g. "--scheduler", "env IMGINDEX_SCHEDULER"


def resolve_target(
    scheduler: str | None = None, scheduler_file: str | None = None
) -> Target:
    """Pick the scheduler setting that wins: flag, file flag, env, then dask config."""
    if scheduler:
        return Target(scheduler, None, "--scheduler")
    if scheduler_file:
        return Target(None, scheduler_file, "--scheduler-file")
    for var in ("IMGINDEX_SCHEDULER", "DASK_SCHEDULER_ADDRESS"):
        if os.environ.get(var):
            return Target(os.environ[var], None, f"env {var}")
    if config_value(None, "imgindex.scheduler"):
        return Target(
            config_value(None, "imgindex.scheduler"), None, "imgindex.scheduler"
        )
    if config_value(None, "imgindex.scheduler-file"):
        return Target(
            None,
            config_value(None, "imgindex.scheduler-file"),
            "imgindex.scheduler-file",
        )
    return Target(None, None, "")


def check_address(address: str, source: str) -> None:
    """Reject a malformed address outright: a typo is not a reason to fall back.

    Raises
    ------
    InvalidSchedulerAddress
        Naming the address and the setting it came from.
    """
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import backends

    try:
        scheme, loc = parse_address(address, strict=False)
        if scheme not in backends:
            raise ValueError(scheme)
        if scheme in ("tcp", "tls", "ucx"):
            host, port = parse_host_port(loc)
            if not host or not port:
                raise ValueError(address)
    except (ValueError, TypeError):
        raise InvalidSchedulerAddress(
            f"invalid scheduler address {address!r} from {source}; "
            "expected tcp://HOST:PORT, e.g. tcp://node1:8786"
        ) from None


def probe_scheduler(address: str, timeout: float) -> dict | str:
    """Ask ``address`` for its identity under a hard deadline.

    ``Client(addr, timeout=t)`` bounds only the TCP connect; a non-Dask
    listener can hang the handshake forever (DASK-NOTES.md), so one RPC is
    sent under ``asyncio.wait_for`` first.

    Returns
    -------
    dict or str
        The scheduler's identity, or a short reason it could not be used.
    """
    from distributed.comm import connect

    # The same TLS settings as distributed.Client (distributed.comm.tls.*):
    # without them a tls:// scheduler looks unreachable.
    connection_args = cluster_security().get_connection_args("client")

    async def identity() -> dict:
        comm = await connect(address, timeout=timeout, **connection_args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    try:
        ident = asyncio.run(asyncio.wait_for(identity(), timeout))
    except (TimeoutError, asyncio.TimeoutError):
        return _refused(address) or f"timed out after {timeout:g} s"
    except (OSError, MemoryError, ValueError, TypeError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        return _refused(address) or f"not reachable ({text[:200]})"
    if not isinstance(ident, dict) or ident.get("type") != "Scheduler":
        return "answered, but is not a Dask scheduler"
    return ident


def _refused(address: str, timeout: float = 1.0) -> str | None:
    """Why a tcp:// or tls:// ``address`` the probe could not reach is not
    there, where its host refuses the port or does not resolve: distributed
    retries a refused connection until its timeout ends, then says it timed
    out (a scheduler file left by a stopped scheduler). None: it is there,
    or nothing more is known. Asked only after the probe failed: a bare
    connection to a live scheduler is logged there as closed before its
    handshake."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme not in ("tcp", "tls") or not parts.hostname:
        return None
    try:
        port = parts.port
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return (
            "connection refused: nothing listens on that port (has the "
            "scheduler stopped?)"
        )
    except socket.gaierror as e:
        return f"not reachable (host {parts.hostname!r}: {e.strerror})"
    except (OSError, ValueError):
        return None  # a timeout or else: the probe says what it finds


def cluster_security():
    """Dask's TLS settings from its config (``distributed.comm.tls.*``), or none."""
    from distributed.security import Security

    return Security()


def _tls_hint(address: str, problem: str) -> str:
    if address.startswith("tls://") and not cluster_security().tls_client_cert:
        return (
            f"{problem}; a tls:// scheduler needs the client's certificate: set "
            "distributed.comm.tls.ca-file, .client.cert and .client.key (docs/guide/"
            "clusters.md, 'A shared cluster: use TLS')"
        )
    return problem


def read_scheduler_file(path: str) -> str | None:
    """The address in a `dask scheduler --scheduler-file` file (None: none
    there). ``~`` is the home folder, as in ``scheduler-file: ~/sched.json``."""
    try:
        with open(os.path.expanduser(path)) as f:
            return json.load(f)["address"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def connect(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    fallback: bool | None = None,
    timeout: float | str | None = None,
    worker_wait: float | str | None = None,
    strict_by_user: bool = True,
) -> Connection:
    """Return a client on the configured scheduler, or on a new LocalCluster.

    Parameters
    ----------
    scheduler, scheduler_file
        Override the configured scheduler (see :func:`resolve_target`).
    fallback
        Start a LocalCluster when the scheduler cannot be used (default
        ``imgindex.fallback``). When False that is an error instead.
    timeout
        Deadline for reaching the scheduler (default ``imgindex.connect-timeout``).
    worker_wait
        How long to wait for a scheduler with no workers to get one
        (default ``imgindex.worker-wait``).
    strict_by_user
        Whether ``fallback=False`` came from the user (``--no-fallback``), so
        the error may suggest dropping it; doctor is strict on its own.

    Raises
    ------
    SchedulerUnreachable
        If the scheduler cannot be used and fallback is off.
    """
    fallback = bool(config_value(fallback, "imgindex.fallback"))
    timeout = seconds_value(timeout, "imgindex.connect-timeout")
    worker_wait = seconds_value(worker_wait, "imgindex.worker-wait")
    target = resolve_target(scheduler, scheduler_file)
    if target.address is None and target.scheduler_file is None:
        return start_local("local: no scheduler configured")

    address = target.address
    if address is not None:
        check_address(address, target.source)
    if target.scheduler_file is not None:
        address = read_scheduler_file(target.scheduler_file)
        if address is None:
            problem = f"scheduler file {target.scheduler_file} is missing or unreadable"
            return _fall_back(problem, target, fallback, strict_by_user)
    ident = probe_scheduler(address, timeout)
    if isinstance(ident, str):
        return _fall_back(
            _tls_hint(address, f"{address}: {ident}"), target, fallback, strict_by_user
        )

    from distributed import Client

    client = Client(
        address, timeout=timeout, set_as_default=False, security=cluster_security()
    )
    n = len(client.scheduler_info()["workers"])
    if n == 0:
        logger.warning(
            "scheduler %s has no workers; waiting up to %g s", address, worker_wait
        )
        try:
            client.wait_for_workers(1, timeout=worker_wait)
        except TimeoutError:
            client.close()
            return _fall_back(
                f"{address}: no workers after {worker_wait:g} s",
                target,
                fallback,
                strict_by_user,
            )
        n = len(client.scheduler_info()["workers"])
    reason = f"remote {address}: {n} worker{'s' if n != 1 else ''}"
    logger.info("using %s", reason)
    return Connection(client, "remote", address, reason, client.dashboard_link or "")


def use_client(client: Any, worker_wait: float | str | None = None) -> Connection:
    """The caller's own ``distributed.Client`` (a notebook's, dask-jobqueue's,
    dask-gateway's) as a connection that is used, never closed.

    Raises
    ------
    ConfigError
        If ``client`` is asynchronous or closed.
    SchedulerUnreachable
        If its cluster has no worker after ``worker_wait``
        (default ``imgindex.worker-wait``).
    """
    if getattr(client, "asynchronous", False):
        raise ConfigError(
            "client is asynchronous; imgindex needs a synchronous "
            "distributed.Client (Client(..., asynchronous=False))"
        )
    if client.status != "running":
        raise ConfigError(f"client is {client.status}; pass a running Client")
    worker_wait = seconds_value(worker_wait, "imgindex.worker-wait")
    address = client.scheduler.address
    n = len(client.scheduler_info(n_workers=-1)["workers"])
    if n == 0:
        logger.warning(
            "the client's scheduler %s has no workers; waiting up to %g s",
            address,
            worker_wait,
        )
        try:
            client.wait_for_workers(1, timeout=worker_wait)
        except TimeoutError:
            raise SchedulerUnreachable(
                f"the client's scheduler {address} has no workers after "
                f"{worker_wait:g} s; start some (cluster.scale(n), `dask worker`)"
            ) from None
        n = len(client.scheduler_info(n_workers=-1)["workers"])
    from distributed import LocalCluster

    kind = "local" if isinstance(client.cluster, LocalCluster) else "remote"
    reason = f"the caller's client, {address}: {n} worker{'s' if n != 1 else ''}"
    return Connection(
        client, kind, address, reason, client.dashboard_link or "", owned=False
    )


def _fall_back(
    problem: str, target: Target, fallback: bool, strict_by_user: bool = True
) -> Connection:
    if not fallback:
        advice = "start `dask scheduler` and `dask worker`, or fix the address"
        if strict_by_user:
            advice = advice.replace(", or fix", ", fix") + ", or drop --no-fallback"
        raise SchedulerUnreachable(
            f"cannot use the scheduler from {target.source}: {problem}; {advice}"
        )
    reason = f"local: {problem}"
    # Loud on purpose: an explicit address that silently became a LocalCluster
    # would run a whole build on an HPC login node.
    logger.warning(
        "falling back to a LocalCluster (%s from %s)", problem, target.source
    )
    conn = start_local(reason)
    conn.fell_back = True
    return conn


def start_local_early(
    scheduler: str | None, scheduler_file: str | None, jobqueue: str | None = None
) -> None:
    """Start the forkserver now where the settings leave a build nothing but
    a LocalCluster (no scheduler, no batch system): its imports then run on
    another core while this process imports and plans, rather than after.

    The server is stopped as this process exits, used or not (a re-run with
    nothing to do, a bad argument): left alone, it would finish its imports
    first, holding this process's stdout and stderr open until then.
    """
    if config_value(jobqueue, "imgindex.jobqueue.system"):
        return
    target = resolve_target(scheduler, scheduler_file)
    if target.address is not None or target.scheduler_file is not None:
        return
    if config_value(None, "imgindex.local.start-method") == "forkserver":
        import atexit

        from imgindex.cluster.forkserver import start_forkserver, stop_forkserver

        start_forkserver()
        atexit.unregister(stop_forkserver)  # once, however many builds
        atexit.register(stop_forkserver)


def start_local(reason: str) -> Connection:
    """Start a LocalCluster of worker processes sized to this machine.

    Only this process can use it. On a shared machine 127.0.0.1 is not
    private: any local user could otherwise connect a ``Client`` and run code
    as us. :func:`cluster.credentials.temporary_security` makes a key and a
    self-signed certificate held in memory (never on disk), handed to the
    workers it starts, TLS required both ways. An in-process cluster
    (``inproc://``) would be private too, but runs torch ~1.4x slower than
    worker processes (DASK-NOTES.md, finding 1), so every LocalCluster is
    secured the one way.
    """
    import dask.config

    from imgindex.cluster.forkserver import start_forkserver

    method = str(config_value(None, "imgindex.local.start-method"))
    if method not in ("forkserver", "spawn"):
        raise ConfigError(
            f"imgindex.local.start-method {method!r} is not one of forkserver, spawn"
        )
    if method == "forkserver":
        start_forkserver()  # before distributed is imported here
    from distributed import Client, LocalCluster

    from imgindex.cluster.credentials import temporary_security
    from imgindex.cluster.dashboard import LazyDashboard

    n_workers, threads, memory_limit = _local_sizes()
    dashboard_address = config_value(None, "imgindex.local.dashboard-address")
    settings = dict(config_value(None, "imgindex.local.dask-config") or {})
    settings["distributed.worker.multiprocessing-method"] = method
    # The Nanny hands the config of its start to its worker process.
    with dask.config.set(settings):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=dashboard_address,
            # Loaded when first opened (cluster/dashboard.py): most small
            # builds end unwatched, and loading it delays their first task.
            scheduler_kwargs={"dashboard": False},
            preload=["imgindex.cluster.local_worker"],
            security=temporary_security(),
        )
    if dashboard_address is not None:
        LazyDashboard(cluster.scheduler).install()
    client = Client(cluster, set_as_default=False)
    logger.info("using %s (%d workers)", reason, n_workers)
    return Connection(
        client,
        "local",
        cluster.scheduler_address,
        reason,
        client.dashboard_link or "",
        cluster,
    )


# A memory limit below this is a number given without its unit ("8" for 8 GiB
# reads as 8 bytes, and every worker would pause at once).
LEAST_MEMORY_LIMIT = 256 * 2**20


def _local_sizes() -> tuple[int, int, Any]:
    """The LocalCluster's workers, threads each and memory limit each, from
    ``imgindex.local.*``; ConfigError naming the key for a value LocalCluster
    would take and then wait forever on (no workers) or fail on."""
    import logging

    from distributed.worker_memory import parse_memory_limit

    from imgindex.pipeline.config_check import check_config

    workers, threads = "imgindex.local.n-workers", "imgindex.local.threads-per-worker"
    check_config(workers, threads)
    n_workers = int(config_value(None, workers) or os.cpu_count() or 1)
    threads = int(config_value(None, threads))
    key = "imgindex.local.memory-limit"
    memory_limit = config_value(None, key)
    try:
        limit = parse_memory_limit(
            memory_limit, threads, n_workers * threads, logger=logging.getLogger()
        )
    except (TypeError, ValueError):
        limit = -1
    if limit is not None and limit < LEAST_MEMORY_LIMIT:
        raise ConfigError(
            f"{key} {memory_limit!r} is not a memory size of at least 256 MiB per "
            "worker; give a unit (e.g. 8GiB), a fraction of this machine's, "
            "auto, or null for none"
        )
    return n_workers, threads, memory_limit
