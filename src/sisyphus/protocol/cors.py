"""Cross-origin rules for browser clients on other sites (CORS), without I/O.

Origins are configured (none by default). A listed origin is echoed back with
``Access-Control-Allow-Credentials: true`` so cookies and Authorization work;
``*`` allows any origin to open streams but never with credentials, as the Fetch
standard requires, and never to call the API: that takes a listed origin. Once any
origin is configured, every answer (streams, API, errors, preflights, operator
endpoints) carries ``Vary: Origin``: what it holds depends on the request's
``Origin``, so a cache must not hand one origin's answer to another.
"""

from __future__ import annotations

from http import HTTPStatus

from sisyphus.protocol import http

Headers = http.Headers

ALLOWED_METHODS = "GET, POST, OPTIONS"
# What an EventSource polyfill or the API helper may send across origins.
ALLOWED_HEADERS = "authorization, cache-control, content-type, last-event-id"
PREFLIGHT_MAX_AGE = "600"

_VARY = (("Vary", "Origin"),)
_ANY = (("Access-Control-Allow-Origin", "*"), *_VARY)


class CorsPolicy:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origin.rstrip("/") for origin in origins if origin != "*")
        # What every answer carries whatever its request: ``Vary: Origin`` once CORS is on.
        self.vary: Headers = _VARY if self.enabled else ()

    @property
    def enabled(self) -> bool:
        return self._any or bool(self._origins)

    def allows(self, origin: str | None) -> bool:
        """Whether a page of ``origin`` may open streams (``*`` admits any)."""
        return origin is not None and (self._any or origin in self._origins)

    def lists(self, origin: str | None) -> bool:
        """Whether ``origin`` is named in the list: what the API asks of a web page.

        ``*`` opens streams to every site (without credentials), never the API: with it, any
        page a user visits could publish and change rights through the key-less API.
        """
        return origin is not None and origin in self._origins

    def headers(self, origin: str | None) -> Headers:
        """Headers to add to a response for a request from ``origin`` (``None``: no Origin)."""
        if origin is None or not self.enabled:
            return self.vary
        if self._any:
            return _ANY
        if origin in self._origins:
            return (
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"),
                *_VARY,
            )
        return _VARY

    def preflight(self, request: http.Request, *, api: bool = False) -> bytes:
        """The answer to an ``OPTIONS`` preflight request (``api``: for an API route)."""
        origin = request.headers.get("origin")
        if not (self.lists(origin) if api else self.allows(origin)):
            return http.response(
                HTTPStatus.FORBIDDEN,
                b'{"error": "origin not allowed"}',
                keep_alive=request.keep_alive,
                headers=_VARY,
            )
        return http.response(
            HTTPStatus.NO_CONTENT,
            content_type="text/plain",
            keep_alive=request.keep_alive,
            headers=(
                *self.headers(origin),
                ("Access-Control-Allow-Methods", ALLOWED_METHODS),
                ("Access-Control-Allow-Headers", ALLOWED_HEADERS),
                ("Access-Control-Max-Age", PREFLIGHT_MAX_AGE),
            ),
        )
