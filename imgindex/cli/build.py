"""`imgindex build`: embed datasets and write their indexes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from imgindex.cli.group import Interrupted, cli, sigterm_as_interrupt
from imgindex.cli.options import (
    check_scheduler_options,
    connect_cluster,
    index_options,
    jobqueue_options,
    model_options,
    options_as_click_errors,
    print_index_lines,
    scheduler_options,
)
from imgindex.feedback import TerminalFeedback, shown
from imgindex.pipeline.words import counted


@cli.command()
@click.argument("datasets", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Root folder; each dataset's index goes to OUT/<dataset name>/.",
)
@click.option(
    "--input-format",
    type=click.Choice(["auto", "folder", "list", "tar"]),
    default="auto",
    show_default=True,
    help="What each DATASET is: a folder of images, a file list (.txt, .csv, "
    ".parquet) or tar shards (a {00000..00099} pattern, a .tar, a folder or "
    ".txt list of them); auto tells by its form.",
)
@click.option(
    "--path-column",
    default=None,
    metavar="NAME",
    help="The column of a .csv or .parquet file list that holds the paths "
    "[default: path].",
)
@scheduler_options
@model_options
@click.option(
    "--gpu-resource",
    is_flag=True,
    default=None,
    help="Send embedding tasks only to workers started with --resources GPU=1 "
    "[imgindex.gpu-resource].",
)
@jobqueue_options
@click.option(
    "--worker-wait",
    default=None,
    metavar="DURATION",
    help="How long a started cluster may take to give a first worker, e.g. 10m "
    "[imgindex.worker-wait].",
)
@click.option(
    "--partition-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per task [imgindex.partition-size].",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=None,
    help="Retries of a failing task [imgindex.retries].",
)
@click.option(
    "--task-timeout",
    default=None,
    metavar="DURATION",
    help="Fail a partition running longer, e.g. 300s [imgindex.task-timeout].",
)
@index_options
@click.option(
    "--rebuild",
    is_flag=True,
    help="Ignore existing indexes and unfinished work; embed everything.",
)
@click.option(
    "--moved",
    is_flag=True,
    help="A DATASET whose index under OUT names another place is that "
    "dataset, moved or copied here: embed only its new and changed images "
    "(a copy that dropped the times is read, not embedded again).",
)
@click.option(
    "--name",
    default=None,
    help="Name of the index under OUT (one DATASET only; default: its folder name).",
)
@click.option(
    "--progress-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Keep a JSON progress file here (see `imgindex status`).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON summary on stdout."
)
@sigterm_as_interrupt
def build(
    datasets,
    out,
    scheduler,
    scheduler_file,
    no_fallback,
    jobqueue,
    jobs,
    progress_file,
    as_json,
    **options,
):
    """Embed the images of each DATASET and write OUT/<name>/.

    A DATASET is a folder of images, a file list, tar shards, or an fsspec
    URL of one (s3://bucket/photos/, https://host/list.txt).
    """
    from imgindex.cluster.connect import start_local_early

    started = time.perf_counter()
    check_scheduler_options(scheduler, scheduler_file)
    start_local_early(scheduler, scheduler_file, jobqueue)
    from imgindex.building import check_build, run_build
    from imgindex.pipeline.progress import ProgressFile

    with options_as_click_errors():
        # Every other flag is an option of the build itself, as the API's
        # keyword argument of the same name.
        request = check_build(datasets, out, **options)
    tracker = ProgressFile(progress_file, request.names) if progress_file else None

    def start_cluster():
        return connect_cluster(
            scheduler,
            scheduler_file,
            no_fallback,
            jobqueue,
            jobs,
            options["gpu_resource"],
            options["worker_wait"],
            out.resolve(),
        )

    try:
        report, errors = run_build(
            request, start_cluster, TerminalFeedback(tracker), started
        )
    except KeyboardInterrupt as e:
        raise Interrupted(
            str(e) or "SIGINT",
            "; finished partitions were saved: run the same command again to resume",
        ) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_build_report(report)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise click.ClickException(shown(errors[0]) + more)


def _print_build_report(report: dict) -> None:
    for d in report["datasets"]:
        if "error" in d:
            click.echo(f"{shown(d['name'])}: FAILED: {shown(d['error'])}")
            continue
        click.echo(
            f"{shown(d['name'])}: {d['indexed']} indexed ({d['embedded']} embedded, "
            f"{len(d['failed'])} failed; added {d['added']}, updated {d['updated']}, "
            f"removed {d['removed']}, unchanged {d['unchanged']}) "
            f"in {d['seconds']:.1f} s, "
            f"{d['images_per_second']:.1f} images/s -> {shown(d['index'])}"
        )
        print_index_lines(d)
        if d["moved_from"]:
            click.echo(f"  dataset moved here from {shown(d['moved_from'])}")
        if d["touched"]:
            one = d["touched"] == 1
            click.echo(
                f"  {counted(d['touched'], 'unchanged image')} had a new "
                "modification time (same bytes, checked): "
                + ("its vector was kept" if one else "their vectors were kept")
            )
        if d["kept"]:
            click.echo(f"  index kept as it was: {shown(d['kept'])}")
        for runtime, images in d["runtimes"].items():
            why = d["runtime_reasons"].get(runtime)
            click.echo(
                f"  model run by {runtime} for {counted(images, 'image')}"
                + (f" ({shown(why)})" if why else "")
            )
        if d["resumed_partitions"]:
            click.echo(
                f"  resumed {d['resumed_partitions']} of {d['partitions']} partitions "
                "from an interrupted build"
            )
        for f in d["failed"][:10]:
            click.echo(f"  skipped {shown(f['path'])}: {shown(f['reason'])}")
        if len(d["failed"]) > 10:
            click.echo(f"  ... and {len(d['failed']) - 10} more (see `imgindex info`)")
    c = report["cluster"]
    click.echo(
        f"cluster: {c['reason']}"
        + (f", dashboard {c['dashboard']}" if c["dashboard"] else "")
    )
    if c.get("job_logs"):
        click.echo(f"job logs: {c['job_logs']}")
    click.echo(
        f"time: {report['seconds']:.1f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report["stage_seconds"].items())
    )
