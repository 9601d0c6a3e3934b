"""``imgindex.build``: index datasets from Python, on the caller's Dask client."""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imgindex.building import BuildFeedback, OptionError, check_build, run_build
from imgindex.pipeline.errors import ImgindexError

if TYPE_CHECKING:
    from distributed import Client

    from imgindex.cluster.connect import Connection
    from imgindex.pipeline.build import BuildSummary


class BuildError(ImgindexError):
    """One or more datasets could not be indexed; the others were.

    Attributes
    ----------
    report : BuildReport
        What the build did, the failed datasets included.
    """

    def __init__(self, message: str, report: BuildReport):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class DatasetFailure:
    """A dataset that could not be indexed, and why (one line)."""

    name: str
    source: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "error": self.error}


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build` did: the summary ``imgindex build --json`` prints.

    Attributes
    ----------
    cluster : dict
        The cluster used: ``kind`` (``remote``, ``local`` or ``none``),
        ``address``, ``reason``, ``dashboard``, ``workers``.
    datasets : list of BuildSummary or DatasetFailure
        One per dataset, in the order given.
    seconds : float
        The whole build, checks included.
    stage_seconds : dict
        Where the time went: checks, plan, cluster, workers, builds, close.
    """

    cluster: dict[str, Any]
    datasets: list[BuildSummary | DatasetFailure]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, report: dict[str, Any]) -> BuildReport:
        from imgindex.pipeline.build import BuildSummary

        datasets: list[BuildSummary | DatasetFailure] = [
            DatasetFailure(d["name"], d["source"], d["error"])
            if "error" in d
            else BuildSummary(**d)
            for d in report["datasets"]
        ]
        return cls(
            report["cluster"], datasets, report["seconds"], report["stage_seconds"]
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``imgindex build --json`` prints."""
        return {
            "cluster": self.cluster,
            "datasets": [d.to_json() for d in self.datasets],
            "seconds": self.seconds,
            "stage_seconds": self.stage_seconds,
        }

    @property
    def failed(self) -> list[DatasetFailure]:
        return [d for d in self.datasets if isinstance(d, DatasetFailure)]

    def __getitem__(self, name: str) -> BuildSummary | DatasetFailure:
        """The summary of the dataset named ``name`` (its index's name)."""
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)

    def _repr_html_(self) -> str:
        rows = []
        for d in self.datasets:
            if isinstance(d, DatasetFailure):
                cells = [d.name, "failed", "", "", "", d.error]
            else:
                cells = [
                    d.name,
                    f"{d.indexed:,}",
                    f"{len(d.failed):,}",
                    f"{d.seconds:.1f}",
                    f"{d.images_per_second:.1f}",
                    d.index,
                ]
            rows.append("".join(f"<td>{html.escape(str(c))}</td>" for c in cells))
        head = "".join(
            f"<th>{h}</th>"
            for h in ("dataset", "indexed", "failed", "s", "images/s", "index")
        )
        c = self.cluster
        dashboard = ""
        if c.get("dashboard"):
            url = html.escape(c["dashboard"], quote=True)
            dashboard = f', dashboard <a href="{url}" target="_blank">{url}</a>'
        return (
            f"<table><tr>{head}</tr>"
            + "".join(f"<tr>{r}</tr>" for r in rows)
            + f"</table><p>cluster: {html.escape(c.get('reason', ''))}{dashboard}; "
            f"{self.seconds:.1f} s</p>"
        )


def build(
    datasets: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    fallback: bool | None = None,
    progress: bool = True,
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
) -> BuildReport:
    """Embed the images of each dataset and write ``out/<name>/``.

    The same build as ``imgindex build``: a re-run resumes an interrupted
    build, and embeds only the images added or changed since the last one.

    Parameters
    ----------
    datasets
        A folder of images, a file list (``.txt``, ``.csv``, ``.parquet``),
        tar shards, or an fsspec URL of one; or a list of them.
    out
        The root folder; each dataset's index goes to ``out/<name>/``.
    client
        The ``distributed.Client`` to build on; it is used, never closed.
        Default: the current default client (the last one made in this
        process), else the cluster the command line would find
        (``scheduler``, ``scheduler_file``, ``IMGINDEX_SCHEDULER``,
        ``imgindex.scheduler``), else a new LocalCluster, closed at the end.
    scheduler
        A scheduler's address, where no client is given (``--scheduler``).
    scheduler_file
        A ``dask scheduler --scheduler-file`` file, where no client is given.
    fallback
        Whether a LocalCluster may stand in for a scheduler that cannot be
        used (False: ``--no-fallback``); default ``imgindex.fallback``.
    progress
        Show a bar per dataset: in the cell's output in a notebook (the Dask
        dashboard shows the tasks), else on stderr.
    name
        The index's name under ``out`` (one dataset only; default: the
        dataset's folder or file name).
    input_format
        ``auto``, ``folder``, ``list`` or ``tar``: what each dataset is.
    path_column
        The column of a ``.csv`` or ``.parquet`` list holding the paths.
    model, device, batch_size, decode_threads, decoder, precision, runtime
        Which model runs where and how (``imgindex.model``, ...).
    index_type, max_index_memory, recall_target
        The FAISS index to build (``imgindex.index.*``).
    partition_size, retries, task_timeout, worker_wait, gpu_resource
        How the work is cut into tasks and how long it may take.
    rebuild
        Ignore existing indexes and unfinished work; embed everything.
    moved
        A dataset whose index under ``out`` names another place holds that
        dataset, moved here (``--moved``): only its new and changed images
        are embedded, and the index names the new place from then on.

    Every option left as None takes its ``imgindex.*`` setting (see
    Configuration), as a flag left out does.

    Returns
    -------
    BuildReport
        What ``imgindex build --json`` prints, as objects.

    Raises
    ------
    ValueError
        If an option holds a value it does not take (an ``OptionError``).
    BuildError
        If one or more datasets could not be indexed (the others were);
        its ``report`` says which and why.
    ImgindexError
        If the build could not run at all (a dataset missing, a lock held,
        no cluster).
    """
    given = locals()
    started = time.perf_counter()
    if isinstance(datasets, str | os.PathLike):
        datasets = [datasets]
    try:
        request = check_build(
            datasets, out, **{name: given[name] for name in build_options()}
        )
    except OptionError as e:
        raise OptionError(_keyword_message(e), e.option) from None

    def connect() -> Connection:
        return _connection(client, scheduler, scheduler_file, fallback, worker_wait)

    report, errors = run_build(request, connect, _feedback(progress), started)
    built = BuildReport.from_json(report)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BuildError(f"{errors[0]}{more}; see the error's .report", built)
    return built


def build_options() -> list[str]:
    """The keyword arguments :func:`check_build` takes after ``datasets`` and
    ``out``: :func:`build` takes each of them too, by the same name."""
    import inspect

    return list(inspect.signature(check_build).parameters)[2:]


def _keyword_message(e: OptionError) -> str:
    """An option's error as the API names it: ``index_type: ...``, also
    where the message begins with the flag (``--partition-size 'x' is ...``)."""
    import re

    message = str(e)
    option = e.option
    if not option:
        flag = re.match(r"(--[a-z][a-z-]*) ", message)
        if flag is None:
            return message
        option, message = flag[1], message[flag.end() :]
    keyword = option.lstrip("-").replace("-", "_").lower()
    return f"{keyword}: {message}"


def _connection(
    client: Client | None,
    scheduler: str | None,
    scheduler_file: str | None,
    fallback: bool | None,
    worker_wait: float | str | None,
) -> Connection:
    from imgindex.cluster.connect import connect, use_client

    if client is None and scheduler is None and scheduler_file is None:
        client = default_client()
    if client is not None:
        return use_client(client, worker_wait)
    if scheduler and scheduler_file:
        raise OptionError("give either scheduler or scheduler_file, not both")
    return connect(
        scheduler, scheduler_file, fallback=fallback, worker_wait=worker_wait
    )


def default_client() -> Client | None:
    """The process's default ``distributed.Client``, as ``dask.compute`` would
    use it; None where there is none."""
    from distributed import default_client as current

    try:
        return current()
    except ValueError:
        return None


def _feedback(progress: bool) -> BuildFeedback:
    if not progress:
        return BuildFeedback()
    from imgindex.feedback import NotebookFeedback, TerminalFeedback, in_notebook

    return NotebookFeedback() if in_notebook() else TerminalFeedback()
