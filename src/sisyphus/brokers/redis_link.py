"""Redis connections on hiredis: one way to open them, and the pipelined command link.

Owns: opening a connection (TCP, TLS or Unix socket) and its handshake (AUTH,
SELECT, then a PING whose answer proves the server is really there) for both
of the broker's links; matching replies to commands in order, many in flight
on one socket; the command link's own timeout (a command that times out aborts
and replaces its link, whoever was waiting for it) and its reconnect backoff,
which only a successful round trip resets. A socket whose handshake fails is
aborted, never kept.

It replaces redis-py's client on the service's path because that client's
per-command machinery was most of a Redis handshake's CPU (see
docs/performance.md); redis-py still serves the Python helper.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import hiredis

from sisyphus.brokers import backoff

log = logging.getLogger("sisyphus.redis")


class LinkError(Exception):
    """The connection failed, was lost or timed out; the command's outcome is unknown."""


class ReplyError(Exception):
    """Redis answered the command with an error."""


class RespProtocol(asyncio.Protocol):
    """Bytes -> hiredis replies; each reply resolves the oldest command still waiting.

    Commands queued in one loop iteration leave in one write. Subclasses take the
    replies that answer no command (pub/sub messages) in :meth:`on_reply`.
    """

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        # (future, when sent on the loop clock): a reply resolves the leftmost one.
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._outbox: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError:
                self.abort()
                return
            if reply is False:
                return
            try:
                self.on_reply(reply)
            except Exception:
                # What the listeners do with a reply can't stop the link that reads them.
                log.exception("handling a redis reply failed")

    def on_reply(self, reply: Any) -> None:
        """A reply: by default the answer to the oldest waiting command."""
        self.answer(reply)

    def answer(self, reply: Any) -> None:
        if not self.pending:
            return  # nobody waits (cannot happen on a healthy link)
        future, _ = self.pending.popleft()
        if future.done():
            return  # its caller gave up; the link stays in step all the same
        if isinstance(reply, hiredis.ReplyError):
            future.set_exception(ReplyError(str(reply)))
        else:
            future.set_result(reply)

    def request(self, *command: Any) -> asyncio.Future[Any]:
        """Queue a command that gets a reply; the future fails if the link is lost."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed:
            future.set_exception(LinkError("redis connection lost"))
            return future
        self.pending.append((future, loop.time()))
        self.send(command)
        return future

    def send(self, command: tuple[Any, ...]) -> None:
        """Queue a command without waiting for a reply (pub/sub (UN)SUBSCRIBE)."""
        if self.closed:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        # hiredis's stub types the argument as a 1-tuple; any tuple of strings is valid.
        self._outbox.append(hiredis.pack_command(cast(Any, command)))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox and self.transport is not None and not self.closed:
            self.transport.write(b"".join(outbox))

    def overdue(self, now: float, timeout: float) -> bool:
        """Whether the oldest command has waited longer than ``timeout``."""
        return bool(self.pending) and now - self.pending[0][1] > timeout

    def abort(self) -> None:
        """Drop the connection now; it is closed for new commands from this moment."""
        self.closed = True  # connection_lost comes a loop iteration later
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._outbox = []
        pending, self.pending = self.pending, collections.deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(LinkError(f"redis connection lost: {exc or 'closed'}"))
                future.exception()  # retrieved: its caller may have given up


P = TypeVar("P", bound=RespProtocol)


async def open_link(
    params: dict[str, Any], factory: Callable[[], P], deadline: float, *, select_db: bool
) -> P:
    """Connect, authenticate, select the database (``select_db``) and PING within ``deadline`` s.

    Returns only once the server answered the PING; raises :class:`LinkError` (or
    :class:`ReplyError` for a refused AUTH/SELECT) and leaves no socket open.
    """
    loop = asyncio.get_running_loop()
    protocol: P | None = None
    futures: list[asyncio.Future[Any]] = []
    try:
        async with asyncio.timeout(deadline):
            if "path" in params:
                _, protocol = await loop.create_unix_connection(factory, params["path"])
            else:
                tls = ssl.create_default_context() if "connection_class" in params else None
                _, protocol = await loop.create_connection(
                    factory, params.get("host", "localhost"), params.get("port", 6379), ssl=tls
                )
            password = params.get("password")
            if password is not None:
                user = params.get("username")
                auth = ("AUTH", user, password) if user else ("AUTH", password)
                futures.append(protocol.request(*auth))
            if select_db and params.get("db"):
                futures.append(protocol.request("SELECT", str(params["db"])))
            futures.append(protocol.request("PING"))
            if params.get("require_master"):
                futures.append(protocol.request("ROLE"))
            for future in futures:
                await future
            if params.get("require_master"):
                role = futures[-1].result()
                if not role or role[0] != b"master":
                    raise LinkError(f"{params.get('host')}:{params.get('port')} is not the master")
    except ReplyError as exc:
        _discard(protocol, futures)
        raise ReplyError(f"redis refused the connection's set-up: {exc}") from None
    except (OSError, TimeoutError, LinkError) as exc:
        _discard(protocol, futures)
        raise LinkError(f"can't connect to redis: {exc or type(exc).__name__}") from None
    except BaseException:
        _discard(protocol, futures)
        raise
    return protocol


def _discard(protocol: RespProtocol | None, futures: list[asyncio.Future[Any]]) -> None:
    """Abort a link whose set-up failed; its other answers are of no interest."""
    if protocol is not None:
        protocol.abort()
    for future in futures:
        if future.done() and not future.cancelled():
            future.exception()
        else:
            future.cancel()


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a reply read whatever it was: a health PING's outcome shows in the link's
    state, and the rest of a failed :meth:`CommandLink.call_all` fails with its link."""
    if not future.cancelled():
        future.exception()


def decode_members(reply: list[bytes]) -> set[str] | None:
    """A SMEMBERS reply as channel names; ``None`` for none (Redis deletes empty sets:
    an unknown user)."""
    return {member.decode("utf-8", "replace") for member in reply} if reply else None


class CommandLink:
    """``await link.call("GET", "key")``; ``await link.script(body, keys, args)``.

    Connects lazily, and again after a loss, but not before the backoff delay
    since the last failed attempt: a refusing server is not hammered.
    """

    def __init__(
        self,
        locate: Callable[[], Awaitable[dict[str, Any]]],
        timeout: float,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        rand: Callable[[], float] = random.random,
        on_open: Callable[[RespProtocol], Awaitable[None]] | None = None,
    ) -> None:
        self._locate = locate
        # Run on each new link before any command is sent on it; its failure fails the link.
        self._on_open = on_open
        self._timeout = timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rand = rand
        self._protocol: RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._shas: dict[str, str] = {}
        # Where the open link goes (host, port), to tell whether a failover moved the master.
        self.address: tuple[Any, Any] = (None, None)
        self._last_ping = 0.0

    @property
    def healthy(self) -> bool:
        """Open, and no command has waited past the timeout."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return False
        return not protocol.overdue(asyncio.get_running_loop().time(), self._timeout)

    async def _ensure(self) -> RespProtocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            wait = self._retry_at - loop.time()
            if wait > 0:
                raise LinkError(f"redis unavailable; next attempt in {wait:.1f} s")
            try:
                params = await self._locate()
                protocol = await open_link(params, RespProtocol, self._timeout, select_db=True)
                if self._on_open is not None:
                    try:
                        async with asyncio.timeout(self._timeout):
                            await self._on_open(protocol)
                    except BaseException as exc:
                        protocol.abort()
                        if isinstance(exc, (TimeoutError, ReplyError, LinkError)):
                            raise LinkError(f"redis link set-up failed: {exc}") from None
                        raise
                self._protocol = protocol
                self.address = (params.get("host"), params.get("port"))
            except (LinkError, ReplyError):
                delay = backoff.delay(
                    self._failures, self._backoff_base, self._backoff_cap, self._rand
                )
                self._failures += 1
                self._retry_at = loop.time() + delay
                raise
            self._failures = 0  # the PING came back: a real round trip
            return self._protocol

    async def call(self, *command: Any) -> Any:
        """Send one command and wait for its reply, at most the timeout.

        On a timeout the link is aborted (every command on it fails) and the next
        call connects a new one: a link that doesn't answer is not trusted again.
        """
        protocol = await self._ensure()
        future = protocol.request(*command)
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            protocol.abort()
            raise LinkError(f"redis did not answer in {self._timeout} s") from None

    async def call_all(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and wait for every reply, at most the timeout
        in all. A command Redis refused comes back as its :class:`ReplyError`, in its
        place; a lost or silent link fails the whole call, as in :meth:`call`.
        """
        protocol = await self._ensure()
        futures = [protocol.request(*command) for command in commands]
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self._timeout):
                for future in futures:
                    try:
                        replies.append(await future)
                    except ReplyError as exc:
                        replies.append(exc)
        except BaseException as exc:
            for future in futures:
                future.add_done_callback(retrieve)  # the rest fail with the link: unread
            if isinstance(exc, TimeoutError):
                protocol.abort()
                raise LinkError(f"redis did not answer in {self._timeout} s") from None
            raise
        return replies

    def ping(self, now: float, interval: float) -> None:
        """From the periodic tick: PING an idle link, so a dead one shows (no await)."""
        protocol = self._protocol
        if protocol is None or protocol.closed or protocol.pending:
            return
        if now - self._last_ping >= interval:
            self._last_ping = now
            protocol.request("PING").add_done_callback(retrieve)

    def check(self, now: float) -> None:
        """From the periodic tick: abort the link if a command waits past the timeout.

        Callers with shorter deadlines of their own give up first; this is the
        link's own timeout, so a silently dead link is replaced all the same.
        """
        protocol = self._protocol
        if protocol is not None and not protocol.closed and protocol.overdue(now, self._timeout):
            protocol.abort()

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
        if self._protocol is not None:
            self._protocol.abort()
        self._protocol = None
