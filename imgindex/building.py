"""Build the indexes of datasets on a cluster: what `imgindex build` and
:func:`imgindex.build` both run.

The command line and the Python API differ only in how they are told things
(flags or keyword arguments), how they show progress (bars on stderr, a
notebook's output) and how they answer (printed lines or a
:class:`~imgindex.BuildReport`). Checking the options, planning, starting or
joining a cluster and running the builds are here, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgindex.pipeline.errors import ConfigError, ImgindexError

if TYPE_CHECKING:
    from imgindex.cluster.connect import Connection
    from imgindex.pipeline.assemble import IndexRequest
    from imgindex.pipeline.embed import ModelSpec
    from imgindex.pipeline.sources import Source

logger = logging.getLogger(__name__)

# A small collection is planned in less: a re-run that finds every index
# current then starts no cluster at all. A larger one starts the cluster
# while its discovery goes on.
PLAN_ALONE_SECONDS = 0.5


class OptionError(ConfigError):
    """An option holds a value it does not take.

    ``option`` is its command-line flag (``--name``), or None where the
    message names it; the API names the keyword argument instead.
    """

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class BuildRequest:
    """A build's options, checked: nothing here starts a cluster."""

    sources: list[Source]
    names: list[str]
    out: Path
    spec: ModelSpec
    index: IndexRequest
    rebuild: bool = False
    moved: bool = False
    partition_size: int | None = None
    retries: int | None = None
    task_timeout: float | str | None = None
    gpu_resource: bool | None = None

    @property
    def datasets(self) -> list[tuple[Source, str]]:
        return list(zip(self.sources, self.names, strict=True))


def check_build(
    datasets: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    name: str | None = None,
    input_format: str = "auto",
    path_column: str | None = None,
    model: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    decode_threads: int | None = None,
    decoder: str | None = None,
    precision: str | None = None,
    runtime: str | None = None,
    index_type: str | None = None,
    max_index_memory: str | int | None = None,
    recall_target: float | None = None,
    partition_size: int | None = None,
    retries: int | None = None,
    task_timeout: float | str | None = None,
    worker_wait: float | str | None = None,
    gpu_resource: bool | None = None,
    rebuild: bool = False,
    moved: bool = False,
) -> BuildRequest:
    """Check a build's options before any cluster starts or image is read.

    Raises
    ------
    OptionError
        Naming the option (its flag) that holds a bad value.
    ImgindexError
        If a dataset is unusable or ``out`` is not writable.
    """
    from imgindex.pipeline.config import count_or_auto
    from imgindex.pipeline.config_check import check_config
    from imgindex.pipeline.models import check_model_name, get_model

    check_config()
    if not datasets:
        raise OptionError("give at least one dataset", "DATASETS")
    check_duration(task_timeout, "--task-timeout", "imgindex.task-timeout")
    check_duration(worker_wait, "--worker-wait", "imgindex.worker-wait")
    spec = model_spec(
        model, device, batch_size, decode_threads, precision, runtime, decoder
    )
    check_runtime(spec.runtime)
    try:
        count_or_auto(partition_size, "imgindex.partition-size")  # a bad value, now
    except ValueError as e:
        raise OptionError(str(e)) from None
    request = index_request(index_type, max_index_memory, recall_target)
    sources = check_datasets(datasets, name, input_format, path_column)
    names = [name] if name else [s.name for s in sources]
    out = Path(out)
    check_writable(out)
    check_model_name(spec.name)  # an unknown model: one line, before any cluster
    if request.factory_string:
        # Whether FAISS can build it depends on the dim: only then is the model
        # loaded here; otherwise the workers report it (saves 2-3 s and the
        # client's copy of torch).
        check_index_type(request, get_model(spec.name, "cpu").dim)
    return BuildRequest(
        sources,
        names,
        out,
        spec,
        request,
        rebuild=rebuild,
        moved=moved,
        partition_size=partition_size,
        retries=retries,
        task_timeout=task_timeout,
        gpu_resource=gpu_resource,
    )


def model_spec(
    model=None,
    device=None,
    batch_size=None,
    decode_threads=None,
    precision=None,
    runtime=None,
    decoder=None,
) -> ModelSpec:
    """The model options as a spec (build and doctor)."""
    from imgindex.pipeline.embed import ModelSpec

    try:
        return ModelSpec.from_config(
            model, device, batch_size, decode_threads, precision, runtime, decoder
        )
    except ValueError as e:
        raise OptionError(str(e)) from None


def check_runtime(runtime: str) -> None:
    """``onnxruntime`` where this environment has none: said before any
    cluster starts (its workers would each fail the same way)."""
    if runtime != "onnxruntime":
        return
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        from imgindex.pipeline.runtime import INSTALL_HINT

        raise OptionError(
            f"onnxruntime is not installed here ({INSTALL_HINT}); or use "
            "--runtime auto, which falls back to torch",
            "--runtime",
        ) from None


def index_request(index_type=None, max_index_memory=None, recall_target=None):
    """The index options as a request (build and reindex)."""
    from imgindex.pipeline.assemble import IndexRequest

    try:
        return IndexRequest.from_config(index_type, max_index_memory, recall_target)
    except ValueError as e:
        raise OptionError(str(e)) from None


def check_index_type(request: IndexRequest, dim: int) -> None:
    """A factory string FAISS cannot build is refused before any work is done."""
    from imgindex.pipeline.index_policy import KINDS

    try:
        request.choose(1_000_000, dim)
    except ValueError as e:
        raise OptionError(
            f"{e}; give a factory string FAISS can build or one of {', '.join(KINDS)}",
            "--index-type",
        ) from None


def check_duration(value, option: str, key: str) -> None:
    """Reject a malformed duration before any cluster is started."""
    from imgindex.pipeline.config import seconds_value

    if value is None:
        return  # the configuration's: pipeline/config_check.py checked it
    try:
        seconds_value(value, key)
    except (ValueError, KeyError, TypeError):
        raise OptionError(
            f"{value!r} is not a duration; give seconds or a unit, e.g. 300s or 5m",
            option,
        ) from None


def check_datasets(
    datasets: Sequence[str | os.PathLike],
    name: str | None = None,
    input_format: str = "auto",
    path_column: str | None = None,
) -> list[Source]:
    """The datasets as sources; one line for a bad name, an empty folder or
    two datasets whose indexes would collide."""
    from imgindex.pipeline.discover import has_images
    from imgindex.pipeline.sources import parse_source

    if name is not None:
        if len(datasets) > 1:
            raise OptionError(
                "--name names one index; build the datasets one at a time", "--name"
            )
        if not _usable_name(name):
            raise OptionError(f"{name!r} cannot be a folder name under --out", "--name")

    sources = [parse_source(d, input_format, path_column) for d in datasets]
    names = [s.name for s in sources]
    for source, derived in zip(sources, names, strict=True):
        if name is None and not _usable_name(derived):
            raise OptionError(
                f"dataset {source.spec!r} gives no folder name for its index "
                f"({derived!r}); give it one with --name",
                "DATASETS",
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OptionError(
            f"two datasets share the name {dupes[0]!r}, so their indexes "
            "would collide under --out; build them one at a time with --name",
            "DATASETS",
        )
    for source in sources:
        if source.kind == "folder" and not source.remote:
            if not has_images(source.base):
                raise ImgindexError(
                    f"dataset folder {source.spec!r} contains no image files"
                )
    return sources


def _usable_name(name: str) -> bool:
    """Whether ``name`` can be an index's folder under --out: one visible
    folder name (a dot-folder would be hidden, or out itself)."""
    return bool(name) and "/" not in name and not name.startswith(".")


def check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ImgindexError(f"output folder {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".imgindex-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ImgindexError(
            f"output folder {str(out)!r} is not writable: {e.strerror}"
        ) from None


class BuildFeedback:
    """How a build tells its caller what happens: lines (the cluster used, its
    dashboard) and one progress observer per dataset. The command line prints
    them on stderr; a notebook shows them in the cell's output."""

    def say(self, line: str) -> None:
        logger.info("%s", line)

    def observer(self, name: str):
        """The :class:`~imgindex.pipeline.build.DatasetObserver` of one dataset."""
        return _Unobserved()

    def cluster(self, cluster: dict[str, Any]) -> None:
        """The cluster as ``build --json`` reports it, once it is known."""

    def finish(self, error: str | None = None, state: str | None = None) -> None:
        """The build ended (``error``: how it failed)."""


class _Unobserved:
    def update(self, done: int, total: int, failed: int) -> None:
        pass

    def index_step(self, stage: str, done: int, total: int) -> None:
        pass

    def close(self, error: str | None = None) -> None:
        pass


def run_build(
    request: BuildRequest,
    connect: Callable[[], Connection],
    feedback: BuildFeedback | None = None,
    started: float | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Plan, start or join a cluster (``connect``; none where every index is
    current), build, and return ``build --json``'s report and each failed
    dataset's one-line error. ``started``: when the caller began checking the
    options (``time.perf_counter()``), counted as the stage ``checks``.

    Raises
    ------
    ImgindexError
        If the build as a whole could not run (a lock held, no cluster).
    KeyboardInterrupt
        Interrupted; finished partitions are kept for a re-run to resume.
    """
    from imgindex.pipeline.background import Background
    from imgindex.pipeline.build import (
        StageTimer,
        no_cluster,
        plan_datasets,
        run_builds,
    )

    feedback = feedback or BuildFeedback()
    now = time.perf_counter()
    started = now if started is None else started
    # Where a build's fixed cost goes, beside each dataset's own stages.
    stages = StageTimer(checks=round(now - started, 3))
    out = request.out
    try:
        with contextlib.ExitStack() as held:
            # Each index is locked and its dataset planned while the cluster
            # starts; a re-run that finds nothing to do starts none. A large
            # dataset's listing moves to the workers once they are there.
            cluster_ready: Future = Future()
            held.callback(_settle, cluster_ready)
            planning = Background(
                plan_datasets,
                request.datasets,
                out,
                spec=request.spec,
                rebuild=request.rebuild,
                moved=request.moved,
                index=request.index,
                cluster=cluster_ready,
            )
            held.callback(_release_planned, planning)
            conn, blind = None, []
            with stages("plan"):
                cluster_needed = _cluster_needed(planning)
            if cluster_needed:
                with stages("cluster"):
                    conn = held.enter_context(connect())
                    _settle(cluster_ready, conn.client)
                with stages("workers"):
                    blind = _start_workers(conn, request, feedback)
            _settle(cluster_ready)
            with stages("plan"):  # what of it the cluster's start did not cover
                planned = planning.result()
            if conn is None:
                cluster_json = no_cluster(planned)
                feedback.say(f"cluster: {cluster_json['reason']}")
                feedback.cluster(cluster_json)
            with stages("builds"):
                summaries, errors = run_builds(
                    conn.client if conn else None,
                    request.datasets,
                    out,
                    feedback.observer,
                    build_id=uuid.uuid4().hex[:6],
                    planned=planned,
                    spec=request.spec,
                    partition_size=request.partition_size,
                    retries=request.retries,
                    task_timeout=request.task_timeout,
                    gpu_resource=request.gpu_resource,
                    workers_write=not blind,
                    index=request.index,
                )
            if conn is not None:
                cluster_json = conn.to_json()
            closing = time.perf_counter()
        stages["close"] = round(time.perf_counter() - closing, 3)
    except KeyboardInterrupt as e:
        feedback.finish(
            error=f"interrupted by {str(e) or 'SIGINT'}", state="interrupted"
        )
        raise
    except ImgindexError as e:
        feedback.finish(error=str(e))
        raise
    feedback.finish()
    report = {
        "cluster": cluster_json,
        "datasets": summaries,
        "seconds": round(time.perf_counter() - started, 3),
        "stage_seconds": dict(stages),
    }
    return report, errors


def _cluster_needed(planning) -> bool:
    """False only where planning finished in PLAN_ALONE_SECONDS and found
    nothing for workers to do."""
    from imgindex.pipeline.build import needs_cluster

    try:
        planned = planning.result(timeout=PLAN_ALONE_SECONDS)
    except TimeoutError:
        return True
    return needs_cluster(planned)


def _settle(future: Future, value=None) -> None:
    """Give ``future`` its value unless it has one (planning waits on none)."""
    if not future.done():
        future.set_result(value)


def _release_planned(planning) -> None:
    """Unlock what planning locked (the builds release theirs as they end)."""
    from imgindex.pipeline.build import PlannedBuild

    if not planning.done():
        return  # interrupted mid-discovery: its locks go with the process
    try:
        planned = planning.result()
    except BaseException:
        return  # it released its own locks
    for p in planned:
        if isinstance(p, PlannedBuild):
            p.close()


def _start_workers(
    conn: Connection, request: BuildRequest, feedback: BuildFeedback
) -> list[str]:
    """Say which cluster this is, set its workers up; the workers that cannot
    write to the output folder (their vectors then travel to the client)."""
    from imgindex.cluster.shared import workers_without
    from imgindex.cluster.worker import setup_workers

    feedback.say(f"cluster: {conn.reason}")
    if conn.dashboard:
        feedback.say(f"dashboard: {conn.dashboard}")
    if conn.job_logs:
        feedback.say(f"job logs: {conn.job_logs}")
    feedback.cluster(conn.to_json())
    setup_workers(conn.client, request.spec)
    blind = workers_without(conn.client, request.out.resolve())
    if blind:
        feedback.say(
            f"vectors: streamed to the client: {len(blind)} worker(s) cannot "
            f"write to {str(request.out)!r} (no shared file system?), e.g. "
            f"{blind[0]}"
        )
    return blind
