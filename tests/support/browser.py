"""Headless Chromium for the tests, through Playwright, and a page server for the app's origin.

Playwright can't download browsers here: it drives the system's Chromium
(Debian's ``chromium`` package), with a fresh profile per test.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Tabs in the background keep their timers: the tests watch several at once.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]


def chromium_binary() -> str | None:
    for candidate in ("/usr/lib/chromium/chromium", "/usr/bin/chromium"):
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium")


def missing_browser() -> str | None:
    """Why browser tests can't run here, or ``None`` when they can."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if chromium_binary() is None:
        return "chromium is not installed (apt-get install chromium; .ci/run installs it)"
    return None


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A browser context (one profile: its tabs share connections) that accepts test certs."""
    from playwright.async_api import async_playwright

    with tempfile.TemporaryDirectory(prefix="sisyphus-chromium-") as profile:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=chromium_binary(),
                headless=True,
                args=CHROMIUM_ARGS,
                ignore_https_errors=True,
            )
            try:
                yield context
            finally:
                await context.close()


class PageServer:
    """The main application's origin: serves one HTML page on a free loopback port."""

    def __init__(self, html: str) -> None:
        body = html.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
