"""The files the service serves to browsers: ``/sisyphus.js``, its types, and ``/demo``.

Owns the answers for these routes: each file is read once from the package, with
an ``ETag`` (a ``304`` for a matching ``If-None-Match``) and the same CORS headers
as streams, so a page on an allowed origin can import the client as a module.
``/demo`` exists only in development mode (without a token secret); otherwise it
is a ``404`` like any unknown path. Must not know about streams or brokers.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

from sisyphus.protocol import http
from sisyphus.protocol.cors import CorsPolicy

CLIENT_PATH = "/sisyphus.js"
TYPES_PATH = "/sisyphus.d.ts"
DEMO_PATH = "/demo"
ROUTES = (CLIENT_PATH, TYPES_PATH, DEMO_PATH)

# path -> (file in sisyphus/static, content type, Cache-Control)
_FILES = {
    CLIENT_PATH: ("sisyphus.js", "text/javascript; charset=utf-8", "public, max-age=300"),
    TYPES_PATH: ("sisyphus.d.ts", "application/typescript; charset=utf-8", "public, max-age=300"),
    DEMO_PATH: ("demo.html", "text/html; charset=utf-8", "no-cache"),
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    cache_control: str
    etag: str


@functools.cache
def load(path: str) -> StaticFile:
    """The file served at ``path``, read from the installed package once."""
    name, content_type, cache_control = _FILES[path]
    body = (resources.files("sisyphus") / "static" / name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    return StaticFile(body, content_type, cache_control, etag)


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def answer(request: http.Request, cors: CorsPolicy, development_mode: bool) -> bytes:
    """The complete answer to a request for one of :data:`ROUTES`."""
    keep = request.keep_alive
    cors_headers = cors.headers(request.headers.get("origin"))
    if request.path == DEMO_PATH and not development_mode:
        return http.response(
            HTTPStatus.NOT_FOUND, b'{"error": "not found"}', keep_alive=keep, headers=cors.vary
        )
    if request.method not in ("GET", "HEAD"):
        return http.response(
            HTTPStatus.METHOD_NOT_ALLOWED,
            http.error_body("use GET"),
            keep_alive=keep,
            headers=(("Allow", "GET, HEAD"), *cors_headers),
        )
    file = load(request.path)
    headers = (
        ("ETag", file.etag),
        ("Cache-Control", file.cache_control),
        ("X-Content-Type-Options", "nosniff"),
        *cors_headers,
    )
    if _matches(request.headers.get("if-none-match"), file.etag):
        # No Content-Length: a 304's would have to be the 200's (RFC 9110 §8.6).
        lines = [
            "HTTP/1.1 304 Not Modified",
            "Connection: " + ("keep-alive" if keep else "close"),
            *(f"{name}: {value}" for name, value in headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return http.response(
        HTTPStatus.OK, file.body, file.content_type, keep_alive=keep, headers=headers
    )
