"""The page at ``/``, its files under ``/static/``, and the way in for a browser.

``/?token=TOKEN`` (the URL `imgindex serve` prints) trades the token for a
cookie and sends the browser on to ``/`` without it in the address bar;
without a token or cookie ``/`` answers a small form that asks for it.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path

import tornado.web

from imgindex.service.auth import COOKIE_DAYS
from imgindex.service.errors import ApiError
from imgindex.service.handlers import ApiHandler

STATIC_DIR = Path(__file__).with_name("static")


@functools.cache
def _page(name: str) -> bytes:
    """A page of STATIC_DIR, read once: not from disk on every request, on
    the event loop."""
    return (STATIC_DIR / name).read_bytes()


class Page(ApiHandler):
    """``GET /``: the page for a holder of the token, else the form asking for it."""

    route = "page"
    public = True  # answers the form itself

    def get(self) -> None:
        access = self.service.access
        given = self.get_query_argument("token", None)
        if given is not None and access.required:
            if not access.token_matches(given):
                self._ask_for_token("That token is wrong for this service.")
                return
            self.set_cookie(
                access.cookie_name,
                access.cookie_value,
                path="/",
                expires_days=COOKIE_DAYS,
                httponly=True,
                samesite="Strict",
            )
        if given is not None:  # out of the address bar, history and bookmarks
            self.redirect("/", status=303)
            return
        if self.authorized_by() is None:
            self._ask_for_token("")
            return
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(_page("index.html"))

    def _ask_for_token(self, problem: str) -> None:
        page = _page("login.html").decode()
        self.set_status(401)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(page.replace("{problem}", html.escape(problem)))


class Static(ApiHandler, tornado.web.StaticFileHandler):
    """``GET /static/FILE``: the page's script, style and icon (token needed)."""

    route = "static"

    @classmethod
    def get_absolute_path(cls, root: str, path: str) -> str:
        if "\0" in path:  # os.stat would raise ValueError: a 500
            raise ApiError(404, f"no such file: {path!r}")
        return super().get_absolute_path(root, path)
