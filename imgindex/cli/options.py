"""Options and helpers the commands share: cluster flags, model and index
flags, errors as Click shows them, index summaries."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from imgindex.cli.group import shorten_distributed_logs
from imgindex.feedback import shown
from imgindex.pipeline.words import counted


def scheduler_options(f, instead: str = "starting a LocalCluster"):
    """--scheduler, --scheduler-file and --no-fallback; ``instead``: what the
    command does where the scheduler cannot be used."""
    f = click.option(
        "--no-fallback",
        is_flag=True,
        default=None,
        help=f"Fail instead of {instead} when the scheduler cannot be used.",
    )(f)
    f = click.option(
        "--scheduler-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Scheduler file written by `dask scheduler --scheduler-file`.",
    )(f)
    f = click.option(
        "--scheduler",
        envvar="IMGINDEX_SCHEDULER",
        default=None,
        metavar="ADDR",
        help="Scheduler address, e.g. tcp://node1:8786 [env IMGINDEX_SCHEDULER].",
    )(f)
    return f


def jobqueue_options(f, config: str = " [imgindex.jobqueue.system]"):
    """--jobqueue and --jobs; ``config``: where --jobqueue's default comes
    from, in its help."""
    f = click.option(
        "--jobs",
        type=click.IntRange(min=1),
        default=None,
        help="Batch jobs to submit with --jobqueue [imgindex.jobqueue.jobs].",
    )(f)
    return click.option(
        "--jobqueue",
        type=click.Choice(["slurm", "pbs", "sge", "lsf", "htcondor", "oar", "moab"]),
        default=None,
        help=f"Request worker nodes from this batch system with dask-jobqueue{config}.",
    )(f)


def index_options(f):
    """--index-type, --max-index-memory, --recall-target (build and reindex)."""
    f = click.option(
        "--recall-target",
        type=click.FloatRange(min=0, max=1, min_open=True),
        default=None,
        help="Tune nprobe/efSearch until recall@10 reaches this "
        "[imgindex.index.recall-target].",
    )(f)
    f = click.option(
        "--max-index-memory",
        default=None,
        metavar="SIZE",
        help="Memory the index may take, e.g. 8GiB; bigger IVF indexes go on "
        "disk, and `auto` compresses to fit [imgindex.index.max-memory].",
    )(f)
    return click.option(
        "--index-type",
        default=None,
        metavar="TYPE",
        help="auto | flat | hnsw | ivf-flat | ivf-pq | a FAISS factory string "
        "[imgindex.index.type].",
    )(f)


def model_options(f):
    """The flags that say which model runs how: build and doctor take them."""
    options = [
        click.option("--model", default=None, help="Embedding model [imgindex.model]."),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default=None,
            help="Where workers run the model [imgindex.device].",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=None,
            help="Images per forward pass (default: 1 on CPU, 128 on a GPU) "
            "[imgindex.batch-size].",
        ),
        click.option(
            "--decode-threads",
            type=click.IntRange(min=1),
            default=None,
            help="Threads decoding images in each task (default: 1 on CPU, "
            "the worker's cores on a GPU) [imgindex.decode-threads].",
        ),
        click.option(
            "--decoder",
            type=click.Choice(["auto", "pillow", "batch"], case_sensitive=False),
            default=None,
            help="How workers decode: pillow an image at a time, batch a batch "
            "at a time on the model's device (nvJPEG on a GPU) (default auto: "
            "batch on a GPU, pillow on CPU) [imgindex.decoder].",
        ),
        click.option(
            "--precision",
            type=click.Choice(["auto", "fp32", "fp16", "bf16"], case_sensitive=False),
            default=None,
            help="Arithmetic of the model (default: fp16 autocast on a GPU, "
            "fp32 on CPU) [imgindex.precision].",
        ),
        click.option(
            "--runtime",
            type=click.Choice(["auto", "torch", "onnxruntime"], case_sensitive=False),
            default=None,
            help="What runs the model on CPU workers (default auto: ONNX Runtime "
            "where it is installed and times faster, else torch) [imgindex.runtime].",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def check_scheduler_options(scheduler, scheduler_file) -> None:
    if scheduler and scheduler_file:
        raise click.BadParameter(
            "give either --scheduler or --scheduler-file, not both",
            param_hint="--scheduler",
        )


def connect_cluster(
    scheduler,
    scheduler_file,
    no_fallback,
    jobqueue=None,
    jobs=None,
    gpu_resource=None,
    worker_wait=None,
    out: Path | None = None,
    strict_by_user: bool = True,
):
    from imgindex.cluster.connect import connect
    from imgindex.pipeline.config import config_value

    check_scheduler_options(scheduler, scheduler_file)
    shorten_distributed_logs()
    system = config_value(jobqueue, "imgindex.jobqueue.system")
    if system and not (scheduler or scheduler_file):
        from imgindex.cluster.jobqueue import start_jobqueue

        gpu = bool(config_value(gpu_resource, "imgindex.gpu-resource"))
        return start_jobqueue(
            system,
            jobs,
            gpu_resource=gpu,
            worker_wait=worker_wait,
            log_directory=(out / ".imgindex-jobs") if out else None,
        )
    return connect(
        scheduler,
        scheduler_file,
        fallback=False if no_fallback else None,
        worker_wait=worker_wait,
        strict_by_user=strict_by_user,
    )


@contextlib.contextmanager
def options_as_click_errors():
    """An option's bad value as Click shows one: naming the flag, exit 2."""
    from imgindex.building import OptionError

    try:
        yield
    except OptionError as e:
        if e.option:
            raise click.BadParameter(str(e), param_hint=e.option) from None
        raise click.UsageError(str(e)) from None


def print_index_lines(summary: dict) -> None:
    """The index's type and why, then its measured quality (build and reindex)."""
    click.echo(f"  index: {shown(summary['index_reason'])}")
    if summary.get("copies"):
        click.echo(
            f"  {summary['copies']} images have the same vector as another "
            "(identical files): the graph holds each vector once"
        )
    quality = quality_line(summary["quality"], summary["search_params"])
    if quality:
        click.echo(f"  {quality}")


def quality_line(q: dict, params: dict) -> str:
    """'recall@10 0.97 (nprobe=16), one query p50 1.2 ms / p99 3.4 ms, 1.2 GiB'."""
    if not q.get("queries"):
        return ""
    setting = ", ".join(f"{k}={v}" for k, v in params.items())
    below = "" if q.get("reached", True) else f", under the target {q['target']}"
    return (
        f"recall@{q['k']} {q['recall_at_k']:.3f}"
        + (f" ({setting})" if setting else "")
        + f"{below} on {counted(q['queries'], 'query', 'queries')}; "
        f"one query p50 {q['p50_ms']:.2f} ms, p99 {q['p99_ms']:.2f} ms; "
        f"{q['bytes'] / 2**20:.1f} MiB"
    )


def client_seeing(conn, where: Path, fallback_words: str):
    """The cluster's client if all its workers see ``where``'s folder, else None."""
    from imgindex.cluster.shared import workers_without

    click.echo(f"cluster: {conn.reason}", err=True)
    blind = workers_without(conn.client, where.parent)
    if blind:
        click.echo(
            f"{fallback_words}: {len(blind)} worker(s) cannot see {shown(str(where))}",
            err=True,
        )
        return None
    return conn.client


def span(*tags: str):
    """A Dask span: the dashboard groups the tasks submitted inside it."""
    from imgindex.pipeline.spans import BuildSpan

    return BuildSpan(*tags).entered()


def gib(n) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "unlimited"
