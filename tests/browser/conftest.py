"""A real headless Chromium (the system one) and a page server for the browser client's tests.

Pages come from a tiny HTTP server on ``localhost`` (another origin than the service on
``127.0.0.1``, as an application's pages would be, and a secure context, so Web Locks
exist); they import ``/sisyphus.js`` from the service across origins. The page server
also mints user tokens for pages that refresh theirs.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sisyphus.client import mint_token
from tests.support.browser import CHROMIUM_ARGS, chromium_binary

HARNESS = """<!doctype html>
<meta charset="utf-8">
<title>sisyphus.js harness</title>
<script type="module">
const q = new URLSearchParams(location.search);
const { connect } = await import(q.get("client"));
window.events = [];
const options = {
  onMessage(data, meta) {
    events.push({ kind: "message", data, id: meta.id, channel: meta.channel });
  },
  onStatus(status, reason) { events.push({ kind: "status", status, reason: reason ?? null }); },
  onReset() { events.push({ kind: "reset" }); },
  shareTabs: q.get("share") !== "0",
};
if (q.get("token")) options.token = q.get("token");
if (q.get("refresh")) {
  options.tokenProvider = async () => {
    const response = await fetch("/token?user=" + encodeURIComponent(q.get("user")));
    return response.text();
  };
}
if (q.get("last")) options.lastEventId = q.get("last");
window.sub = connect(q.get("stream"), options);
</script>
"""


# CI sets this: there, a missing Chromium or Playwright fails the browser tests.
REQUIRE_ENV = "SISYPHUS_REQUIRE_BROWSER"
NO_CHROMIUM = "no Chromium found (apt-get install chromium)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a browser test; without a Chromium they skip, saying why."""
    path = chromium_binary()
    here = Path(__file__).parent
    for item in items:
        if here not in item.path.parents:
            continue
        item.add_marker(pytest.mark.browser)
        if path is None and not os.environ.get(REQUIRE_ENV):
            item.add_marker(pytest.mark.skip(reason=NO_CHROMIUM))


@pytest.fixture
def broker_kind() -> str:
    """Browser tests run on the embedded broker unless a test asks for Redis."""
    return "embedded"


class PageServer:
    """Serves the harness page and mints tokens (``/token?user=42``) on localhost.

    For a user in ``refused`` it hands out a token the service refuses (``invalid_token``).
    """

    def __init__(self) -> None:
        self.secret: str | None = None
        self.ttl = 3600.0
        self.tokens_minted = 0
        self.refused: set[str] = set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/harness.html":
                    self._send(HARNESS.encode(), "text/html; charset=utf-8")
                elif url.path == "/token" and owner.secret is not None:
                    user = urllib.parse.parse_qs(url.query)["user"][0]
                    owner.tokens_minted += 1
                    token = "refused" if user in owner.refused else owner.mint(user)
                    self._send(token.encode(), "text/plain")
                else:
                    self.send_error(404)

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.origin = f"http://localhost:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def mint(self, user: str, ttl: float | None = None) -> str:
        assert self.secret is not None
        return mint_token(self.secret, user, ttl=self.ttl if ttl is None else ttl)

    def harness(self, service_port: int, stream: str, **params: str) -> str:
        """The harness page's URL: it connects to ``stream`` (a path on the service)."""
        base = f"http://127.0.0.1:{service_port}"
        query = {"client": base + "/sisyphus.js", "stream": base + stream, **params}
        return f"{self.origin}/harness.html?" + urllib.parse.urlencode(query)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    server = PageServer()
    yield server
    server.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A fresh headless Chromium (temporary profile) driven by Playwright."""
    path = chromium_binary()
    if path is None:
        pytest.fail(NO_CHROMIUM)  # only reached with SISYPHUS_REQUIRE_BROWSER set
    try:
        from playwright import async_api
    except ImportError:
        if os.environ.get(REQUIRE_ENV):
            raise
        pytest.skip("Playwright is not installed (pip install -e '.[test]')")
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something true; fail with its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s; last: {result!r}")
        await asyncio.sleep(interval)
