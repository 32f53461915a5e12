"""A TCP proxy in front of Redis that tests can cut, freeze or black-hole, as a network would.

``freeze()`` keeps every connection open but holds what they send until ``thaw()``
(a wedged link that heals); a link's ``delay_replies()`` makes it a slow route;
``cut()`` closes them all; ``blackhole()`` keeps every existing and new connection
open but drops everything they send, for good: the black-holed connections never
forward again, even after ``restore()``, which lets only NEW connections through (a
route that came back while old flows stay dead).

Each connection is a :class:`Link`, found by the port it uses towards Redis (the
``addr`` that ``CLIENT LIST`` shows), so a test can wedge or cut one link alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


class Link:
    """One proxied connection: client <-> proxy <-> Redis."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter | None) -> None:
        self.client = client
        self.upstream = upstream
        # The port this link uses towards Redis (``addr`` in CLIENT LIST); 0 if none.
        self.upstream_port: int = upstream.get_extra_info("sockname")[1] if upstream else 0
        self.dead = upstream is None  # black-holed: never forwards again
        self.to_redis = asyncio.Event()
        self.to_client = asyncio.Event()
        self.to_redis.set()
        self.to_client.set()
        self.reply_delay = 0.0

    def delay_replies(self, seconds: float) -> None:
        """Hand what Redis sends to the client ``seconds`` late, in order (a slow route):
        commands still run at once, their answers take that long to arrive."""
        self.reply_delay = seconds

    def freeze(self, to_redis: bool = True, to_client: bool = True) -> None:
        """Hold what this link carries in the given directions until :meth:`thaw`."""
        if to_redis:
            self.to_redis.clear()
        if to_client:
            self.to_client.clear()

    def thaw(self) -> None:
        self.to_redis.set()
        self.to_client.set()

    def cut(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


def _write(sink: asyncio.StreamWriter, data: bytes) -> None:
    if not sink.is_closing():
        sink.write(data)


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self.links: list[Link] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._blackholed = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def link(self, upstream_port: int) -> Link:
        """The open link that reaches Redis from ``upstream_port``."""
        for link in self.links:
            if link.upstream_port == upstream_port:
                return link
        raise LookupError(f"no proxied link uses port {upstream_port} towards Redis")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blackholed:
            link = Link(writer, None)  # accepted, never forwarded
            self._track(link, self._pipe(link, reader, None, link.to_redis))
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.close()
            return
        link = Link(writer, up_writer)
        self._track(link, self._pipe(link, reader, up_writer, link.to_redis))
        self._track(link, self._pipe(link, up_reader, writer, link.to_client))

    def _track(self, link: Link, pipe: Coroutine[Any, Any, None]) -> None:
        if link not in self.links:
            self.links.append(link)
        task = asyncio.ensure_future(pipe)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        link: Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter | None,
        direction: asyncio.Event,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                await self._flowing.wait()
                await direction.wait()
                if link.dead or sink is None:
                    continue  # black-holed: the bytes vanish, the socket stays open
                if direction is link.to_client and link.reply_delay > 0:
                    # Timers of one delay fire in the order they were set: order is kept.
                    asyncio.get_running_loop().call_later(link.reply_delay, _write, sink, data)
                    continue
                sink.write(data)
                await sink.drain()
        # The peer closed: close the other side too (a black-holed link dies with its client).
        for writer in (link.client, link.upstream):
            if writer is not None:
                writer.close()
        with contextlib.suppress(ValueError):
            self.links.remove(link)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for link in list(self.links):
            link.cut()
        self.links.clear()

    def blackhole(self) -> None:
        """Forward nothing on any existing or new connection, and keep them all open."""
        self._blackholed = True
        for link in self.links:
            link.dead = True

    def restore(self) -> None:
        """New connections forward again; the black-holed ones stay dead until closed."""
        self._blackholed = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
