"""`imgindex reindex`: rebuild an index from its shards."""

from __future__ import annotations

import json
from pathlib import Path

import click

from imgindex.cli.group import cli, sigterm_as_interrupt
from imgindex.cli.options import (
    client_seeing,
    connect_cluster,
    index_options,
    options_as_click_errors,
    print_index_lines,
    scheduler_options,
    span,
)
from imgindex.feedback import ProgressBars, shown


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@scheduler_options
@index_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary.")
@sigterm_as_interrupt
def reindex(
    index_dir,
    scheduler,
    scheduler_file,
    no_fallback,
    index_type,
    max_index_memory,
    recall_target,
    as_json,
):
    """Rebuild INDEX_DIR's FAISS index from its stored shards; embed nothing.

    The index is trained, filled and merged on the cluster's workers when
    they see INDEX_DIR, else here. --index-type switches the index's type.
    """
    from imgindex.building import check_index_type, index_request
    from imgindex.pipeline.reindex import reindex as rebuild_from_shards
    from imgindex.pipeline.store import read_meta

    with options_as_click_errors():
        request = index_request(index_type, max_index_memory, recall_target)
        meta = read_meta(index_dir)  # one line if it is not an index
        check_index_type(request, meta.dim)
    where = Path(index_dir).resolve()
    with connect_cluster(scheduler, scheduler_file, no_fallback) as conn:
        client = client_seeing(conn, where, "index built here")
        bar = ProgressBars(meta.name)
        try:
            with span("imgindex reindex", meta.name):
                summary = rebuild_from_shards(where, request, client, bar.index_step)
        finally:
            bar.close()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"{shown(summary['index'])}: {summary['count']} vectors from "
        f"{summary['shards']} shards in {summary['seconds']:.1f} s"
    )
    print_index_lines(summary)
