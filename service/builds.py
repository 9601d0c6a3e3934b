"""Builds started through the API: each runs in a thread of its own, on the one cluster.

The cluster is obtained on the first build (a LocalCluster when no scheduler
is configured, as for `imgindex build`) and kept for the service's life.
Each build keeps the state `--progress-file` would write, in memory.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgindex.pipeline.build import (
    PlannedBuild,
    needs_cluster,
    no_cluster,
    plan_datasets,
    run_builds,
)
from imgindex.pipeline.cancel import Cancel
from imgindex.pipeline.discover import has_images
from imgindex.pipeline.embed import ModelSpec
from imgindex.pipeline.errors import BuildCancelled, ImgindexError, error_text
from imgindex.pipeline.progress import DatasetProgress, ProgressFile
from imgindex.service.errors import ApiError

logger = logging.getLogger(__name__)

KEPT_FINISHED = 100  # finished builds listed; older ones are forgotten


@dataclass
class Build:
    """One ``POST /api/builds``: its datasets, state and what it did."""

    id: str
    jobs: list[tuple[Path, str]]
    rebuild: bool
    progress: ProgressFile
    moved: bool = False
    cancel: Cancel = field(default_factory=Cancel)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    thread: threading.Thread | None = None
    conn: Any = None  # the cluster's connection while it runs on one

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def to_json(self) -> dict[str, Any]:
        """The progress file's JSON, plus the build's id and summaries,
        worded for the service's clients (see :func:`for_clients`)."""
        return for_clients(
            self.progress.snapshot()
            | {
                "id": self.id,
                "rebuild": self.rebuild,
                "moved": self.moved,
                "summaries": [_numbered_workers(s) for s in self.summaries],
            }
        )


_ADDRESS = re.compile(r"\b(?:tcp|tls|ucx|inproc|ws|wss)://[^\s'\",;)\]]+")
# The pipeline words its advice for the command line; a build the API
# started is started again through the API.
_AGAIN = re.compile(r"\brun the same command again\b")


def for_clients(data: Any) -> Any:
    """``data`` as the service's clients see it: every Dask address in its
    texts withheld (they are shown what a build did, never where its cluster
    listens), and "run the same command again" said as "start the same
    build again"."""
    if isinstance(data, str):
        return _AGAIN.sub(
            "start the same build again", _ADDRESS.sub("<address withheld>", data)
        )
    if isinstance(data, dict):
        return {for_clients(k): for_clients(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [for_clients(v) for v in data]
    return data


def public_cluster(conn: Any) -> dict[str, Any]:
    """The connection's ``build --json`` cluster, as the service's clients
    see it: no ``address`` key, and no address in its texts."""
    report = for_clients(conn.to_json())
    del report["address"]
    return report


def _numbered_workers(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's images per worker, keyed "worker 1", ... not by address."""
    workers = summary.get("workers") or {}
    return summary | {
        "workers": {
            f"worker {i}": workers[address]
            for i, address in enumerate(sorted(workers), start=1)
        }
    }


class Builds:
    """Starts, lists and cancels builds of folders under ``dataset_roots``.

    ``connect(fallback)`` obtains the cluster as `imgindex build` does; with
    ``fallback`` False it raises SchedulerUnreachable rather than start a
    LocalCluster.
    """

    def __init__(
        self,
        out: Path,
        dataset_roots: Sequence[Path],
        connect: Callable[[bool], Any],
        max_running: int = 4,
        on_state: Callable[[str], None] | None = None,
    ):
        self.out = out
        self.dataset_roots = [Path(r).resolve() for r in dataset_roots]
        self._connect = connect
        self.max_running = max_running
        self._on_state = on_state or (lambda state: None)
        self._builds: dict[str, Build] = {}
        self._lock = threading.Lock()
        self._conn: Any = None
        self._let_go: list[Any] = []  # connections replaced, builds still on them
        self._conn_lock = threading.Lock()

    @property
    def connection(self) -> Any:
        """The cluster's connection once a build has made one, else None."""
        return self._conn

    def datasets(self) -> list[dict[str, str]]:
        """The folders under the dataset roots that a build may name."""
        found = []
        for root in self.dataset_roots:
            try:
                entries = sorted(p for p in root.iterdir() if p.is_dir())
            except OSError as e:
                logger.warning("cannot list dataset root %s: %s", root, e)
                continue
            for p in entries:
                if not p.name.startswith("."):
                    found.append({"name": p.name, "path": str(p), "root": str(root)})
        return found

    def resolve(self, dataset: str) -> Path:
        """The dataset folder ``dataset`` names: a folder under a dataset root,
        by its name or path there, or an absolute path inside a root.

        Raises
        ------
        ApiError
            403 when it lies outside every root (or none was configured),
            404 when there is no such folder, 400 when it holds neither
            images nor tar shards.
        """
        if not self.dataset_roots:
            raise ApiError(
                403,
                "this service builds nothing: start `imgindex serve` with "
                "--dataset-root FOLDER to allow builds of the folders in it",
            )
        if not isinstance(dataset, str) or not dataset or "\0" in dataset:
            raise ApiError(400, f"dataset {dataset!r} is not a folder name or path")
        given = Path(dataset)
        candidates = (
            [given] if given.is_absolute() else [r / given for r in self.dataset_roots]
        )
        try:
            return self._find(dataset, candidates)
        except OSError as e:  # a name too long, a folder we may not read
            raise ApiError(
                400, f"dataset {dataset!r} cannot be used: {e.strerror or e}"
            ) from None

    def _find(self, dataset: str, candidates: list[Path]) -> Path:
        inside = [
            c.resolve()
            for c in candidates
            if any(c.resolve().is_relative_to(r) for r in self.dataset_roots)
        ]
        if not inside:
            roots = ", ".join(repr(str(r)) for r in self.dataset_roots)
            raise ApiError(
                403,
                f"dataset {dataset!r} lies outside the dataset roots ({roots})",
            )
        for path in inside:
            if path.is_dir() and path not in self.dataset_roots:
                if not has_images(path) and not _holds_shards(path):
                    raise ApiError(400, f"dataset folder {dataset!r} holds no images")
                return path
        raise ApiError(404, f"no dataset folder {dataset!r} under the dataset roots")

    def start(
        self, datasets: Sequence[str], rebuild: bool = False, moved: bool = False
    ) -> Build:
        """Start building ``datasets`` (names or paths, see :meth:`resolve`);
        ``rebuild`` and ``moved`` as ``imgindex build`` takes them.

        Raises
        ------
        ApiError
            For a bad dataset, one already being built (409), or too many
            builds running (429).
        """
        if not datasets:
            raise ApiError(400, "give at least one dataset")
        roots = [self.resolve(d) for d in datasets]
        names = [r.name for r in roots]
        if len(set(names)) != len(names):
            raise ApiError(
                400, "two datasets share a folder name, so their indexes would collide"
            )
        with self._lock:
            running = [b for b in self._builds.values() if b.running]
            if len(running) >= self.max_running:
                raise ApiError(
                    429,
                    f"{len(running)} builds are running, the most this service "
                    "runs at once (imgindex.serve.max-builds); try again later",
                )
            busy = {n for b in running for _, n in b.jobs} & set(names)
            if busy:
                raise ApiError(
                    409, f"index {sorted(busy)[0]!r} is being built by another build"
                )
            build = Build(
                id=uuid.uuid4().hex[:12],
                jobs=list(zip(roots, names, strict=True)),
                rebuild=rebuild,
                progress=ProgressFile(None, names),
                moved=moved,
            )
            build.thread = threading.Thread(
                target=self._run, args=(build,), name=f"build-{build.id}", daemon=True
            )
            self._builds[build.id] = build
            self._forget_old()
            build.thread.start()
        self._on_state("started")
        logger.info("build %s started: %s", build.id, ", ".join(names))
        return build

    def get(self, build_id: str) -> Build:
        build = self._builds.get(build_id)
        if build is None:
            raise ApiError(404, f"no build with id {build_id!r}")
        return build

    def list(self) -> list[Build]:
        with self._lock:
            return list(self._builds.values())

    def running(self) -> int:
        return sum(b.running for b in self.list())

    def cancel(self, build_id: str) -> Build:
        """Ask build ``build_id`` to stop (blocks while its tasks are cancelled)."""
        build = self.get(build_id)
        build.cancel.request()
        return build

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the running builds, wait for them, release the cluster."""
        for build in self.list():
            if build.running:
                build.cancel.request()
        deadline = time.monotonic() + timeout
        for build in self.list():
            if build.thread is not None:
                build.thread.join(max(0.0, deadline - time.monotonic()))
        for conn in [*self._let_go, self._conn]:
            if conn is not None:
                conn.close()
        self._conn, self._let_go = None, []

    def _forget_old(self) -> None:
        finished = [k for k, b in self._builds.items() if not b.running]
        for key in finished[: max(0, len(finished) - KEPT_FINISHED)]:
            del self._builds[key]

    def _connection(self, build: Build) -> Any:
        """The cluster for ``build``: the one held, unless it is lost, or a
        LocalCluster fallen back to while the configured scheduler can be
        used again (else the service would build on this machine for the
        rest of its life after one outage). One let go is closed once the
        last build on it ends."""
        from imgindex.pipeline.errors import SchedulerUnreachable

        with self._conn_lock:
            held = self._conn
            if held is not None and held.client.status == "running":
                if not held.fell_back:
                    build.conn = held
                    return held
                try:
                    fresh = self._connect(False)
                except SchedulerUnreachable:
                    build.conn = held  # still unreachable
                    return held
                logger.warning(
                    "the configured scheduler can be used again: builds run on "
                    "it from now on, not on the LocalCluster fallen back to"
                )
            else:
                fresh = self._connect(True)
            if held is not None:
                self._let_go.append(held)
            self._conn = build.conn = fresh
        return fresh

    def _release(self, build: Build) -> None:
        """``build`` is over: close the clusters let go that no build uses."""
        with self._conn_lock:
            build.conn = None
            used = {id(b.conn) for b in self.list() if b.conn is not None}
            unused = [c for c in self._let_go if id(c) not in used]
            self._let_go = [c for c in self._let_go if id(c) in used]
        for conn in unused:
            try:
                conn.close()
            except Exception as e:  # a lost scheduler's client closes noisily
                logger.info("closing a cluster let go: %s", e)

    def _run(self, build: Build) -> None:
        from imgindex.cluster.shared import workers_without
        from imgindex.cluster.worker import setup_workers

        progress = build.progress
        planned: list[PlannedBuild | ImgindexError] = []
        try:
            spec = ModelSpec.from_config()
            # Planned first: a build that finds every index current needs no
            # cluster, and the service may have none started yet; where it
            # has one, a large dataset is listed on its workers.
            with self._conn_lock:
                running = self._conn
            at_hand = None
            if running is not None and running.client.status == "running":
                at_hand = running.client
            planned = plan_datasets(
                build.jobs,
                self.out,
                spec=spec,
                rebuild=build.rebuild,
                moved=build.moved,
                cluster=at_hand,
            )
            client, blind = None, []
            if needs_cluster(planned):
                conn = self._connection(build)
                progress.set_cluster(public_cluster(conn))
                build.cancel.check()
                setup_workers(conn.client, spec)
                client, blind = conn.client, workers_without(conn.client, self.out)
            else:
                report = no_cluster(planned)
                del report["address"]  # as public_cluster gives it
                progress.set_cluster(report)
            summaries, _ = run_builds(
                client,
                build.jobs,
                self.out,
                lambda name: DatasetProgress(progress, name),
                build_id=build.id,
                planned=planned,
                spec=spec,
                workers_write=not blind,
                cancel=build.cancel,
            )
            build.summaries = summaries
            progress.finish()
        except BuildCancelled as e:
            progress.finish(error=str(e), state="cancelled")
        except (ImgindexError, OSError) as e:
            progress.finish(error=error_text(e))
        except Exception as e:  # a bug: the build fails, the service stays up
            logger.exception("build %s failed", build.id)
            progress.finish(error=f"{type(e).__name__}: {e}")
        finally:
            for p in planned:  # the locks of those it did not reach
                if isinstance(p, PlannedBuild):
                    p.close()
            self._release(build)
        state = progress.snapshot()["state"]
        self._on_state(state)
        logger.info("build %s %s", build.id, state)


def _holds_shards(folder: Path) -> bool:
    """Whether ``folder`` is a dataset of tar shards (pipeline/sources.py)."""
    from imgindex.pipeline.errors import DatasetError
    from imgindex.pipeline.sources import parse_source

    try:
        return parse_source(folder).kind == "tar"
    except DatasetError:
        return False
