"""A Sisyphus service on its own event loop in a thread, for tests that use blocking sockets.

Hypothesis drives plain functions, so the fuzz tests talk to the service over
blocking sockets while it runs here, on real sockets, untouched.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from sisyphus.config import Settings
from sisyphus.server.app import Service


class ServiceThread:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.service: Service | None = None

    def start(self) -> Service:
        self._thread.start()
        self.service = self.call(self._start())
        return self.service

    async def _start(self) -> Service:
        service = Service(self._settings)
        await service.start()
        return service

    def call(self, coroutine: Any) -> Any:
        """Run ``coroutine`` on the service's loop and return its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(30)

    def stop(self) -> None:
        if self.service is not None:
            self.call(self.service.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
