"""Who may use the service: its token, the page's cookie, where requests come from.

On a shared machine 127.0.0.1 is not private: every user of the node can
connect to it. So the service is private by default, as Jupyter is: every
route but ``/health`` needs its token, sent as ``Authorization: Bearer TOKEN``
by programs, or held by the browser in a cookie that the one-time URL
``/?token=TOKEN`` sets (HttpOnly, so no script on the page can read it;
SameSite=Strict, so no other site's page sends it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Headers on every answer: nothing the service sends is run or framed as a
# page other than its own, and nothing of it is sniffed into another type.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # The one-time URL carries the token: no page of ours passes it on.
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}

COOKIE_DAYS = 30
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def make_token() -> str:
    """A new random token: 192 bits, URL-safe."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Access:
    """The service's token (None: ``--no-token``, anyone may use it)."""

    token: str | None = field(default=None, repr=False)

    @property
    def required(self) -> bool:
        return self.token is not None

    def _derive(self, purpose: bytes) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), purpose, hashlib.sha256).hexdigest()

    @property
    def cookie_name(self) -> str:
        """Distinct per token: cookies are shared by every port of a host, so
        two services on one machine must not overwrite each other's."""
        return "imgindex-" + self._derive(b"imgindex cookie name")[:12]

    @property
    def cookie_value(self) -> str:
        """What the browser holds: derived from the token, not the token."""
        return self._derive(b"imgindex cookie value")

    def token_matches(self, given: str) -> bool:
        if self.token is None:
            return True
        return hmac.compare_digest(given.strip().encode(), self.token.encode())

    def how_authorized(self, authorization: str, cookie: str | None) -> str | None:
        """ "header", "cookie", "open" (no token needed), or None: refused."""
        if self.token is None:
            return "open"
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(value):
            return "header"
        if cookie is not None and hmac.compare_digest(
            cookie.encode(), self.cookie_value.encode()
        ):
            return "cookie"
        return None


def cross_origin(
    method: str, origin: str | None, fetch_site: str | None, own: str, by: str
) -> str | None:
    """Why a state-changing request is refused as coming from another page.

    ``own`` is ``scheme://host[:port]`` as the request names the service. A
    browser sends ``Origin`` with every POST and DELETE; a request that the
    cookie authorised must come from the service's own page. A program that
    sends the token in a header is not a page, and may send no Origin.
    """
    if method in SAFE_METHODS:
        return None
    if origin == "null":  # a sandboxed frame, a data: URL, a file
        return "a request from an opaque origin may not change anything here"
    if origin is not None:
        parts = urlsplit(origin)
        if f"{parts.scheme}://{parts.netloc}".lower() != own.lower():
            return f"a request from {origin!r} may not change anything here"
        return None
    if by == "cookie" and fetch_site != "same-origin":
        return "a request that carries the page's cookie must come from its page"
    return None
