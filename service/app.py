"""The service: its settings, what it holds (catalog, builds, metrics) and its routes.

Tornado, because it is already here: distributed serves its dashboard and
speaks to workers through it, so the service adds no web stack to the
environments of an HPC cluster, and it runs on the asyncio loop the Dask
client also uses. Handlers do no blocking work on the loop: files and the
cluster are used from an I/O thread pool, the model and FAISS from a model
pool whose size bounds how many forward passes share the cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.web

from pipeline import __version__
from pipeline.config import config_value
from pipeline.errors import ConfigError, ImgindexError
from pipeline.search import Hit
from service.builds import Build, Builds
from service.catalog import Catalog, OpenIndex
from service.handlers import (
    BuildList,
    BuildOne,
    Datasets,
    Duplicates,
    Health,
    Image,
    Indexes,
    IndexInfo,
    Metrics,
    NotFound,
    OpenApi,
    Query,
    Search,
    Thumbnail,
)
from service.metrics import Metrics as MetricsRegistry

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
THUMBNAILS_KEPT = 4096  # thumbnails cached in memory (~6 KiB each at 160 px)


@dataclass(frozen=True)
class ServiceSettings:
    """What ``imgindex serve`` was started with (flags over ``imgindex.serve.*``)."""

    index_root: Path
    dataset_roots: Sequence[Path] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload: int = 20 * 2**20
    max_k: int = 100
    max_builds: int = 4
    turns: bool = False
    token: str | None = field(default=None, repr=False)
    device: str = "cpu"

    @classmethod
    def from_config(cls, index_root: Path, **flags: Any) -> ServiceSettings:
        """Settings from ``flags`` (None: the ``imgindex.serve.*`` value)."""
        from dask.utils import parse_bytes

        keys = {
            "host": "imgindex.serve.host",
            "port": "imgindex.serve.port",
            "max_upload": "imgindex.serve.max-upload",
            "max_k": "imgindex.serve.max-k",
            "max_builds": "imgindex.serve.max-builds",
            "turns": "imgindex.serve.turns",
        }
        values = {
            name: config_value(flags.get(name), key) for name, key in keys.items()
        }
        for name in ("port", "max_k", "max_builds", "max_upload"):
            value = values[name]
            try:
                values[name] = int(
                    parse_bytes(str(value)) if name == "max_upload" else value
                )
                if values[name] < (0 if name == "port" else 1):
                    raise ValueError
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{keys[name]} (--{name.replace('_', '-')}) {value!r} is not "
                    + ("a size, e.g. 20MiB" if name == "max_upload" else "a count")
                ) from None
        values["turns"] = bool(values["turns"])
        roots = flags.get("dataset_roots") or config_value(
            None, "imgindex.serve.dataset-roots"
        )
        return cls(
            index_root=Path(index_root).resolve(),
            dataset_roots=tuple(Path(r).resolve() for r in roots or ()),
            token=flags.get("token"),
            **values,
        )


class Service:
    """What the handlers share: the indexes, the builds, the metrics, the pools."""

    def __init__(self, settings: ServiceSettings, connect: Callable[[], Any]):
        self.settings = settings
        self.catalog = Catalog(settings.index_root, settings.device)
        self.builds = Builds(
            settings.index_root,
            settings.dataset_roots,
            connect,
            settings.max_builds,
            on_state=lambda state: self.metrics.builds.labels(state).inc(),
        )
        self.metrics = MetricsRegistry(self.builds.running, self.catalog.n_open)
        self.io_pool = ThreadPoolExecutor(
            max(4, os.cpu_count() or 1), thread_name_prefix="imgindex-io"
        )
        # One forward pass at a time: torch spreads each over every core, and
        # two at once only slow each other down.
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="imgindex-model")
        self.allowed_hosts = _loopback_names(settings.host)
        self._thumbnails: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._thumbnails_lock = threading.Lock()
        self._reports: dict[tuple, dict[str, Any] | None] = {}
        self._reports_lock = threading.Lock()

    async def search(self, opened: OpenIndex, query: Query) -> list[Hit]:
        """Decode off the loop, then embed and search in the model pool."""
        loop = asyncio.get_running_loop()
        searcher = opened.searcher
        if query.relpath is not None:
            query.image_id = opened.id_of(query.relpath)
        if query.image_id is not None:
            vector = await loop.run_in_executor(
                self.io_pool, opened.vector, query.image_id
            )
            if vector is not None:
                return (
                    await loop.run_in_executor(
                        self.model_pool, searcher.search_vectors, vector, query.k
                    )
                )[0]
            path = opened.file(query.image_id)
            query.upload = await loop.run_in_executor(self.io_pool, path.read_bytes)
            query.filename = str(path)
        pixels = await loop.run_in_executor(
            self.io_pool, query.decode, searcher.embedder
        )
        turns = self.settings.turns if query.turns is None else query.turns
        hits = await loop.run_in_executor(
            self.model_pool, searcher.search_pixels, [pixels], query.k, turns
        )
        return hits[0]

    def thumbnail(self, path: Path, side: int) -> bytes | None:
        """A JPEG of ``path`` fitting ``side`` pixels (None: unreadable now)."""
        from pipeline.report_html import make_thumbnails

        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        key = (str(path), side, mtime)
        with self._thumbnails_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        data = make_thumbnails(str(path.parent), [path.name], side)[0]
        if data is not None:
            with self._thumbnails_lock:
                self._thumbnails[key] = data
                while len(self._thumbnails) > THUMBNAILS_KEPT:
                    self._thumbnails.popitem(last=False)
        return data

    def duplicates(self, index_dir: Path) -> dict[str, Any] | None:
        """The saved duplicates report of ``index_dir``, read once per version
        of the file (a million images' report takes seconds to parse)."""
        from pipeline.saved_report import load_report
        from pipeline.store import DUPLICATES_FILE

        try:
            st = (index_dir / DUPLICATES_FILE).stat()
        except OSError:
            return None
        key = (str(index_dir), st.st_ino, st.st_mtime_ns)
        with self._reports_lock:
            if key in self._reports:
                return self._reports[key]
        report = load_report(index_dir)
        with self._reports_lock:
            self._reports = {key: report} | {
                k: v for k, v in self._reports.items() if k[0] != key[0]
            }
        return report

    def start_build(self, datasets: list[str], rebuild: bool) -> Build:
        return self.builds.start(datasets, rebuild)

    def health(self) -> dict[str, Any]:
        conn = self.builds.connection
        return {
            "status": "ok",
            "version": __version__,
            "index_root": str(self.settings.index_root),
            "indexes": len(self.catalog.names()),
            "builds_running": self.builds.running(),
            "builds_allowed": bool(self.settings.dataset_roots),
            "token_required": self.settings.token is not None,
            "cluster": conn.to_json() if conn is not None else None,
        }

    def close(self) -> None:
        self.builds.close()
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.model_pool.shutdown(wait=False, cancel_futures=True)


LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _loopback_names(host: str) -> set[str] | None:
    """The Host names a service bound to ``host`` answers to; None: any."""
    import ipaddress

    if host == "localhost":
        return LOOPBACK
    try:
        return LOOPBACK if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def make_app(service: Service) -> tornado.web.Application:
    """The routes: the API under /api, /health, /metrics, the page at /."""
    name = r"(?P<name>[^/]+)"
    image = r"(?P<image_id>[^/]+)"
    return tornado.web.Application(
        [
            (r"/", tornado.web.RedirectHandler, {"url": "/static/index.html"}),
            (
                r"/static/(.*)",
                tornado.web.StaticFileHandler,
                {"path": str(STATIC)},
            ),
            (r"/health", Health),
            (r"/metrics", Metrics),
            (r"/api/openapi.json", OpenApi),
            (r"/api/indexes", Indexes),
            (rf"/api/indexes/{name}", IndexInfo),
            (rf"/api/indexes/{name}/search", Search),
            (rf"/api/indexes/{name}/images/{image}", Image),
            (rf"/api/indexes/{name}/images/{image}/thumbnail", Thumbnail),
            (rf"/api/indexes/{name}/duplicates", Duplicates),
            (r"/api/datasets", Datasets),
            (r"/api/builds", BuildList),
            (r"/api/builds/(?P<build_id>[^/]+)", BuildOne),
        ],
        default_handler_class=NotFound,
        service=service,
        # Tornado's own page for an uncaught error would show a traceback.
        serve_traceback=False,
        compress_response=True,
    )


async def serve(
    service: Service, ready: Callable[[str], None], stop: asyncio.Event
) -> None:
    """Listen on the settings' host and port until ``stop`` is set.

    ``ready(url)`` is called once the socket listens (with the real port when
    0 was asked for).
    """
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    settings = service.settings
    app = make_app(service)
    # The search route reads its own, larger limit (handlers.Search.prepare).
    server = HTTPServer(app, max_body_size=1 * 2**20, xheaders=False)
    try:
        sockets = bind_sockets(settings.port, settings.host)
    except OSError as e:
        raise ImgindexError(
            f"cannot listen on {settings.host}:{settings.port}: {e.strerror}; "
            "choose another --port or --host"
        ) from None
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    ready(f"http://{host}:{port}/")
    try:
        await stop.wait()
    finally:
        server.stop()
        await server.close_all_connections()
