"""`imgindex doctor`: check a cluster."""

from __future__ import annotations

import json

import click

from imgindex.cli.group import cli
from imgindex.cli.options import (
    connect_cluster,
    gib,
    model_options,
    options_as_click_errors,
    scheduler_options,
)


@cli.command()
@scheduler_options
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
def doctor(
    scheduler,
    scheduler_file,
    no_fallback,
    model,
    device,
    batch_size,
    decode_threads,
    decoder,
    precision,
    runtime,
    as_json,
):
    """Check the cluster: reachable, workers, versions, a timed test embedding."""
    from imgindex.building import model_spec
    from imgindex.cluster.doctor import check_cluster

    with options_as_click_errors():
        spec = model_spec(
            model, device, batch_size, decode_threads, precision, runtime, decoder
        )
    strict_by_user = bool(no_fallback)
    if (scheduler or scheduler_file) and no_fallback is None:
        no_fallback = True  # doctor reports on the cluster asked for, not a stand-in
    conn = connect_cluster(
        scheduler, scheduler_file, no_fallback, strict_by_user=strict_by_user
    )
    with conn:
        # No setup_workers: its environment check would stop at the first
        # problem, and doctor's job is to list them all.
        report = {"cluster": conn.to_json(), **check_cluster(conn.client, spec)}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        c = report["cluster"]
        click.echo(f"cluster:   {c['reason']}")
        click.echo(f"dashboard: {c['dashboard'] or '-'}")
        for w in report["workers"]:
            if w["ok"]:
                click.echo(
                    f"  ok    {w['address']}: {w['threads']} threads, "
                    f"{gib(w['memory_limit'])} memory, {w['device']}, model load "
                    f"{w['load_seconds']:.2f} s, test embedding "
                    f"{w['embed_seconds'] * 1000:.0f} ms, batch of "
                    f"{w['batch_size']} in {w['batch_seconds'] * 1000:.0f} ms "
                    f"({w['images_per_second']:.0f} images/s, {w['precision']}, "
                    f"{w['decode_threads']} decode threads, {w['decoder']} decoder)"
                )
                click.echo(f"        runtime {w['runtime']}: {w['runtime_reason']}")
                if "gpu" in w:
                    click.echo(
                        f"        GPU {w['gpu']}: {gib(w['gpu_memory_free'])} of "
                        f"{gib(w['gpu_memory_total'])} free, the batch took "
                        f"{gib(w['gpu_memory_peak'])}"
                    )
                if "cosine_vs_fp32" in w:
                    click.echo(
                        f"        {w['precision']} against fp32: cosine "
                        f"{w['cosine_vs_fp32']:.5f} at worst"
                    )
            else:
                click.echo(f"  FAIL  {w['address']}: {w.get('error', 'bad embedding')}")
        for text in report["problems"]:
            click.echo(f"  problem: {text}")
        for text in report["warnings"]:
            click.echo(f"  warning: {text}")
    if not report["ok"]:
        raise click.ClickException("cluster is not healthy (see above)")
