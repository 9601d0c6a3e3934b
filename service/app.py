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
import io
import logging
import os
import socket
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.web

from imgindex import __version__
from imgindex.pipeline.config import config_value
from imgindex.pipeline.errors import ConfigError, ImgindexError
from imgindex.pipeline.search import Hit
from imgindex.service.auth import Access
from imgindex.service.build_handlers import BuildList, BuildOne, Datasets, LegacyBuild
from imgindex.service.builds import Build, Builds, public_cluster
from imgindex.service.catalog import Catalog, OpenIndex
from imgindex.service.errors import ApiError
from imgindex.service.handlers import (
    Duplicates,
    Health,
    Image,
    ImageInfo,
    Indexes,
    IndexInfo,
    Metrics,
    NotFound,
    OpenApi,
    Status,
    Thumbnail,
)
from imgindex.service.images import IndexedImage
from imgindex.service.metrics import Metrics as MetricsRegistry
from imgindex.service.pages import STATIC_DIR, Page, Static
from imgindex.service.search_handlers import Query, Search

logger = logging.getLogger(__name__)

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
    token: str | None = field(default=None, repr=False)  # None: --no-token
    device: str = "cpu"
    unix_socket: Path | None = None  # listen there instead of host:port
    same_image: float = 0.5  # a hit scoring below this is another image
    max_image_pixels: int = 89_478_485

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
        unix_socket = flags.get("unix_socket")
        return cls(
            index_root=Path(index_root).resolve(),
            dataset_roots=tuple(Path(r).expanduser().resolve() for r in roots or ()),
            token=flags.get("token"),
            unix_socket=Path(unix_socket).absolute() if unix_socket else None,
            same_image=float(config_value(None, "imgindex.duplicates.threshold")),
            max_image_pixels=int(config_value(None, "imgindex.max-image-pixels")),
            **values,
        )


class Service:
    """What the handlers share: the indexes, the builds, the metrics, the pools."""

    def __init__(self, settings: ServiceSettings, connect: Callable[[bool], Any]):
        self.settings = settings
        self.access = Access(settings.token)
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
        # Hits checked against their query one search at a time, each over the
        # cores (Searcher.told): thumbnails and reads keep the io pool.
        self.check_pool = ThreadPoolExecutor(1, thread_name_prefix="imgindex-copies")
        # A Unix socket is reached through a tunnel to a loopback port.
        self.allowed_hosts = _loopback_names(
            "localhost" if settings.unix_socket else settings.host
        )
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
        hits, query_bytes = None, query.upload
        if query.image_id is not None:
            vector = await loop.run_in_executor(
                self.io_pool, opened.vector, query.image_id
            )
            if vector is not None:
                (hits,) = await loop.run_in_executor(
                    self.model_pool, searcher.search_vectors, vector, query.k
                )
            if hits is None or query.copies:
                image = opened.file(query.image_id)
                try:
                    query_bytes = await loop.run_in_executor(self.io_pool, image.read)
                except ApiError:
                    if hits is None:
                        raise
                    # Its vector was searched: its hits are undecided.
            if hits is None:  # no vector to search by: embed the file
                query.upload, query.filename = query_bytes, image.location
        if hits is None:
            pixels = await loop.run_in_executor(
                self.io_pool, query.decode, searcher.embedder
            )
            turns = self.settings.turns if query.turns is None else query.turns
            (hits,) = await loop.run_in_executor(
                self.model_pool, searcher.search_pixels, [pixels], query.k, turns
            )
        if query.copies:
            # Each hit's file is read and checked against the query (~0.15 s).
            told = io.BytesIO(query_bytes or b"")
            hits = await loop.run_in_executor(
                self.check_pool, searcher.told, told, hits
            )
        return hits

    def thumbnail(self, image: IndexedImage, side: int) -> bytes | None:
        """A JPEG of ``image`` fitting ``side`` pixels (None: unreadable now)."""
        from imgindex.pipeline.report_html import make_thumbnails

        try:
            mtime = image.stamp()[1]
        except ApiError:
            return None
        key = (image.location, side, mtime)
        with self._thumbnails_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        data = make_thumbnails(image.source, [image.relpath], side)[0]
        if data is not None:
            with self._thumbnails_lock:
                self._thumbnails[key] = data
                while len(self._thumbnails) > THUMBNAILS_KEPT:
                    self._thumbnails.popitem(last=False)
        return data

    def duplicates(self, index_dir: Path) -> dict[str, Any] | None:
        """The saved duplicates report of ``index_dir``, read once per version
        of the file (a million images' report takes seconds to parse)."""
        from imgindex.pipeline.saved_report import load_report
        from imgindex.pipeline.store import DUPLICATES_FILE

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

    def start_build(self, datasets: list[str], rebuild: bool, moved: bool) -> Build:
        return self.builds.start(datasets, rebuild, moved)

    def status(self) -> dict[str, Any]:
        """What the page's header shows (the token's holders only)."""
        conn = self.builds.connection
        return {
            "status": "ok",
            "version": __version__,
            "index_root": str(self.settings.index_root),
            "indexes": len(self.catalog.names()),
            "builds_running": self.builds.running(),
            "builds_allowed": bool(self.settings.dataset_roots),
            "token_required": self.access.required,
            "same_image": self.settings.same_image,
            "cluster": public_cluster(conn) if conn is not None else None,
        }

    def close(self) -> None:
        self.builds.close()
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.model_pool.shutdown(wait=False, cancel_futures=True)
        self.check_pool.shutdown(wait=False, cancel_futures=True)


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
            (r"/", Page),
            (r"/static/(.*)", Static, {"path": str(STATIC_DIR)}),
            (r"/health", Health),
            (r"/api/status", Status),
            (r"/metrics", Metrics),
            (r"/api/openapi.json", OpenApi),
            (r"/api/indexes", Indexes),
            (rf"/api/indexes/{name}", IndexInfo),
            (rf"/api/indexes/{name}/search", Search),
            (rf"/api/indexes/{name}/images/{image}", Image),
            (rf"/api/indexes/{name}/images/{image}/thumbnail", Thumbnail),
            (rf"/api/indexes/{name}/images/{image}/info", ImageInfo),
            (rf"/api/indexes/{name}/duplicates", Duplicates),
            (r"/api/datasets", Datasets),
            (r"/api/builds", BuildList),
            (r"/api/builds/(?P<build_id>[^/]+)", BuildOne),
            (r"/api/build_index", LegacyBuild),
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
    """Listen on the settings' Unix socket, or host and port, until ``stop`` is set.

    ``ready(url)`` is called once the socket listens: ``http://HOST:PORT/``
    (with the real port when 0 was asked for) or ``unix:PATH``.
    """
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    settings = service.settings
    app = make_app(service)
    # The search route reads its own, larger limit (handlers.Search.prepare).
    server = HTTPServer(app, max_body_size=1 * 2**20, xheaders=False)
    if settings.unix_socket is not None:
        sockets = [bind_private_socket(settings.unix_socket)]
        url = f"unix:{settings.unix_socket}"
    else:
        try:
            sockets = bind_sockets(settings.port, settings.host)
        except OSError as e:
            raise ImgindexError(
                f"cannot listen on {settings.host}:{settings.port}: {e.strerror}; "
                "choose another --port or --host"
            ) from None
        port = sockets[0].getsockname()[1]
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        url = f"http://{host}:{port}/"
    server.add_sockets(sockets)
    ready(url)
    try:
        await stop.wait()
    finally:
        server.stop()
        await server.close_all_connections()
        if settings.unix_socket is not None:
            settings.unix_socket.unlink(missing_ok=True)


def bind_private_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` that only this user may connect to.

    A socket file left by a service of ours that is gone is replaced; any
    other file at ``path``, or a socket something still answers on, is an
    error: imgindex removes nothing it did not make.

    Raises
    ------
    ImgindexError
        Naming the path and what is in the way.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ImgindexError(f"--unix-socket {path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            raise ImgindexError(
                f"--unix-socket {path} exists and is not a socket of yours; "
                "imgindex does not replace it: choose another path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a socket nothing listens on: a service that died
        else:
            raise ImgindexError(
                f"--unix-socket {path} is in use by a running service; stop it "
                "or choose another path"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created private, not made private after: no moment where another
    # user could connect.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise ImgindexError(f"--unix-socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.setblocking(False)
    sock.listen(128)
    return sock
