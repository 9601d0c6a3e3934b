"""`imgindex serve`: the HTTP API and page over a root of indexes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from imgindex.cli.group import cli
from imgindex.cli.options import (
    check_scheduler_options,
    connect_cluster,
    scheduler_options,
)
from imgindex.feedback import shown


@cli.command()
@click.option(
    "--index-root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder whose index directories are searched, and where builds go.",
)
@click.option(
    "--dataset-root",
    "dataset_roots",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A folder whose sub-folders the API may build (repeatable); none: "
    "builds are off [imgindex.serve.dataset-roots].",
)
@scheduler_options
@click.option(
    "--host",
    default=None,
    help="Address to listen on; 0.0.0.0 opens the service to the network "
    "[imgindex.serve.host: 127.0.0.1].",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port to listen on; 0 picks a free one [imgindex.serve.port: 8000].",
)
@click.option(
    "--max-upload",
    default=None,
    metavar="BYTES",
    help="Largest query image accepted, e.g. 20MiB [imgindex.serve.max-upload].",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A file holding the token every route but /health needs (sent as "
    "'Authorization: Bearer TOKEN', or held by the page in a cookie) [env "
    "IMGINDEX_SERVE_TOKEN; neither: a random one, printed in the URL].",
)
@click.option(
    "--no-token",
    is_flag=True,
    help="Serve without a token: every user who can reach the service may "
    "read every indexed image and start builds.",
)
@click.option(
    "--unix-socket",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Listen on this Unix socket (only you may connect) instead of a port: "
    "reach it through `ssh -L PORT:SOCKET HOST`.",
)
def serve(
    index_root,
    dataset_roots,
    scheduler,
    scheduler_file,
    no_fallback,
    host,
    port,
    max_upload,
    token_file,
    no_token,
    unix_socket,
):
    """Serve the indexes under --index-root: an HTTP API and a web page.

    Searches run in this process (the model and each index loaded once);
    builds started through the API run on the cluster, obtained on the first
    one as `imgindex build` obtains it. Private by default: every route but
    /health needs the token in the URL this prints.
    """
    import asyncio
    import platform
    import signal

    from imgindex.service.app import Service, ServiceSettings
    from imgindex.service.app import serve as run_service

    check_scheduler_options(scheduler, scheduler_file)
    if unix_socket is not None and (host is not None or port is not None):
        raise click.BadParameter(
            "listen on a Unix socket or on --host/--port, not both",
            param_hint="--unix-socket",
        )
    token = _service_token(token_file, no_token)
    try:
        settings = ServiceSettings.from_config(
            index_root,
            dataset_roots=list(dataset_roots),
            host=host,
            port=port,
            max_upload=max_upload,
            token=token,
            unix_socket=unix_socket,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    created = _index_root_made(index_root, builds=bool(settings.dataset_roots))
    service = Service(
        settings,
        # connect(False): the configured scheduler or an error, never a fallback
        lambda fallback: connect_cluster(
            scheduler, scheduler_file, no_fallback or not fallback
        ),
    )

    def ready(url: str) -> None:
        where = (
            f"indexes under {shown(str(index_root))}"
            + (" (created)" if created else "")
            + "; builds of folders in: "
            f"{shown(', '.join(map(str, settings.dataset_roots)) or 'off')}"
        )
        from urllib.parse import quote

        query = f"?token={quote(token, safe='')}" if token else ""
        if url.startswith("unix:"):
            local = f"http://localhost:8000/{query}"
            click.echo(
                f"imgindex serve: {shown(url)} ({where}); from your computer: "
                f"ssh -N -L 8000:{shown(url[5:])} {platform.node()}, "
                f"then open {local}",
                err=True,
            )
        else:
            click.echo(f"imgindex serve: {url}{query} ({where})", err=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_service(service, ready, stop)

    try:
        asyncio.run(main())
    finally:
        service.close()
    click.echo("imgindex serve: stopped", err=True)


def _service_token(token_file: Path | None, no_token: bool) -> str | None:
    """The token from --token-file, the environment, or a new random one."""
    from imgindex.service.auth import make_token

    if no_token:
        if token_file is not None:
            raise click.BadParameter(
                "give a token file or --no-token, not both", param_hint="--no-token"
            )
        logging.getLogger(__name__).warning(
            "serving without a token (--no-token): every user who can reach "
            "this service may read every indexed image and start builds"
        )
        return None
    if token_file is None:
        return os.environ.get("IMGINDEX_SERVE_TOKEN", "").strip() or make_token()
    token = token_file.read_text().strip()
    if not token:
        raise click.BadParameter("the file is empty", param_hint="--token-file")
    return token


def _index_root_made(index_root: Path, builds: bool) -> bool:
    """Whether ``index_root`` had to be made: only where builds can fill it,
    and only its last folder, so that a mistyped path is an error rather
    than an empty service (and a stray folder)."""
    if index_root.is_dir():
        return False
    if not builds:
        raise click.BadParameter(
            f"{shown(str(index_root))} does not exist, and with no --dataset-root "
            "no build could make indexes there (mkdir it to serve indexes "
            "built into it later)",
            param_hint="--index-root",
        )
    if not index_root.parent.is_dir():
        raise click.BadParameter(
            f"{shown(str(index_root))}: its parent folder does not exist",
            param_hint="--index-root",
        )
    index_root.mkdir()
    return True
