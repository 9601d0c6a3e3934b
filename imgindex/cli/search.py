"""`imgindex search` and `imgindex info`: read an index."""

from __future__ import annotations

import io
import json
import os
import sys
from functools import partial
from pathlib import Path

import click

from imgindex.cli.group import cli
from imgindex.cli.options import (
    check_scheduler_options,
    jobqueue_options,
    quality_line,
    scheduler_options,
)
from imgindex.feedback import ProgressBars, shown
from imgindex.pipeline.errors import WorkerEnvironmentError

FEW_FORWARD_PASSES = 64  # fewer: torch, unless ONNX Runtime runs from its cache
BATCH_CHECKED = 16  # images (a query and its turns) embedded at a time with --copies


class StdinQuery:
    """The query image read from standard input (IMAGE ``-``): its bytes,
    opened afresh each time the search reads them."""

    def __init__(self, data: bytes):
        self.data = data

    def __str__(self) -> str:
        return "-"

    def opened(self) -> io.BytesIO:
        opened = io.BytesIO(self.data)
        opened.name = "-"  # errors name the query as given
        return opened


def _opened(query: Path | StdinQuery) -> str | io.BytesIO:
    return query.opened() if isinstance(query, StdinQuery) else os.fspath(query)


def _query_images(images, queries_from) -> list[Path | StdinQuery]:
    """Query files: each IMAGE a file or a folder (walked), ``-`` an image
    read from standard input, plus a list file."""
    from imgindex.pipeline.search import query_files
    from imgindex.pipeline.sources import list_entry

    listed: list[Path] = []
    if queries_from is not None:
        # Read as a dataset's .txt list is: blank lines and # comments left out.
        entries = map(list_entry, queries_from.read().splitlines())
        listed = [Path(entry) for entry in entries if entry]
    paths: list[Path | StdinQuery] = []
    for image in images:
        if str(image) != "-":
            paths.extend(query_files(image))
        elif any(isinstance(p, StdinQuery) for p in paths) or (
            # A list file opened from a path has its name; stdin has none
            # of its own ("<stdin>", or none under click's test runner).
            queries_from is not None
            and getattr(queries_from, "name", "<stdin>") == "<stdin>"
        ):
            raise click.UsageError(
                "standard input holds one thing: the query image (IMAGE -, "
                "once) or the list of queries (--queries-from -)"
            )
        else:
            paths.append(StdinQuery(sys.stdin.buffer.read()))
    for image in listed:
        paths.extend(query_files(image))
    if not paths:
        raise click.UsageError("no query images (give IMAGE files or folders)")
    return paths


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--queries-from",
    type=click.File("r", encoding="utf-8", errors="surrogateescape"),
    default=None,
    help="Also query the image paths listed in this file, one a line (- = stdin).",
)
@click.option(
    "-k",
    "k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Results per query.",
)
@click.option(
    "--turns/--no-turns",
    default=None,
    help="Also search each query turned by 90, 180 and 270 degrees, to find "
    "copies whose orientation was lost (4 embeddings a query) [imgindex.search."
    "turns: on].",
)
@click.option(
    "--copies",
    is_flag=True,
    help="Tell each hit a copy of its query, another shot of its scene, or "
    "neither, as `imgindex duplicates` does (each hit's file is read: about "
    "0.15 s a copy on one core, less for the rest).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list per query.")
@click.option(
    "--jsonl",
    "as_lines",
    is_flag=True,
    help="Print a JSON object per query, one a line, as each batch is searched: "
    '{"query", "hits"}, or {"query", "error"} for one that could not be read.',
)
@partial(scheduler_options, instead="searching here")
@partial(
    jobqueue_options,
    config=" for this search (never from imgindex.jobqueue.system: a few "
    "queries need not wait in a queue)",
)
def search(
    index_dir,
    images,
    queries_from,
    k,
    turns,
    copies,
    as_json,
    as_lines,
    scheduler,
    scheduler_file,
    no_fallback,
    jobqueue,
    jobs,
):
    """Find the images in INDEX_DIR most similar to each query IMAGE.

    An IMAGE may be a folder: every image under it is a query; `-` is an
    image read from standard input (`curl URL | imgindex search DIR -`). Queries are
    embedded and searched in batches. A query that cannot be read as an
    image is named on stderr and gets no results (an empty list with
    --json); the others are searched, and the exit status is 1.

    Where a scheduler is named (as for `build`), or --jobqueue asks for
    batch jobs, the workers embed the queries and check the hits of
    --copies; this process reads the queries and searches the index. With
    neither, all of it runs here.
    """
    if as_json and as_lines:
        raise click.UsageError("give --json or --jsonl, not both")
    check_scheduler_options(scheduler, scheduler_file)
    images = _query_images(images, queries_from)
    if jobqueue and not (scheduler or scheduler_file):
        from imgindex.cluster.jobqueue import start_jobqueue

        # Job logs beside the index, where its builds keep theirs.
        logs = index_dir.resolve().parent / ".imgindex-jobs"
        conn = start_jobqueue(jobqueue, jobs, log_directory=logs)
        click.echo(f"cluster: {shown(conn.reason)}", err=True)
    else:
        conn = _cluster(scheduler, scheduler_file, no_fallback)
    try:
        _search(index_dir, images, k, turns, copies, as_json, as_lines, conn)
    except WorkerEnvironmentError as e:
        # Workers that cannot run imgindex (a DASK_SCHEDULER_ADDRESS set for
        # some other cluster): nothing was searched yet.
        if no_fallback or not _falls_back():
            raise
        click.echo(f"cluster: {shown(str(e))}; searching here", err=True)
        conn.close()
        conn = None
        _search(index_dir, images, k, turns, copies, as_json, as_lines, None)
    finally:
        if conn is not None:
            conn.close()


def _falls_back() -> bool:
    from imgindex.pipeline.config import config_value

    return bool(config_value(None, "imgindex.fallback"))


def _cluster(scheduler, scheduler_file, no_fallback):
    """The named scheduler's connection, or None (search here): none is
    named, or it cannot be used and falling back is allowed."""
    from imgindex.cli.group import shorten_distributed_logs
    from imgindex.cluster.connect import connect, resolve_target
    from imgindex.pipeline.errors import SchedulerUnreachable

    target = resolve_target(scheduler, scheduler_file)
    if target.address is None and target.scheduler_file is None:
        return None
    shorten_distributed_logs()
    try:
        conn = connect(
            scheduler,
            scheduler_file,
            fallback=False,
            strict_by_user=bool(no_fallback),
        )
    except SchedulerUnreachable as e:
        if no_fallback or not _falls_back():
            raise
        click.echo(f"cluster: {shown(str(e))}; searching here", err=True)
        return None
    click.echo(f"cluster: {shown(conn.reason)}", err=True)
    return conn


def _search(index_dir, images, k, turns, copies, as_json, as_lines, conn) -> None:
    from imgindex.pipeline.config import config_value
    from imgindex.pipeline.errors import DecodeError, ImgindexError
    from imgindex.pipeline.search import BATCH, Searcher

    turns = bool(config_value(turns, "imgindex.search.turns"))
    few = len(images) * (4 if turns else 1) < FEW_FORWARD_PASSES
    client = conn.client if conn is not None else None
    searcher = Searcher(index_dir, turns=turns, few_passes=few, client=client)
    if searcher.index.ntotal == 0:
        click.echo(
            f"{shown(str(index_dir))}: the index holds no images (its build "
            "indexed none: `imgindex info` lists why); no query has hits",
            err=True,
        )
    unreadable: dict[int, DecodeError] = {}
    # Checking hits reads each one's file (~0.14 s for a copy): smaller
    # batches, so that the bar moves every few seconds.
    batch = BATCH_CHECKED if copies else BATCH
    bar = None
    if len(images) > searcher.queries_per_batch(batch):
        # Thousands of queries take minutes on this machine's CPU.
        bar = ProgressBars(f"{shown(index_dir.name)}: searching")
    found = searcher.iter_hits(
        images,
        k,
        batch=batch,
        progress=bar and (lambda done, total: bar.update(done, total, len(unreadable))),
        unreadable=unreadable.__setitem__,
        opened=_opened,
        copies=copies,
    )
    try:
        if as_lines:
            _print_lines(images, found, unreadable)
        else:
            results = list(found)
    finally:
        if bar is not None:
            bar.close()
    if len(unreadable) == len(images) == 1:
        raise unreadable[0]
    for error in unreadable.values():
        click.echo(f"not searched: {shown(str(error))}", err=True)
    if len(unreadable) == len(images):
        raise ImgindexError(
            f"none of the {len(images)} queries could be read (named above)"
        )
    if not as_lines:
        _print_results(images, results, unreadable, as_json)
    if unreadable:
        # grep's way: every result that could be found, and a failing status.
        raise ImgindexError(
            f"{len(unreadable)} of {len(images)} queries could not be read "
            "(named above); the others were searched"
        )


def _print_lines(images, found, unreadable) -> None:
    """A line per query as its batch is searched: thousands of queries need
    neither their results held nor their order known to read them."""
    for n, hits in enumerate(found):
        line: dict = {"query": str(images[n])}
        if n in unreadable:
            line["error"] = unreadable[n].reason
        else:
            line["hits"] = [h.to_json() for h in hits]
        click.echo(json.dumps(line))


def _print_results(images, results, unreadable, as_json: bool) -> None:
    if as_json:
        # An unreadable query's list is empty: the lists stay one per query.
        click.echo(
            json.dumps([[h.to_json() for h in hits] for hits in results], indent=2)
        )
        return
    for n, (query, hits) in enumerate(zip(images, results, strict=True)):
        click.echo(f"{shown(str(query))}:")
        if n in unreadable:
            click.echo(f"  not searched: {shown(unreadable[n].reason)}")
        elif not hits:
            click.echo("  no hits")
        for h in hits:
            kind = f"{h.kind:9}  " if h.kind is not None else ""
            click.echo(f"  {h.rank:3d}  {h.score:.4f}  {kind}{shown(h.path)}")


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(index_dir, as_json):
    """Describe the index in INDEX_DIR: model, size, shards, failures."""
    from imgindex.pipeline.describe import describe_index
    from imgindex.pipeline.sources import moved_hint
    from imgindex.pipeline.store import read_index_dir

    with read_index_dir(index_dir, by_id=True) as stored:
        report = describe_index(index_dir, stored)
    m = stored.meta
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key in (
        "name",
        "source",
        "source_kind",
        "model",
        "dim",
        "metric",
        "index_key",
        "count",
        "copies",
        "failed",
        "created",
        "updated",
        "imgindex_version",
    ):
        click.echo(f"{key:17} {shown(str(report[key]))}")
        if key == "source" and not report["source_found"]:
            hint = moved_hint(m, index_dir)
            click.echo(f"{'':17} (not found: {shown(hint)})")
    if m.metadata_columns:
        click.echo(f"{'metadata':17} {shown(', '.join(m.metadata_columns))}")
    if m.index_reason:
        click.echo(f"{'index':17} {shown(m.index_reason)}")
    quality = quality_line(m.quality, m.search_params)
    if quality:
        click.echo(f"{'quality':17} {quality}")
    sh = report["shards"]
    click.echo(
        f"{'shards':17} {sh['count']}"
        + (
            f" ({sh['bytes'] / 2**20:.1f} MiB of {sh['dtype']} vectors)"
            if sh["count"]
            else ""
        )
    )
    for f in stored.failures[:20]:
        click.echo(f"  failed {shown(f.path)}: {shown(f.reason)}")
    if len(stored.failures) > 20:
        click.echo(f"  ... and {len(stored.failures) - 20} more (--json lists all)")
