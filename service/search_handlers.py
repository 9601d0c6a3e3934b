"""``POST /api/indexes/<name>/search``: an uploaded image, or an indexed one."""

from __future__ import annotations

import io
import time
from typing import Any
from urllib.parse import quote

import tornado.web
from tornado.httputil import HTTPInputError, parse_body_arguments

from imgindex.pipeline.errors import DecodeError
from imgindex.service.errors import ApiError
from imgindex.service.handlers import (
    ApiHandler,
    count_argument,
    flag_argument,
    image_id_argument,
)

MULTIPART_SLACK = 64 * 1024  # bytes of form fields and boundaries around an upload


@tornado.web.stream_request_body
class Search(ApiHandler):
    """``POST /api/indexes/<name>/search``: an uploaded image, or a stored one's id."""

    route = "search"

    def prepare(self) -> None:
        self.guard()
        self.started = time.perf_counter()
        self.limit = self.service.settings.max_upload
        self.body = bytearray()
        self.too_large = False
        if self.request.method == "POST":
            # Past twice the limit the connection is closed; up to it the body
            # is read and dropped, so the client reads a 413 rather than a reset.
            self.request.connection.set_max_body_size(2 * self.limit + MULTIPART_SLACK)

    def data_received(self, chunk: bytes) -> None:
        if len(self.body) + len(chunk) > self.limit + MULTIPART_SLACK:
            self.too_large = True
            self.body = bytearray()
        if not self.too_large:
            self.body += chunk

    async def post(self, name: str) -> None:
        service = self.service
        try:
            service.catalog.path(name)
        except ApiError as e:
            # Not labelled by the name asked for: any string would be a series.
            service.metrics.queries.labels("-", str(e.status)).inc()
            raise
        try:
            if self.too_large:
                raise self._over_limit()
            query = self._query()
            opened = await self.in_thread(service.catalog.open, name)
            hits = await service.search(opened, query)
        except ApiError as e:
            service.metrics.queries.labels(name, str(e.status)).inc()
            raise
        seconds = time.perf_counter() - self.started
        service.metrics.queries.labels(name, "ok").inc()
        service.metrics.query_seconds.labels(name).observe(seconds)
        self.send_json(
            {
                "index": name,
                "k": query.k,
                "query": query.describe(),
                "seconds": round(seconds, 4),
                "hits": [_hit_json(name, opened, h) for h in hits],
            }
        )

    def _over_limit(self) -> ApiError:
        return ApiError(
            413,
            f"the upload is over the limit of {self.limit:,} bytes "
            "(imgindex serve --max-upload)",
        )

    def _query(self) -> Query:
        ctype = self.request.headers.get("Content-Type", "")
        max_k = self.service.settings.max_k
        if ctype.startswith("multipart/form-data"):
            args: dict[str, list[bytes]] = {}
            files: dict[str, list[Any]] = {}
            try:
                parse_body_arguments(ctype, bytes(self.body), args, files)
            except HTTPInputError as e:
                raise ApiError(400, f"the form cannot be read: {e}") from None
            uploads = files.get("image") or []
            if not uploads:
                raise ApiError(400, "the form has no file field named 'image'")
            data = uploads[0].body
            if len(data) > self.limit:
                raise self._over_limit()
            fields = self._with_url_arguments(
                {k: v[0].decode("utf-8", "replace") for k, v in args.items()}
            )
            return Query(
                k=count_argument(fields.get("k"), "k", max_k),
                turns=flag_argument(fields.get("turns"), "turns"),
                copies=bool(flag_argument(fields.get("copies"), "copies")),
                upload=data,
                filename=uploads[0].filename or "uploaded image",
            )
        if ctype.startswith("application/json"):
            body = self._with_url_arguments(self.json_body(bytes(self.body)))
            k = count_argument(body.get("k"), "k", max_k)
            turns = flag_argument(body.get("turns"), "turns")
            copies = bool(flag_argument(body.get("copies"), "copies"))
            if "id" in body:
                image_id = image_id_argument(body["id"])
                return Query(k=k, turns=turns, copies=copies, image_id=image_id)
            if "path" in body:
                relpath = _relpath(body["path"])
                return Query(k=k, turns=turns, copies=copies, relpath=relpath)
            raise ApiError(400, "give 'id' or 'path' of an indexed image")
        raise ApiError(
            415,
            "send the query image as multipart/form-data (field 'image'), or JSON "
            "with the 'id' or 'path' of an indexed image",
        )

    def _with_url_arguments(self, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` and the URL's ``k``, ``turns`` and ``copies`` (``POST
        .../search?k=5`` is common in HTTP clients: not to be ignored); one
        given both ways with two values is a 400."""
        fields = dict(fields)
        for name in URL_ARGUMENTS:
            given = self.get_query_arguments(name)
            if not given:
                continue
            value = given[-1]
            if name in fields and str(fields[name]).lower() != value.lower():
                raise ApiError(
                    400,
                    f"{name} is given twice, {value!r} in the URL and "
                    f"{fields[name]!r} in the body",
                )
            fields.setdefault(name, value)
        return fields


# What a search takes in its URL as well as in its body.
URL_ARGUMENTS = ("k", "turns", "copies")


class Query:
    """One search request, validated."""

    def __init__(
        self,
        k: int,
        turns: bool | None,
        upload: bytes | None = None,
        filename: str = "",
        image_id: int | None = None,
        relpath: str | None = None,
        copies: bool = False,
    ):
        self.k = k
        self.turns = turns
        self.copies = copies  # tell each hit's kind against the query
        self.upload = upload
        self.filename = filename
        self.image_id = image_id
        self.relpath = relpath

    def describe(self) -> dict[str, Any]:
        if self.upload is not None:
            return {"upload": self.filename, "bytes": len(self.upload)}
        if self.image_id is not None:
            return {"id": str(self.image_id)}
        return {"path": self.relpath}

    def decode(self, embedder) -> Any:
        """The upload's model input; DecodeError becomes a 400 naming it."""
        try:
            stream = io.BytesIO(self.upload or b"")
            stream.name = self.filename  # errors name the file the user sent
            return embedder.decode(stream)
        except DecodeError as e:
            raise ApiError(
                400, f"{self.filename!r} is not a usable image: {e.reason}"
            ) from None


def _relpath(value: Any) -> str:
    """An image's path as the manifest lists it (looked up there, never
    opened as given: :meth:`service.catalog.OpenIndex.id_of`)."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ApiError(400, f"path {value!r} is not a path")
    return value


def _hit_json(name: str, opened, hit) -> dict[str, Any]:
    base = f"/api/indexes/{quote(name, safe='')}/images/{hit.id}"
    return hit.to_json() | {
        "id": str(hit.id),
        "relpath": opened.searcher.paths.get(hit.id),
        "image": base,
        "thumbnail": f"{base}/thumbnail",
    }
