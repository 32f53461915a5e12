"""Event streams: identify the user, subscribe, go live, refresh rights, end.

Owns the life of one ``GET /`` stream after routing, and the rights refresh
that a message on ``user:<id>`` triggers. The hub does the fan-out; this
module does the parts that must wait for the broker.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Protocol

from sisyphus.brokers.base import Broker
from sisyphus.config import Settings
from sisyphus.errors import BrokerUnavailable
from sisyphus.hub.hub import Hub
from sisyphus.hub.subscriber import State, Subscriber
from sisyphus.metrics import Metrics
from sisyphus.protocol import sse
from sisyphus.protocol.http import SSE_HEAD, Request
from sisyphus.protocol.names import is_valid_user_id
from sisyphus.protocol.rights import readable_channels

log = logging.getLogger("sisyphus.streams")


class StreamTransport(Protocol):
    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...


class StreamOwner(Protocol):
    """The connection a stream runs on; it detaches ``subscriber`` when the socket closes."""

    subscriber: Subscriber | None


class Streams:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        hub: Hub,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._hub = hub
        self._metrics = metrics
        self._loop = loop
        self._refreshing: set[str] = set()
        self._refresh_again: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # Opening ---------------------------------------------------------------
    async def open(self, owner: StreamOwner, transport: StreamTransport, request: Request) -> None:
        """Run the handshake of a ``GET /`` stream up to the `ok` status (or a closing one)."""
        settings = self._settings
        user_id = request.query_value("user") or ""
        if not is_valid_user_id(user_id):
            self._refuse(transport, sse.Status.FAILURE)
            log.info("stream refused: no or invalid user id")
            return
        try:
            async with asyncio.timeout(settings.broker_timeout):
                members = await self._broker.user_channels(user_id)
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("stream user=%s: broker unavailable: %s", user_id, exc)
            self._refuse(transport, sse.Status.ERROR)
            return
        if members is None:
            log.info("stream refused: unknown user=%s", user_id)
            self._refuse(transport, sse.Status.FAILURE)
            return
        if transport.is_closing():
            return
        readable, refused = readable_channels(user_id, members)
        if refused:
            log.warning("user=%s: ignored invalid channel names %r", user_id, refused[:10])
        sub = Subscriber(
            transport, user_id, self._hub.current_id(), settings.max_unsent_bytes, self._loop.time()
        )
        ok_id = sub.last_id
        owner.subscriber = sub
        self._hub.add(sub, readable)
        try:
            async with asyncio.timeout(settings.broker_timeout):
                await self._broker.wait_subscribed(readable)
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("stream user=%s: subscribing failed: %s", user_id, exc)
            self.end(sub, sse.Status.ERROR)
            return
        if sub.state is not State.STARTING:
            return  # ended meanwhile (client gone, rights emptied, broker lost)
        self._metrics.connections_opened += 1
        sub.go_live(SSE_HEAD + sse.encode_status(ok_id, sse.Status.OK), self._loop.time())
        log.debug("stream open user=%s channels=%d", user_id, len(readable))

    def _retry_ms(self, status: sse.Status) -> int:
        if status is sse.Status.ERROR:
            # Jitter so a broker outage doesn't bring every client back in the same second.
            base = self._settings.retry_ms
            return base + random.randrange(base // 2 + 1)  # noqa: S311 - jitter, not a secret
        return self._settings.failure_retry_ms

    def _count(self, status: sse.Status) -> None:
        if status is sse.Status.FAILURE:
            self._metrics.status_failure += 1
        elif status is sse.Status.ERROR:
            self._metrics.status_error += 1
        elif status is sse.Status.DISCONNECTED:
            self._metrics.status_disconnected += 1

    def _refuse(self, transport: StreamTransport, status: sse.Status) -> None:
        """Answer a stream that never went live with one closing status."""
        self._count(status)
        frame = sse.encode_status(self._hub.current_id(), status, self._retry_ms(status))
        transport.write(SSE_HEAD + frame)
        transport.close()

    # Ending ----------------------------------------------------------------
    def end(self, sub: Subscriber, status: sse.Status) -> None:
        """Send ``status`` after what is pending, then close the stream."""
        was = sub.state
        if was is State.CLOSED:
            return
        self._hub.remove(sub)
        self._count(status)
        frame = sse.encode_status(sub.last_id, status, self._retry_ms(status))
        if was is State.STARTING:
            data = SSE_HEAD + frame  # never went live: held messages were never promised
        else:
            data = b"".join(sub.pending) + frame
            self._metrics.connections_closed += 1
        sub.pending.clear()
        sub.transport.write(data)
        sub.transport.close()

    def detach(self, sub: Subscriber) -> None:
        """The client went away."""
        if sub.state is State.LIVE:
            self._metrics.connections_closed += 1
        self._hub.remove(sub)

    def end_all(self, status: sse.Status) -> int:
        subs = self._hub.subscribers()
        for sub in subs:
            self.end(sub, status)
        return len(subs)

    def on_broker_lost(self) -> None:
        count = self.end_all(sse.Status.ERROR)
        log.error("broker lost: closed %d streams with `error`", count)

    # Rights refresh ----------------------------------------------------------
    def on_user_message(self, user_id: str) -> None:
        """A message reached ``user:<id>``: re-read its set (once, even for a burst)."""
        if user_id in self._refreshing:
            self._refresh_again.add(user_id)
            return
        self._refreshing.add(user_id)
        task = self._loop.create_task(self._refresh(user_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, user_id: str) -> None:
        try:
            while True:
                self._refresh_again.discard(user_id)
                await self._refresh_once(user_id)
                if user_id not in self._refresh_again:
                    return
        finally:
            self._refreshing.discard(user_id)
            self._refresh_again.discard(user_id)

    async def _refresh_once(self, user_id: str) -> None:
        try:
            async with asyncio.timeout(self._settings.broker_timeout):
                members = await self._broker.user_channels(user_id)
        except (BrokerUnavailable, TimeoutError) as exc:
            # Rights can't be checked: close rather than keep serving possibly revoked channels.
            log.warning("refresh user=%s failed: %s", user_id, exc)
            for sub in self._hub.streams_of(user_id):
                self.end(sub, sse.Status.ERROR)
            return
        subs = self._hub.streams_of(user_id)
        if members is None:
            for sub in subs:
                self.end(sub, sse.Status.DISCONNECTED)
            log.info("user=%s has no channel left: %d streams disconnected", user_id, len(subs))
            return
        readable, refused = readable_channels(user_id, members)
        if refused:
            log.warning("user=%s: ignored invalid channel names %r", user_id, refused[:10])
        for sub in subs:
            self._hub.update(sub, readable)

    async def wait_idle(self) -> None:
        """Wait for running refreshes (used at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
