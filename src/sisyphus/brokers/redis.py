"""The Redis/Valkey broker: the original contract, one pub/sub connection per process.

Owns: the single pub/sub connection (a lean asyncio protocol on hiredis's
parser, so each message goes from the socket to the hub without a coroutine),
which channels it must carry, reconnecting with backoff, and the command
connection for rights sets and publishing. Redis errors become
:class:`~sisyphus.errors.BrokerUnavailable` here and nowhere else.

Subscriptions are reference-counted by the hub: this class only hears
"first local listener" and "last local listener gone", so the hundredth
browser on ``room:5`` costs Redis nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import ssl
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio.connection import parse_url

from sisyphus.brokers import backoff
from sisyphus.brokers.base import LostHandler, MessageHandler, Position, drop_message, ignore_loss
from sisyphus.brokers.lua import (
    EPOCH_KEY,
    HISTORY_SCRIPT,
    PUBLISH_SCRIPT,
    SEQUENCE_KEY,
    SNAPSHOT_SCRIPT,
    parse_envelope,
    publish_call,
)
from sisyphus.brokers.memory import new_epoch
from sisyphus.brokers.redis_link import CommandLink, LinkError, ReplyError
from sisyphus.errors import BrokerUnavailable
from sisyphus.protocol.names import channels_key, history_key, user_channel
from sisyphus.protocol.resume import ChannelHistory, EventId, HistoryEntry

log = logging.getLogger("sisyphus.redis")

T = TypeVar("T")

# Channels per SUBSCRIBE command when resubscribing after a reconnect.
SUBSCRIBE_BATCH = 1000
# Command connections (sets, history, publish) per process, beside the one pub/sub link:
# one pipelined link carries them all.
COMMAND_CONNECTIONS = 1


def _history_entry(channel: str, entry_id: bytes, fields: list[bytes]) -> HistoryEntry:
    """An XRANGE entry as the script returns it: id ``<seq>-0``, fields ``p`` and ``t``."""
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    return HistoryEntry(
        int(entry_id.split(b"-")[0]), channel, values[b"p"], int(values.get(b"t", b"0"))
    )


class _PubSubProtocol(asyncio.Protocol):
    """Bytes from the pub/sub socket -> hiredis replies -> the broker."""

    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        on_reply = self._broker._on_reply
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                log.error("redis pub/sub protocol error; reconnecting")
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._broker._on_pubsub_lost(self)


class RedisBroker:
    name = "redis"

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        history_size: int = 1000,
        history_max_age: float = 3600.0,
        ping_interval: float = 5.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
    ) -> None:
        self._ping_interval = ping_interval
        # The health PING in flight on the pub/sub link, and when it was sent (loop clock).
        self._health_ping: tuple[asyncio.Future[None], float] | None = None
        self._last_ping = 0.0
        self._url = url
        self._history_size = history_size
        self._history_max_age = history_max_age
        self._timeout = timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._params: dict[str, Any] = dict(parse_url(url))
        # The service's own commands: one pipelined hiredis connection (see redis_link.py).
        self._commands = CommandLink(self._params, timeout)
        self._on_message: MessageHandler = drop_message
        self._on_lost: LostHandler = ignore_loss
        self._protocol: _PubSubProtocol | None = None
        self._ready = False  # authenticated pub/sub connection
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        # Channels the hub wants, and per channel the (UN)SUBSCRIBE replies still due.
        self._wanted: set[str] = set()
        self._outstanding: dict[str, int] = {}
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._auth_pending = False
        self._pongs: collections.deque[asyncio.Future[None]] = collections.deque()
        self._outbox: list[bytes] = []
        self.reconnects = 0

    def bind(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        self._on_message = on_message
        self._on_lost = on_lost

    # Lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Connect the pub/sub link; if Redis is down, keep trying in the background."""
        try:
            await self._connect()
        except BrokerUnavailable as exc:
            log.warning("redis unavailable at start (%s); retrying in the background", exc)
            self._schedule_reconnect()

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._fail_waiters()
        self._commands.close()

    @property
    def connected(self) -> bool:
        return self._ready

    @property
    def ready(self) -> bool:
        """Connected, and every channel the hub wants is confirmed subscribed."""
        return self._ready and self._confirmed == self._wanted

    def tick(self, now: float) -> None:
        """From the service's periodic tick: PING the pub/sub link; cut it if it went deaf.

        A link that stays open but delivers nothing (a wedged proxy, a failover that
        kept the TCP connection) is found here, not by waiting for a message.
        """
        if not self._ready:
            return
        if self._health_ping is not None:
            future, sent_at = self._health_ping
            if future.done():
                self._health_ping = None
            elif now - sent_at > self._timeout:
                log.error("redis pub/sub: no PONG in %.1f s; reconnecting", self._timeout)
                self._health_ping = None
                if self._protocol is not None and self._protocol.transport is not None:
                    self._protocol.transport.abort()
            return
        if now - self._last_ping >= self._ping_interval:
            self._last_ping = now
            future = asyncio.get_running_loop().create_future()
            self._pongs.append(future)
            self._write(("PING",))
            self._health_ping = (future, now)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        params = self._params
        try:
            async with asyncio.timeout(self._timeout):
                if "path" in params:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _PubSubProtocol(self), params["path"]
                    )
                else:
                    tls = ssl.create_default_context() if "connection_class" in params else None
                    _, protocol = await loop.create_connection(
                        lambda: _PubSubProtocol(self),
                        params.get("host", "localhost"),
                        params.get("port", 6379),
                        ssl=tls,
                    )
        except (OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"can't connect to redis: {exc}") from None
        self._protocol = protocol
        password = params.get("password")
        if password is not None:
            username = params.get("username")
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self._auth_pending = True
            self._write(auth)
        self._ready = True
        self._outstanding.clear()
        self._confirmed.clear()
        wanted = sorted(self._wanted)
        for start in range(0, len(wanted), SUBSCRIBE_BATCH):
            self._send_subscriptions("SUBSCRIBE", wanted[start : start + SUBSCRIBE_BATCH])
        log.info("redis pub/sub connected channels=%d", len(wanted))

    def _schedule_reconnect(self) -> None:
        if self._closing or self._reconnect_task is not None:
            return
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                await asyncio.sleep(
                    backoff.delay(attempt, self._backoff_base, self._backoff_cap, random.random)
                )
                try:
                    await self._connect()
                except BrokerUnavailable as exc:
                    attempt += 1
                    log.warning("redis reconnect attempt=%d failed: %s", attempt, exc)
                    continue
                self.reconnects += 1
                return
        finally:
            self._reconnect_task = None

    def _on_pubsub_lost(self, protocol: _PubSubProtocol) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._outbox = []
        self._health_ping = None
        was_ready, self._ready = self._ready, False
        self._confirmed.clear()
        self._outstanding.clear()
        self._fail_waiters()
        if self._closing:
            return
        log.error("redis pub/sub connection lost; reconnecting")
        if was_ready:
            self._on_lost()
        self._schedule_reconnect()

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        pongs, self._pongs = self._pongs, collections.deque()
        for future in [f for futures in waiters.values() for f in futures] + list(pongs):
            if not future.done():
                future.set_exception(BrokerUnavailable("redis pub/sub connection lost"))
                future.exception()  # retrieved: nobody may be waiting any more

    # Subscriptions ---------------------------------------------------------
    def _write(self, command: tuple[str, ...]) -> None:
        """Queue a command for the pub/sub link; all queued in one loop iteration go out in
        one write (a burst of handshakes would otherwise cost a system call each)."""
        if self._protocol is None:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush_outbox)
        # hiredis's stub types the argument as a 1-tuple; any tuple of strings is valid.
        self._outbox.append(hiredis.pack_command(cast(Any, command)))

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        protocol = self._protocol
        if outbox and protocol is not None and protocol.transport is not None:
            protocol.transport.write(b"".join(outbox))

    def _send_subscriptions(self, verb: str, channels: list[str]) -> None:
        for channel in channels:
            self._outstanding[channel] = self._outstanding.get(channel, 0) + 1
        self._write((verb, *channels))

    def subscribe(self, channels: list[str]) -> None:
        self._wanted.update(channels)
        if self._ready:
            self._send_subscriptions("SUBSCRIBE", channels)

    def unsubscribe(self, channels: list[str]) -> None:
        self._wanted.difference_update(channels)
        self._confirmed.difference_update(channels)
        if self._ready:
            self._send_subscriptions("UNSUBSCRIBE", channels)

    async def wait_subscribed(self, channels: Iterable[str]) -> None:
        if not self._ready:
            raise BrokerUnavailable("redis pub/sub is not connected")
        loop = asyncio.get_running_loop()
        futures = []
        for channel in channels:
            if channel not in self._confirmed:
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(channel, []).append(future)
                futures.append(future)
        if futures:
            await asyncio.gather(*futures)

    async def barrier(self) -> None:
        """PING on the pub/sub link: its PONG comes after every message published before."""
        if not self._ready:
            raise BrokerUnavailable("redis pub/sub is not connected")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        self._write(("PING",))
        await future

    def _on_reply(self, reply: Any) -> None:
        if type(reply) is list and reply[0] == b"message":
            # The hot path: straight from the parser to the hub.
            channel = reply[1].decode("utf-8", "replace")
            payload = reply[2]
            if payload[:1] == b"\x1e":
                envelope = parse_envelope(payload)
                if envelope is not None:
                    epoch, seq, time, body = envelope
                    self._on_message(channel, body, seq, epoch, time)
                    return
            self._on_message(channel, payload, None, None, 0)
            return
        if isinstance(reply, list) and reply and reply[0] in (b"subscribe", b"unsubscribe"):
            self._on_confirmation(reply[0], reply[1].decode("utf-8", "replace"))
        elif (isinstance(reply, list) and reply and reply[0] == b"pong") or reply == b"PONG":
            if self._pongs:
                future = self._pongs.popleft()
                if not future.done():
                    future.set_result(None)
        elif isinstance(reply, hiredis.ReplyError):
            log.error("redis pub/sub error: %s", reply)
            if self._protocol is not None and self._protocol.transport is not None:
                self._protocol.transport.abort()
        elif self._auth_pending and reply == b"OK":
            self._auth_pending = False

    def _on_confirmation(self, kind: bytes, channel: str) -> None:
        left = self._outstanding.get(channel, 0) - 1
        if left > 0:
            self._outstanding[channel] = left
            return  # a later (UN)SUBSCRIBE of this channel is still on its way
        self._outstanding.pop(channel, None)
        if kind == b"subscribe" and channel in self._wanted:
            self._confirmed.add(channel)
            for future in self._waiters.pop(channel, ()):
                if not future.done():
                    future.set_result(None)

    # Commands --------------------------------------------------------------
    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await awaitable
        except ReplyError as exc:
            raise BrokerUnavailable(f"redis refused a command: {exc}") from None
        except (LinkError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"redis command failed: {exc or type(exc).__name__}") from None

    async def user_channels(self, user_id: str) -> set[str] | None:
        members, _ = await self.snapshot(user_id)
        return members

    async def snapshot(self, user_id: str) -> tuple[set[str] | None, Position]:
        keys = [channels_key(user_id), EPOCH_KEY, SEQUENCE_KEY]
        kind, epoch, seq, members = await self._call(
            self._commands.script(SNAPSHOT_SCRIPT, keys, [new_epoch()])
        )
        position = Position(epoch.decode(), int(seq))
        if kind not in (b"set", b"none"):
            log.warning("%s is not a SET: user=%s treated as unknown", keys[0], user_id)
        # Redis deletes empty sets: a missing or empty set is an unknown user.
        if not members:
            return None, position
        return {member.decode("utf-8", "replace") for member in members}, position

    async def position(self) -> Position:
        async def read() -> tuple[Any, Any]:
            # The first reader names the history: SET NX keeps an existing epoch.
            _, epoch, seq = await asyncio.gather(
                self._commands.call("SET", EPOCH_KEY, new_epoch(), "NX"),
                self._commands.call("GET", EPOCH_KEY),
                self._commands.call("GET", SEQUENCE_KEY),
            )
            return epoch, seq

        epoch, seq = await self._call(read())
        return Position(epoch.decode(), int(seq or 0))

    async def history(
        self, channels: Iterable[str], after: int, limit: int
    ) -> list[ChannelHistory]:
        channels = list(channels)
        keys = [SEQUENCE_KEY, *(history_key(channel) for channel in channels)]
        reply = await self._call(self._commands.script(HISTORY_SCRIPT, keys, [after, limit]))
        if not reply:
            return [ChannelHistory([], trimmed=False) for _ in channels]
        result = []
        for index, channel in enumerate(channels):
            trimmed, entries = reply[2 * index], reply[2 * index + 1]
            result.append(
                ChannelHistory(
                    [_history_entry(channel, entry_id, fields) for entry_id, fields in entries],
                    trimmed=bool(trimmed),
                )
            )
        return result

    async def publish(self, channel: str, payload: bytes) -> EventId:
        return await self._sequenced(channel, payload)

    async def grant(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        return await self._sequenced(user_channel(user_id), notice, ("SADD", user_id, channels))

    async def revoke(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        return await self._sequenced(user_channel(user_id), notice, ("SREM", user_id, channels))

    async def _sequenced(
        self, channel: str, payload: bytes, rights: tuple[str, str, list[str]] | None = None
    ) -> EventId:
        keys, args = publish_call(
            channel, payload, self._history_size, self._history_max_age, new_epoch(), rights
        )
        epoch, seq, time = await self._call(self._commands.script(PUBLISH_SCRIPT, keys, args))
        return EventId(epoch.decode(), int(seq), int(time))
