"""`imgindex status`: a build's progress file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from imgindex.cli.group import cli
from imgindex.feedback import shown


@cli.command()
@click.argument("progress_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the file's JSON as is.")
def status(progress_file, as_json):
    """Show the state of a build that writes PROGRESS_FILE (--progress-file)."""
    from imgindex.pipeline.progress import format_progress, read_progress

    data = read_progress(progress_file)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for line in format_progress(data):
        click.echo(shown(line))
