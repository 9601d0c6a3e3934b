"""`imgindex duplicates`: group an index's near-duplicate images."""

from __future__ import annotations

import json
from pathlib import Path

import click

from imgindex.cli.group import cli, sigterm_as_interrupt
from imgindex.cli.options import (
    client_seeing,
    connect_cluster,
    scheduler_options,
    span,
)
from imgindex.feedback import ProgressBars, shown


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@scheduler_options
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Cosine two neighbours must reach to be compared [imgindex.duplicates."
    "threshold: 0.5].",
)
@click.option(
    "--criterion",
    type=click.Choice(["copy", "cosine"]),
    default=None,
    help="copy: a geometric check on the workers confirms each pair (copies, not "
    "other photos of the same scene); cosine: the threshold alone [copy].",
)
@click.option(
    "--neighbours",
    type=click.IntRange(min=1),
    default=None,
    help="Nearest neighbours searched for each image [16].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@click.option(
    "--html",
    "html_page",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report as a page that opens offline, with a folder of "
    "thumbnails beside it (PAGE_thumbs).",
)
@click.option(
    "--save",
    is_flag=True,
    help="Keep the JSON report in INDEX_DIR (duplicates.json), where `imgindex "
    "serve` shows it; the next build of the index drops it.",
)
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Groups listed (--json lists all).",
)
@sigterm_as_interrupt
def duplicates(
    index_dir,
    scheduler,
    scheduler_file,
    no_fallback,
    threshold,
    criterion,
    neighbours,
    as_json,
    html_page,
    save,
    show,
):
    """Group INDEX_DIR's near-duplicate images, from its shards; embed nothing.

    Each group lists its images, the keeper first (largest resolution, then
    oldest file, then shortest path, of those that are no edit of the
    others), and the pairs that joined them; a copy that differs from the
    keeper in a region (an edit, or the keeper is one) is kept too. Byte
    copies are always grouped. The report also lists outliers, blurry, dark,
    bright and tiny images, and files not indexed; --html writes it as a page.
    The neighbour searches and checks run on the cluster's workers when they
    see INDEX_DIR, else here.
    """
    from imgindex.pipeline.duplicates import DuplicateSettings, find_duplicates
    from imgindex.pipeline.errors import ConfigError
    from imgindex.pipeline.statistics import StatisticsSettings
    from imgindex.pipeline.store import read_meta

    try:
        settings = DuplicateSettings.from_config(threshold, criterion, neighbours)
        statistics = StatisticsSettings.from_config()
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    meta = read_meta(index_dir)  # one line if it is not an index
    where = Path(index_dir).resolve()
    if html_page is not None:
        from imgindex.pipeline.report_html import check_report_paths, write_html_report

        check_report_paths(html_page)  # before the work, not after
    with connect_cluster(scheduler, scheduler_file, no_fallback) as conn:
        client = client_seeing(conn, where, "searched here")
        bar = ProgressBars(meta.name)
        try:
            with span("imgindex duplicates", meta.name):
                report = find_duplicates(
                    where, settings, client, bar.index_step, statistics=statistics
                )
                if html_page is not None:
                    html = write_html_report(
                        report, html_page, client, on_step=bar.index_step
                    )
        finally:
            bar.close()
    saved = None
    if save:
        from imgindex.pipeline.saved_report import save_report

        saved = save_report(where, report.to_json(), meta.updated)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_duplicates(report, show)
    if saved is not None:
        click.echo(f"saved: {shown(str(saved))}", err=as_json)
    if html_page is not None:
        click.echo(
            f"report: {shown(str(html.page))} ({html.groups:,} groups, "
            f"{html.images:,} thumbnails in {shown(html.thumbnails.name)}/)",
            err=as_json,
        )


def _print_duplicates(report, show: int) -> None:
    from imgindex.pipeline.duplicates import BEST_SHOT_RULE, KEEPER_RULE

    click.echo(
        f"{shown(report.index)}: {report.images_in_groups:,} of {report.count:,} "
        f"images in {len(report.groups):,} groups; {report.removable:,} could be "
        f"removed ({report.seconds:.1f} s)"
    )
    if report.without_traits:
        click.echo(
            f"{report.without_traits:,} images were indexed before imgindex kept "
            "perceptual hashes: turned copies of them are found only among their "
            "neighbours; `imgindex build --rebuild` measures them",
        )
    if report.undecided:
        click.echo(
            f"{report.undecided:,} candidate pairs could not be checked (an image "
            "unreadable now, or too plain to match): kept only when their "
            "embeddings are nearly identical"
        )

    if report.groups and show:
        click.echo(f"keeper (*): {KEEPER_RULE}")
    _print_groups("group", report.groups, show)
    if report.shots:
        click.echo(
            f"{len(report.shots):,} groups of other shots of one scene (not "
            "copies: nothing to remove; pick by hand)"
        )
        if show:
            click.echo(f"best (+): {BEST_SHOT_RULE}")
        _print_groups("shots", report.shots, show, mark="+", many="shot groups")
    _print_collection_notes(report, show)


def _print_groups(
    label: str, groups, show: int, mark: str = "*", many: str = "groups"
) -> None:
    """Groups, each member (the first marked) and the pairs that joined them."""
    for n, group in enumerate(groups[:show], start=1):
        click.echo(f"{label} {n}: {len(group.members)} images")
        for i, m in enumerate(group.members):
            size = f"{m.width}x{m.height}" if m.width else "size unknown"
            note = group.note(m.path, shown)
            note = f"  {note}" if note else ""
            click.echo(f"  {mark if i == 0 else ' '} {shown(m.path)}  ({size}){note}")
        for p in group.pairs:
            cos = "     " if p.cosine is None else f"{p.cosine:.3f}"
            bits = " " * 7 if p.hash_distance is None else f"{p.hash_distance:2d} bits"
            corr = " " * 7 if p.correlation is None else f"r {p.correlation:.3f}"
            shift = " " * 8 if p.shift is None else f"{p.shift:.2f} px"
            moved = " " * 9 if p.moved is None else f"{p.moved:2d} moved"
            drifted = " " * 11 if p.drifted is None else f"{p.drifted:3d} drifted"
            exif = {None: "", True: " (EXIF: one exposure)", False: " (EXIF: two)"}
            differs = f" ({p.differs:.0%} differs)" if p.differs else ""
            click.echo(
                f"    {cos} {bits} {corr} {shift} {moved} {drifted} {p.kind:9} "
                f"{shown(p.a)} ~ {shown(p.b)}{exif[p.same_exposure]}{differs}"
            )
    if show and len(groups) > show:
        click.echo(f"... and {len(groups) - show:,} more {many} (--json lists all)")


def _print_collection_notes(report, show: int) -> None:
    """The outliers, flagged images and files not indexed of a duplicates
    report (broken, and the build's other failures: a row listed twice)."""
    meanings = report.statistics.describe()
    counts = ", ".join(
        f"{len(report.flagged.get(name, [])):,} {name}" for name in meanings
    )
    click.echo(f"images: {counts}; {len(report.broken):,} not indexed")
    for name, meaning in meanings.items():
        paths = report.flagged.get(name, [])
        if paths and show:
            listed = ", ".join(shown(p) for p in paths[: min(show, 5)])
            hidden = len(paths) - min(show, 5)
            more = f" and {hidden:,} more" if hidden > 0 else ""
            click.echo(f"  {name} ({meaning}): {listed}{more}")
    for failure in report.broken[: min(show, 5)]:
        click.echo(f"  not indexed: {shown(failure.path)}: {shown(failure.reason)}")
    if report.outliers and show:
        click.echo(
            f"outliers (the {report.statistics.outliers:.0%} of images farthest "
            "from their nearest neighbour; cosine to it):"
        )
        for outlier in report.outliers[: min(show, 5)]:
            click.echo(f"  {outlier.nearest:.3f} {shown(outlier.path)}")
