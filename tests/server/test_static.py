"""The files the service serves to browsers: /sisyphus.js, its types and the /demo page."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from tests.conftest import ServiceFactory

SECRET = "static-tests-secret-of-enough-length-0123456789"


def get(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


async def fetch(port: int, path: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(get, port, path, **kwargs)  # type: ignore[arg-type]


async def test_client_is_served_as_a_cacheable_module(make_service: ServiceFactory) -> None:
    """GET /sisyphus.js answers the module as text/javascript with an ETag; a match gets 304."""
    service = await make_service()
    status, headers, body = await fetch(service.port, "/sisyphus.js")
    assert status == 200
    assert headers["Content-Type"].startswith("text/javascript")
    assert b"export function connect" in body
    assert "max-age" in headers["Cache-Control"]
    etag = headers["ETag"]
    status, headers, body = await fetch(
        service.port, "/sisyphus.js", headers={"If-None-Match": etag}
    )
    assert (status, body) == (304, b"")
    assert headers["ETag"] == etag
    assert "Content-Length" not in headers
    status, headers, body = await fetch(service.port, "/sisyphus.js", method="HEAD")
    assert (status, body) == (200, b"")
    status, _, body = await fetch(service.port, "/sisyphus.d.ts")
    assert status == 200
    assert b"export function connect" in body


async def test_client_follows_the_cors_policy(make_service: ServiceFactory) -> None:
    """A listed origin may import /sisyphus.js across origins; another origin gets no grant."""
    service = await make_service(cors_origins=("https://app.example",))
    _, headers, _ = await fetch(
        service.port, "/sisyphus.js", headers={"Origin": "https://app.example"}
    )
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert headers["Vary"] == "Origin"
    _, headers, _ = await fetch(
        service.port, "/sisyphus.js", headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in headers


async def test_demo_only_in_development_mode(make_service: ServiceFactory) -> None:
    """/demo is an HTML page in development mode and a 404 once a token secret is set."""
    service = await make_service()
    status, headers, body = await fetch(service.port, "/demo")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b'from "/sisyphus.js"' in body
    secured = await make_service(secret=SECRET)
    status, _, _ = await fetch(secured.port, "/demo")
    assert status == 404


def post(port: int, origin: str, host: str | None = None) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish",
        data=json.dumps({"channel": "news", "data": "hi"}).encode(),
        headers={"Content-Type": "application/json", "Origin": origin},
        method="POST",
    )
    if host is not None:
        request.add_unredirected_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


async def test_api_accepts_the_service_own_pages(make_service: ServiceFactory) -> None:
    """The demo's same-origin publish works; other pages and re-pointed domains stay refused."""
    service = await make_service()
    port = service.port
    own = f"http://127.0.0.1:{port}"
    assert await asyncio.to_thread(post, port, own) == 200
    assert await asyncio.to_thread(post, port, "http://localhost:1") == 403
    # DNS rebinding: the page's origin names its own Host, which is not a loopback name.
    rebound = f"evil.example:{port}"
    assert await asyncio.to_thread(post, port, "http://" + rebound, rebound) == 403
