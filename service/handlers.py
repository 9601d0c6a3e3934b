"""The HTTP handlers of the API: JSON in and out, a one-line error for every 4xx."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import tornado.web

from imgindex.pipeline.discover import image_id
from imgindex.pipeline.errors import ImgindexError
from imgindex.service.auth import SECURITY_HEADERS, cross_origin
from imgindex.service.errors import ApiError
from imgindex.service.images import IndexedImage, describe_image_file, read_image_file

if TYPE_CHECKING:
    from imgindex.service.app import Service

logger = logging.getLogger(__name__)

LISTED = 500  # paths per list in a duplicates answer (the file has them all)


class ApiHandler(tornado.web.RequestHandler):
    """JSON answers; errors as ``{"error": "..."}`` and a 4xx (5xx only for bugs)."""

    route = "api"
    public = False  # True: answered without the token (/health alone)

    @property
    def service(self) -> Service:
        return self.application.settings["service"]

    def prepare(self) -> None:
        self.guard()

    def guard(self) -> None:
        """Refuse a foreign Host, a missing or wrong token, and a page of
        another origin that tries to change something."""
        self.check_host()
        if self.public:
            return
        by = self.authorized_by()
        if by is None:
            raise ApiError(
                401,
                "this service needs its token: open the URL `imgindex serve` "
                "printed, or send 'Authorization: Bearer TOKEN'",
            )
        why = cross_origin(
            self.request.method or "GET",
            self.request.headers.get("Origin"),
            self.request.headers.get("Sec-Fetch-Site"),
            f"{self.request.protocol}://{self.request.host}",
            by,
        )
        if why is not None:
            raise ApiError(403, why)

    def authorized_by(self) -> str | None:
        """How the request carries the token (see ``Access.how_authorized``)."""
        access = self.service.access
        return access.how_authorized(
            self.request.headers.get("Authorization", ""),
            self.get_cookie(access.cookie_name) if access.required else None,
        )

    def check_host(self) -> None:
        """Refuse a Host this service was not asked to answer to.

        Bound to loopback, the service answers only to loopback names: a web
        page whose own name was made to resolve to 127.0.0.1 (DNS rebinding)
        would otherwise be "same origin" and could use the API.
        """
        allowed = self.service.allowed_hosts
        host = self.request.host_name.lower()
        if allowed is not None and host not in allowed:
            raise ApiError(403, f"this service does not answer to host {host!r}")

    def set_default_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Cache-Control", "no-store")

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message = exc.message
        elif isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        elif status_code >= 500:
            message = "internal error; the service's log says more"
        else:
            message = self._reason
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"error": message}))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, ApiError):
            if self._finished:
                return
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    def on_finish(self) -> None:
        self.service.metrics.requests.labels(self.route, str(self.get_status())).inc()

    def json_body(self, raw: bytes | None = None) -> dict[str, Any]:
        try:
            data = json.loads((self.request.body if raw is None else raw) or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the request body is JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    async def in_thread(self, fn, *args: Any) -> Any:
        """Run ``fn`` in the service's I/O pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.service.io_pool, fn, *args)


class NotFound(ApiHandler):
    route = "unknown"

    def prepare(self) -> None:
        self.guard()
        raise ApiError(404, f"no such route: {self.request.method} {self.request.path}")


class Health(ApiHandler):
    """``GET /health``: up or not, and nothing else, to anyone."""

    route = "health"
    public = True

    def get(self) -> None:
        self.send_json({"status": "ok"})


class Status(ApiHandler):
    """``GET /api/status``: what the page's header line shows."""

    route = "status"

    async def get(self) -> None:
        self.send_json(await self.in_thread(self.service.status))


class Metrics(ApiHandler):
    route = "metrics"

    def get(self) -> None:
        self.set_header("Content-Type", self.service.metrics.content_type)
        self.finish(self.service.metrics.exposition())


class OpenApi(ApiHandler):
    route = "openapi"

    def get(self) -> None:
        from imgindex.service.openapi import openapi

        self.set_header("Cache-Control", "no-cache")
        self.send_json(openapi())


class Indexes(ApiHandler):
    route = "indexes"

    async def get(self) -> None:
        catalog = self.service.catalog
        names = await self.in_thread(catalog.names)
        listed = [await self.in_thread(catalog.summary, n) for n in names]
        self.send_json({"root": str(catalog.root), "indexes": listed})


class IndexInfo(ApiHandler):
    route = "index"

    async def get(self, name: str) -> None:
        from imgindex.pipeline.describe import describe_index

        path = self.service.catalog.path(name)
        try:
            self.send_json(await self.in_thread(describe_index, path))
        except ImgindexError as e:
            raise ApiError(409, str(e)) from None


def count_argument(
    value: Any, name: str, most: int, least: int = 1, default: int = 10
) -> int:
    if value is None or value == "":
        return min(default, most)
    try:
        n = int(value)
        if isinstance(value, float | bool) or str(n) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} {value!r} is not a whole number") from None
    if not least <= n <= most:
        raise ApiError(400, f"{name} must be between {least} and {most}, not {n}")
    return n


def flag_argument(value: Any, name: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ApiError(400, f"{name} {value!r} is not true or false")


def image_id_argument(value: Any) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or len(text) > 19:
        raise ApiError(400, f"id {value!r} is not an image id (a whole number)")
    return int(text)


class ImageRoute(ApiHandler):
    """A route of one indexed image: ``/api/indexes/<name>/images/<id>...``."""

    async def indexed_file(
        self, name: str, image_id: str
    ) -> tuple[int, str, IndexedImage]:
        """The image's id, its path in the dataset, and its file (4xx if none)."""
        opened = await self.in_thread(self.service.catalog.open, name)
        number = image_id_argument(image_id)
        return number, opened.relpath(number), opened.file(number)


class Image(ImageRoute):
    """``GET /api/indexes/<name>/images/<id>``: the indexed image's file."""

    route = "image"

    async def get(self, name: str, image_id: str) -> None:
        _, _, path = await self.indexed_file(name, image_id)
        image = await self.in_thread(
            read_image_file, path, self.service.settings.max_image_pixels
        )
        how = "attachment" if self.get_query_argument("download", "") else "inline"
        self.set_header("Content-Type", image.content_type)
        self.set_header(
            "Content-Disposition",
            f"{how}; filename*=UTF-8''{quote(image.filename, safe='')}",
        )
        self.set_header("Cache-Control", "private, max-age=60")
        self.finish(image.data)


class ImageInfo(ImageRoute):
    """``GET /api/indexes/<name>/images/<id>/info``: path, size, format, date."""

    route = "image-info"

    async def get(self, name: str, image_id: str) -> None:
        number, relpath, path = await self.indexed_file(name, image_id)
        info = await self.in_thread(describe_image_file, path)
        self.send_json(
            {"id": str(number), "relpath": relpath, "path": path.location} | info
        )


class Thumbnail(ImageRoute):
    """``GET /api/indexes/<name>/images/<id>/thumbnail?side=160``: a JPEG."""

    route = "thumbnail"

    async def get(self, name: str, image_id: str) -> None:
        side = count_argument(self.get_query_argument("side", ""), "side", 512, 16, 160)
        _, _, path = await self.indexed_file(name, image_id)
        data = await self.in_thread(self.service.thumbnail, path, side)
        if data is None:
            raise ApiError(404, f"image file {path.location!r} is unreadable now")
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("Cache-Control", "private, max-age=60")
        self.finish(data)


def _with_ids(groups: list[dict]) -> list[dict]:
    """``groups`` with each member's image id, for its thumbnail."""
    return [
        group
        | {"members": [m | {"id": str(image_id(m["path"]))} for m in group["members"]]}
        for group in groups
    ]


class Duplicates(ApiHandler):
    """``GET /api/indexes/<name>/duplicates?offset=0&limit=50``: a page of
    copy groups (``page``) and the same page of groups of other shots
    (``shot_page``)."""

    route = "duplicates"

    async def get(self, name: str) -> None:
        path = self.service.catalog.path(name)
        offset = count_argument(
            self.get_query_argument("offset", ""), "offset", 10**9, 0, 0
        )
        limit = count_argument(
            self.get_query_argument("limit", ""), "limit", 500, 1, 50
        )
        try:
            report = await self.in_thread(self.service.duplicates, path)
        except ImgindexError as e:
            raise ApiError(409, str(e)) from None
        if report is None:
            raise ApiError(
                404,
                f"index {name!r} has no duplicates report; make one with "
                f"`imgindex duplicates {path} --save`",
            )
        # The report is shared between requests: copy what is changed.
        page = _with_ids(report["duplicate_groups"][offset : offset + limit])
        shots = report.get("other_shots", [])  # absent from reports saved before
        report = {
            k: v
            for k, v in report.items()
            if k not in ("duplicate_groups", "other_shots")
        }
        report["shot_groups"] = len(shots)
        report["shot_page"] = _with_ids(shots[offset : offset + limit])
        report["outliers"] = [
            o | {"id": str(image_id(o["path"]))}
            for o in report.get("outliers", [])[:LISTED]
        ]
        report["broken"] = report.get("broken", [])[:LISTED]
        report["flagged"] = {
            flag: entry
            | {
                "count": len(entry.get("images", [])),
                "images": entry.get("images", [])[:LISTED],
                "ids": [str(image_id(p)) for p in entry.get("images", [])[:LISTED]],
            }
            for flag, entry in (report.get("flagged") or {}).items()
        }
        self.send_json(report | {"offset": offset, "limit": limit, "page": page})
