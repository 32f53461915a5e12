"""One pipelined Redis command connection on hiredis, for the service's own commands.

Owns: sending commands and matching replies in order (many in flight on one socket),
running scripts by SHA with a fallback to EVAL, and reconnecting lazily after a loss.
Commands issued in the same loop iteration leave in one write. It replaces redis-py's
client on the service's path because that client's per-command machinery was most of
a Redis handshake's CPU (see docs/performance.md); redis-py still serves the Python
helper, where a call's cost doesn't matter.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from typing import Any, cast

import hiredis


class LinkError(Exception):
    """The connection failed or was lost; the command's outcome is unknown."""


class ReplyError(Exception):
    """Redis answered the command with an error."""


class _LinkProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError:
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            if not self.pending:
                continue  # a reply nobody waits for any more (should not happen)
            future = self.pending.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pending, self.pending = self.pending, collections.deque()
        for future in pending:
            if not future.done():
                future.set_exception(LinkError(f"redis connection lost: {exc or 'closed'}"))


class CommandLink:
    """``await link.call("GET", "key")``; ``await link.script(body, keys, args)``."""

    def __init__(self, params: dict[str, Any], timeout: float) -> None:
        self._params = params
        self._timeout = timeout
        self._protocol: _LinkProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._outbox: list[bytes] = []
        self._shas: dict[str, str] = {}

    async def _ensure(self) -> _LinkProtocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _LinkProtocol:
        loop = asyncio.get_running_loop()
        params = self._params
        try:
            async with asyncio.timeout(self._timeout):
                if "path" in params:
                    _, protocol = await loop.create_unix_connection(_LinkProtocol, params["path"])
                else:
                    tls = ssl.create_default_context() if "connection_class" in params else None
                    _, protocol = await loop.create_connection(
                        _LinkProtocol,
                        params.get("host", "localhost"),
                        params.get("port", 6379),
                        ssl=tls,
                    )
        except (OSError, TimeoutError) as exc:
            raise LinkError(f"can't connect to redis: {exc}") from None
        setup: list[tuple[Any, ...]] = []
        if params.get("password") is not None:
            user = params.get("username")
            setup.append(
                ("AUTH", user, params["password"]) if user else ("AUTH", params["password"])
            )
        if params.get("db"):
            setup.append(("SELECT", str(params["db"])))
        futures = [self._send(protocol, command) for command in setup]
        for future in futures:
            await future  # a refused AUTH/SELECT raises ReplyError here
        return protocol

    def _send(self, protocol: _LinkProtocol, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.pending.append(future)
        if not self._outbox:
            loop.call_soon(self._flush, protocol)
        self._outbox.append(hiredis.pack_command(cast(Any, command)))
        return future

    def _flush(self, protocol: _LinkProtocol) -> None:
        outbox, self._outbox = self._outbox, []
        if protocol.transport is not None and not protocol.closed:
            protocol.transport.write(b"".join(outbox))

    async def call(self, *command: Any) -> Any:
        """Send one command and wait for its reply (bounded by the timeout)."""
        protocol = await self._ensure()
        future = self._send(protocol, command)
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            # A link that doesn't answer in time is not trusted with the next command.
            if protocol.transport is not None:
                protocol.transport.abort()
            raise

    async def script(self, body: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by its SHA1, loading it on the first NOSCRIPT."""
        sha = self._shas.get(body)
        if sha is None:
            sha = self._shas[body] = hashlib.sha1(body.encode()).hexdigest()  # noqa: S324
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.call("EVAL", body, len(keys), *keys, *args)

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
