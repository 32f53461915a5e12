"""Opening event streams: identify the user, apply the limits, subscribe, catch up, go live.

Owns the handshake of one ``GET /`` stream after routing, up to the `ok` status
(or a closing one). Every attempt gets an answer: the HTTP head and a status
with its ``retry:``, never a bare close. Ending streams is the lifecycle's job
(:mod:`sisyphus.server.lifecycle`), the rights refresh the refresher's
(:mod:`sisyphus.server.refresh`), and the fan-out the hub's.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable, Coroutine, Set
from http import HTTPStatus
from typing import Any, Protocol

from sisyphus.brokers.base import Broker, Position
from sisyphus.config import Settings
from sisyphus.errors import BrokerUnavailable
from sisyphus.hub.hub import Hub
from sisyphus.hub.states import State
from sisyphus.hub.subscriber import Held, Subscriber
from sisyphus.metrics import Metrics
from sisyphus.protocol import http, sse
from sisyphus.protocol.auth import Authenticator, AuthFailure, Identity
from sisyphus.protocol.cors import CorsPolicy
from sisyphus.protocol.names import user_channel
from sisyphus.protocol.resume import (
    NOTHING_TO_REPLAY,
    EventId,
    InvalidEventId,
    Replay,
    Seqs,
    at_or_before,
    last_event_id,
    start_position,
)
from sisyphus.server import replay
from sisyphus.server.lifecycle import Lifecycle, StreamTransport, shutdown_retry_ms
from sisyphus.server.refresh import Refresher, readable

log = logging.getLogger("sisyphus.streams")

# Sockets kept free for the broker, the API and logs when the limit is derived.
FD_RESERVE = 64
DEV_MODE_WARNING_INTERVAL = 60.0

__all__ = ["StreamOwner", "StreamTransport", "Streams", "default_max_connections"]


class StreamOwner(Protocol):
    """The connection a stream runs on; it detaches ``subscriber`` when the socket closes."""

    subscriber: Subscriber | None


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - FD_RESERVE)


class _Attempt:
    """One connect's answer so far: its head, flavour and the client's own position."""

    __slots__ = ("head", "json_flavour", "position", "started", "transport")

    def __init__(
        self,
        transport: StreamTransport,
        head: bytes,
        json_flavour: bool,
        position: bytes,
        started: float = 0.0,
    ) -> None:
        self.started = started  # time.perf_counter() when the request was complete
        self.transport = transport
        self.head = head
        self.json_flavour = json_flavour
        self.position = position


class _Opened:
    """A stream added to the hub, with where it starts and how its `ok` reads."""

    __slots__ = ("ok_id", "position", "reset", "start", "sub")

    def __init__(
        self, sub: Subscriber, ok_id: bytes, start: Seqs, reset: str | None, position: Position
    ) -> None:
        self.sub = sub
        self.ok_id = ok_id
        self.start = start  # the position the stream replays after
        self.reset = reset
        self.position = position  # the snapshot's


class Streams:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        hub: Hub,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        authenticator: Authenticator,
        cors: CorsPolicy,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._hub = hub
        self._metrics = metrics
        self._loop = loop
        self._auth = authenticator
        self._cors = cors
        self._wall_clock = wall_clock
        self.max_connections = settings.max_connections or default_max_connections()
        self.lifecycle = Lifecycle(settings, hub, metrics, wall_clock)
        self.refresher = Refresher(settings, broker, hub, metrics, self.lifecycle, loop, wall_clock)
        self._dev_warned_at = -DEV_MODE_WARNING_INTERVAL
        # Set when a stop begins: from then on every new stream, on any connection, is
        # refused with the shutdown's reconnect hint.
        self.stopping = False

    # Opening ---------------------------------------------------------------
    async def open(
        self, owner: StreamOwner, transport: StreamTransport, request: http.Request
    ) -> None:
        """Run the handshake of a ``GET /`` stream up to the `ok` status (or a closing one)."""
        rest = self.open_now(owner, transport, request)
        if rest is not None:
            await rest

    def open_now(
        self, owner: StreamOwner, transport: StreamTransport, request: http.Request
    ) -> Coroutine[Any, Any, None] | None:
        """The handshake as far as it goes without waiting: ``None`` when the stream got
        its answer (refused, or live from a snapshot the process holds), else the rest
        to await (the broker's reads)."""
        started = time.perf_counter()  # uvloop's loop clock has a resolution of 1 ms
        try:
            claimed = last_event_id(request, self._settings.max_last_event_id_bytes)
        except InvalidEventId as exc:
            self._metrics.bad_requests += 1
            cors = self._cors.headers(request.headers.get("origin"))
            body = http.error_body(str(exc))
            transport.write(http.response(HTTPStatus.BAD_REQUEST, body, headers=cors))
            transport.close()
            return None
        # A refusal repeats the client's own position: the id it sent, or, on a first
        # connect, where a stream opened now would start (it never moves a client on).
        attempt = _Attempt(
            transport,
            http.sse_head(self._cors.headers(request.headers.get("origin"))),
            request.query_value("format") == "json",
            claimed.encode() if claimed is not None else self._hub.current_id(),
            started,
        )
        if self.stopping:
            # A kept-alive connection (a proxy's upstream pool) may still bring streams
            # after the listener closed: send them on to the next process.
            self._refuse(attempt, sse.Status.ERROR, "shutting_down", shutdown_retry_ms())
            return None
        try:
            identity = self._auth.identify(request)
        except AuthFailure as failure:
            self._metrics.auth_failures += 1
            log.info(
                "stream refused: %s",
                failure.reason,
                extra={"event": "stream refused", "reason": failure.reason},
            )
            self._refuse(attempt, sse.Status.FAILURE, failure.reason)
            return None
        if self._auth.development_mode:
            self._warn_development_mode(identity.user_id)
        if self._over_limits(identity.user_id, attempt):
            return None
        try:
            if self._start_held(owner, attempt, identity, claimed):
                return None
        except Exception:
            log.exception("stream user=%s: handshake failed", identity.user_id)
            self._fail(owner, attempt, "internal_error")
            return None
        return self._start_reading(owner, attempt, identity, claimed)

    async def _start_reading(
        self,
        owner: StreamOwner,
        attempt: _Attempt,
        identity: Identity,
        claimed: EventId | None,
    ) -> None:
        try:
            await self._start(owner, attempt, identity, claimed)
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("stream user=%s: broker unavailable: %s", identity.user_id, exc)
            self._fail(owner, attempt, "broker_unavailable")
        except Exception:
            # Every attempt gets an answer, whatever went wrong in the handshake.
            log.exception("stream user=%s: handshake failed", identity.user_id)
            self._fail(owner, attempt, "internal_error")

    def _fail(self, owner: StreamOwner, attempt: _Attempt, reason: str) -> None:
        sub = owner.subscriber
        if sub is not None:
            self.lifecycle.end(sub, sse.Status.ERROR, reason)
        else:
            self._refuse(attempt, sse.Status.ERROR, reason)

    def _start_held(
        self,
        owner: StreamOwner,
        attempt: _Attempt,
        identity: Identity,
        claimed: EventId | None,
    ) -> bool:
        """The usual reconnect, with nothing to wait for: the set and position are held
        in-process and every channel was subscribed before that position. True if the
        stream got its answer; False if the broker must be read (nothing was done)."""
        held = self._broker.held_snapshot(identity.user_id)
        if held is None or not self._complete(identity.user_id, claimed, *held):
            return False
        opened = self._open(owner, attempt, identity, claimed, *held)
        if opened is not None:
            # _complete held in this same step: nothing is missed (see _nothing_missed).
            self._finish(opened, NOTHING_TO_REPLAY, attempt.started)
        return True

    async def _start(
        self,
        owner: StreamOwner,
        attempt: _Attempt,
        identity: Identity,
        claimed: EventId | None,
    ) -> Subscriber | None:
        # One deadline for all of the handshake's broker steps.
        async with asyncio.timeout(self._settings.broker_timeout):
            snapshot = await self._broker.snapshot(identity.user_id)
            opened = self._open(owner, attempt, identity, claimed, *snapshot)
            if opened is None:
                return None
            if self._nothing_missed(opened):
                missed = NOTHING_TO_REPLAY
            else:
                # Subscribed first, then history: a message is either retained and
                # replayed, or published later and held.
                channels = opened.sub.channels
                await self._broker.wait_subscribed(channels)
                # After a reset too: the stream goes on from the snapshot's position,
                # and what was published while it subscribed must not fall in between.
                missed = await replay.read_replay(
                    self._broker, self._settings, opened.position.epoch, channels, opened.start
                )
            if missed.entries:
                # A replayed message may also be on its way live: wait until every
                # message published before the history read has arrived, so the
                # held ones can be told apart. With nothing replayed, every message
                # on these channels came after the read and is held or live.
                await self._broker.barrier()
        self._finish(opened, missed, attempt.started)
        return opened.sub

    def _complete(
        self, user_id: str, claimed: EventId | None, members: Set[str] | None, position: Position
    ) -> bool:
        """Whether a snapshot held in-process serves this connect with nothing to read.

        Its position may be behind the broker's: only channels subscribed before it
        have had every message after it delivered (on another, a stream would replay
        older ones), and only a client at that very position (or a first connect)
        has nothing to replay. Anything else reads the broker's snapshot.
        """
        if claimed is not None and (
            claimed.epoch != position.epoch or claimed.seqs != position.seqs
        ):
            return False
        if members is None:
            return True  # an unknown user, as of now: refused without a read
        return at_or_before(self._hub.delivered, position.seqs) and self._broker.confirmed_before(
            [user_channel(user_id), *members], position
        )

    def _open(
        self,
        owner: StreamOwner,
        attempt: _Attempt,
        identity: Identity,
        claimed: EventId | None,
        members: Set[str] | None,
        position: Position,
    ) -> _Opened | None:
        """The stream from a snapshot, added to the hub (so held from now on), or refused."""
        settings = self._settings
        user_id = identity.user_id
        self._hub.set_position(position.epoch, position.seqs, position.epochs)
        if members is None:
            log.info(
                "stream refused: unknown user=%s",
                user_id,
                extra={"event": "stream refused", "reason": "unknown_user"},
            )
            self._refuse(attempt, sse.Status.FAILURE, "unknown_user")
            return None
        if attempt.transport.is_closing() or self._over_limits(user_id, attempt):
            return None
        channels = readable(settings, self._metrics, user_id, members)
        if channels is None:
            self._refuse(attempt, sse.Status.FAILURE, "too_many_channels")
            return None
        start, reset = start_position(claimed, position.epoch, position.seqs, position.oldest)
        if claimed is not None and reset is None:
            ok_id = attempt.position  # resuming: the client's own id
        else:
            ok_id = EventId(position.epoch, start, int(self._wall_clock())).encode()
        expires_at = identity.expires_at
        if expires_at is not None:
            expires_at += settings.leeway  # the same leeway as at connect
        sub = Subscriber(
            attempt.transport,
            user_id,
            attempt.position,
            settings.max_unsent_bytes,
            self._loop.time(),
            json_flavour=attempt.json_flavour,
            expires_at=expires_at,
            head=attempt.head,
        )
        owner.subscriber = sub
        self._hub.add(sub, channels)
        return _Opened(sub, ok_id, start, reset, position)

    def _nothing_missed(self, opened: _Opened) -> bool:
        """Every channel was subscribed before the snapshot was read, and no message
        after it has arrived yet: all of them are still to come and will be held, so a
        history read would find nothing to add."""
        return (
            opened.start == opened.position.seqs
            and at_or_before(self._hub.delivered, opened.start)
            and self._broker.confirmed_before(opened.sub.channels, opened.position)
        )

    def _finish(self, opened: _Opened, missed: Replay, started: float) -> None:
        """Go live with the replay (or reset) and whatever was held meanwhile."""
        sub, ok_id, start, reset = opened.sub, opened.ok_id, opened.start, opened.reset
        snapshot_seq = opened.position.seqs
        if not sub.held and not missed.entries and missed.reset is None and reset is None:
            self._go_live(sub, ok_id, [], [], start, snapshot_seq, False, started)
            return
        frames = []
        reset = reset or missed.reset
        if reset is not None:
            self._metrics.resets += 1
            frames.append(
                sse.encode_status(
                    ok_id, sse.Status.RESET, json_flavour=sub.json_flavour, reason=reset
                )
            )
        self._metrics.replayed += len(missed.entries)
        messages = replay.merge(self._hub.epoch, missed.entries, sub.held, start)
        # An incomplete replay may have skipped a rights notice: re-read the set then.
        refresh = reset is not None
        self._go_live(sub, ok_id, frames, messages, start, snapshot_seq, refresh, started)

    def _go_live(
        self,
        sub: Subscriber,
        ok_id: bytes,
        frames: list[bytes],
        messages: list[Held],
        start: Seqs,
        snapshot_seq: Seqs,
        refresh: bool,
        started: float = 0.0,
    ) -> None:
        """Write `ok` and the catch-up; a rights notice among them starts a refresh there.

        The snapshot predates a notice that came after it: messages after that
        notice stay held until the refresh decided what the stream reads. With
        ``refresh`` (an incomplete replay), the set is re-read from the snapshot on.
        """
        if sub.state is not State.STARTING:
            return  # ended meanwhile (client gone, rights emptied, broker lost)
        if self.stopping:
            # The handshake began before the stop: no `ok` that the exit would cut.
            self.lifecycle.end(sub, sse.Status.ERROR, "shutting_down", shutdown_retry_ms())
            return
        own = user_channel(sub.user_id)
        notice: int | None = None
        for index, message in enumerate(messages):
            if message.channel == own and (
                message.seq is None or message.seq > snapshot_seq[message.group]
            ):
                notice = index
                break
        cut = len(messages) if notice is None else notice + 1
        first = [sse.encode_status(ok_id, sse.Status.OK, json_flavour=sub.json_flavour)]
        caught_up, last_id = replay.frames(messages[:cut], ok_id, sub.json_flavour)
        sub.held = []
        self._metrics.connections_opened += 1
        sub.go_live(b"".join(first + frames + caught_up), last_id, self._loop.time())
        self._hub.set_floor(sub, start)  # what arrives late from before the start is dropped
        self._metrics.handshake_duration.observe(time.perf_counter() - started)
        self.lifecycle.watch_expiry(sub)
        log.debug("stream open user=%s channels=%d", sub.user_id, len(sub.channels))
        if notice is not None or refresh:
            since = messages[notice].position if notice is not None else snapshot_seq
            self._hub.hold(sub)
            sub.held = messages[cut:]
            self.refresher.on_user_message(sub.user_id, since)

    def _refuse(
        self, attempt: _Attempt, status: sse.Status, reason: str, retry_ms: int | None = None
    ) -> None:
        self.lifecycle.refuse(
            attempt.transport,
            attempt.head,
            attempt.position,
            status,
            reason,
            attempt.json_flavour,
            retry_ms,
        )

    def _over_limits(self, user_id: str, attempt: _Attempt) -> bool:
        """Refuse a stream past the process or per-user limit (a retry later may pass)."""
        if self._hub.stream_count() >= self.max_connections:
            self._metrics.limit_connections += 1
            count = self._hub.stream_count()
            log.warning(
                "stream refused: %d streams open (limit)",
                count,
                extra={"event": "stream refused", "reason": "over_capacity", "streams": count},
            )
            self._refuse(attempt, sse.Status.ERROR, "over_capacity")
            return True
        if self._hub.count_of(user_id) >= self._settings.max_connections_per_user:
            self._metrics.limit_user_connections += 1
            log.info(
                "stream refused: user=%s holds too many streams",
                user_id,
                extra={"event": "stream refused", "reason": "too_many_connections"},
            )
            self._refuse(attempt, sse.Status.ERROR, "too_many_connections")
            return True
        return False

    def _warn_development_mode(self, user_id: str) -> None:
        now = self._loop.time()
        if now - self._dev_warned_at >= DEV_MODE_WARNING_INTERVAL:
            self._dev_warned_at = now
            log.warning(
                "DEVELOPMENT MODE: stream for user=%s opened without a token; anyone can "
                "listen as anyone (set SISYPHUS_SECRET)",
                user_id,
            )

    # Ending (the lifecycle's; kept here for the connection and the service) -----
    def detach(self, sub: Subscriber) -> None:
        self.lifecycle.detach(sub)

    def end_all(self, status: sse.Status, reason: str | None = None) -> int:
        return self.lifecycle.end_all(status, reason)

    def on_broker_lost(self) -> None:
        self.lifecycle.on_broker_lost()

    def expire(self) -> int:
        return self.lifecycle.expire()

    def on_user_message(self, user_id: str, position: Seqs) -> None:
        self.refresher.on_user_message(user_id, position)

    async def wait_idle(self) -> None:
        await self.refresher.wait_idle()
