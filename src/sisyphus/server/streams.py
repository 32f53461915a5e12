"""Event streams: identify the user, subscribe, go live, refresh rights, end.

Owns the life of one ``GET /`` stream after routing: authentication, the
limits that apply to streams, the rights refresh that a message on
``user:<id>`` triggers, token expiry, and the closing statuses. The hub does
the fan-out; this module does the parts that must wait for the broker.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import resource
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

from sisyphus.brokers.base import Broker
from sisyphus.config import Settings
from sisyphus.errors import BrokerUnavailable
from sisyphus.hub.hub import Hub
from sisyphus.hub.subscriber import Held, State, Subscriber, Transport
from sisyphus.metrics import Metrics
from sisyphus.protocol import http, sse
from sisyphus.protocol.auth import Authenticator, AuthFailure
from sisyphus.protocol.cors import CorsPolicy
from sisyphus.protocol.resume import (
    EventId,
    HistoryEntry,
    InvalidEventId,
    Replay,
    last_event_id,
    plan_replay,
    start_position,
)
from sisyphus.protocol.rights import readable_channels

log = logging.getLogger("sisyphus.streams")

# Sockets kept free for the broker, the API and logs when the limit is derived.
FD_RESERVE = 64
DEV_MODE_WARNING_INTERVAL = 60.0


class StreamTransport(Transport, Protocol):
    """A subscriber's transport that can also tell whether it is closing."""

    def is_closing(self) -> bool: ...


class _Detached:
    """The transport of a collector: it only holds messages, it never writes."""

    def write(self, data: bytes) -> None:
        raise RuntimeError("a collector never writes")

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        return None

    def close(self) -> None:
        return None


def _frame(event_id: bytes, message: HistoryEntry | Held, json_flavour: bool) -> bytes:
    if json_flavour:
        return sse.encode_json_message(event_id, message.channel, message.payload)
    return sse.encode_event(event_id, message.payload)


class StreamOwner(Protocol):
    """The connection a stream runs on; it detaches ``subscriber`` when the socket closes."""

    subscriber: Subscriber | None


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - FD_RESERVE)


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
        self._refreshing: set[str] = set()
        self._refresh_again: set[str] = set()
        self._refresh_since: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # (expiry, tie-breaker, stream): the sweep ends streams whose token ran out.
        self._expiries: list[tuple[float, int, Subscriber]] = []
        self._tie = itertools.count()
        self._dev_warned_at = -DEV_MODE_WARNING_INTERVAL

    # Opening ---------------------------------------------------------------
    async def open(
        self, owner: StreamOwner, transport: StreamTransport, request: http.Request
    ) -> None:
        """Run the handshake of a ``GET /`` stream up to the `ok` status (or a closing one)."""
        settings = self._settings
        head = http.sse_head(self._cors.headers(request.headers.get("origin")))
        json_flavour = request.query_value("format") == "json"

        def refuse(status: sse.Status, reason: str) -> None:
            self._count(status)
            frame = sse.encode_status(
                self._hub.current_id(),
                status,
                self._retry_ms(status),
                json_flavour=json_flavour,
                reason=reason,
            )
            transport.write(head + frame)
            transport.close()

        try:
            claimed = last_event_id(request, settings.max_last_event_id_bytes)
        except InvalidEventId as exc:
            self._metrics.bad_requests += 1
            transport.write(http.response(HTTPStatus.BAD_REQUEST, http.error_body(str(exc))))
            transport.close()
            return
        try:
            identity = self._auth.identify(request)
        except AuthFailure as failure:
            self._metrics.auth_failures += 1
            log.info("stream refused: %s", failure.reason)
            refuse(sse.Status.FAILURE, failure.reason)
            return
        user_id = identity.user_id
        if self._auth.development_mode:
            self._warn_development_mode(user_id)
        if self._over_limits(user_id, refuse):
            return
        sub: Subscriber | None = None
        try:
            # One deadline for all of the handshake's broker steps (a timer costs more
            # than the rest of an embedded-broker handshake's waiting, which is none).
            async with asyncio.timeout(settings.broker_timeout):
                members, position = await self._broker.snapshot(user_id)
                self._hub.set_position(position.epoch, position.seq)
                if members is None:
                    log.info("stream refused: unknown user=%s", user_id)
                    refuse(sse.Status.FAILURE, "unknown_user")
                    return
                if transport.is_closing() or self._over_limits(user_id, refuse):
                    return
                readable = self._readable(user_id, members)
                if readable is None:
                    refuse(sse.Status.FAILURE, "too_many_channels")
                    return
                now = self._wall_clock()
                start, reset = start_position(
                    claimed, position.epoch, position.seq, now, settings.history_max_age
                )
                sub = Subscriber(
                    transport,
                    user_id,
                    b"",
                    settings.max_unsent_bytes,
                    self._loop.time(),
                    json_flavour=json_flavour,
                    expires_at=identity.expires_at,
                )
                owner.subscriber = sub
                self._hub.add(sub, readable)
                # Subscribed first, then history: a message is either retained and
                # replayed, or published later and held.
                await self._broker.wait_subscribed(readable)
                replay = Replay([], reset)
                if reset is None:
                    replay = await self._read_replay(readable, start)
                if replay.entries:
                    # A replayed message may also be on its way live: wait until every
                    # message published before the history read has arrived, so the
                    # held ones can be told apart. With nothing replayed, every message
                    # on these channels came after the read and is held or live.
                    await self._broker.barrier()
        except (BrokerUnavailable, TimeoutError) as exc:
            if sub is None:
                log.warning("stream user=%s: broker unavailable: %s", user_id, exc)
                refuse(sse.Status.ERROR, "broker_unavailable")
            else:
                log.warning("stream user=%s: subscribing failed: %s", user_id, exc)
                self.end(sub, sse.Status.ERROR, "broker_unavailable", head=head)
            return
        if sub.state is not State.STARTING:
            return  # ended meanwhile (client gone, rights emptied, broker lost)
        if identity.expires_at is not None:
            heapq.heappush(self._expiries, (identity.expires_at, next(self._tie), sub))
        if claimed is not None and reset is None:
            ok_id = claimed.encode()
        else:
            ok_id = EventId(position.epoch, start, int(now)).encode()
        frames = [head, sse.encode_status(ok_id, sse.Status.OK, json_flavour=json_flavour)]
        last_id = self._catch_up(sub, replay, start, ok_id, position.epoch, frames)
        self._metrics.connections_opened += 1
        sub.go_live(b"".join(frames), last_id, self._loop.time())
        log.debug("stream open user=%s channels=%d", user_id, len(readable))

    async def _read_replay(self, channels: frozenset[str], after: int) -> Replay:
        settings = self._settings
        histories = await self._broker.history(channels, after, settings.replay_max_messages + 1)
        return plan_replay(histories, settings.replay_max_messages, settings.replay_max_bytes)

    def _catch_up(
        self,
        sub: Subscriber,
        replay: Replay,
        start: int,
        last_id: bytes,
        epoch: str,
        frames: list[bytes],
        held: list[Held] | None = None,
    ) -> bytes:
        """Append the reset or replay, then the held messages not replayed; return the last id."""
        json_flavour = sub.json_flavour
        if replay.reset is not None:
            self._metrics.resets += 1
            frames.append(
                sse.encode_status(
                    last_id, sse.Status.RESET, json_flavour=json_flavour, reason=replay.reset
                )
            )
        replayed_through = start
        for entry in replay.entries:
            last_id = EventId(epoch, entry.seq, entry.time).encode()
            frames.append(_frame(last_id, entry, json_flavour))
            replayed_through = entry.seq
        self._metrics.replayed += len(replay.entries)
        for message in sub.held if held is None else held:
            if message.seq is None or message.seq > replayed_through:
                last_id = message.event_id
                frames.append(_frame(last_id, message, json_flavour))
        return last_id

    def _readable(self, user_id: str, members: set[str]) -> frozenset[str] | None:
        """The channels the user reads, or ``None`` (counted) past the channel limit."""
        readable, refused = readable_channels(user_id, members)
        if refused:
            log.warning("user=%s: ignored invalid channel names %r", user_id, refused[:10])
        if len(readable) - 1 > self._settings.max_channels_per_user:
            self._metrics.limit_channels += 1
            log.warning("user=%s reads %d channels: over the limit", user_id, len(readable) - 1)
            return None
        return readable

    def _over_limits(self, user_id: str, refuse: Callable[[sse.Status, str], None]) -> bool:
        """Refuse a stream past the process or per-user limit (a retry later may pass)."""
        if self._hub.stream_count() >= self.max_connections:
            self._metrics.limit_connections += 1
            log.warning("stream refused: %d streams open (limit)", self._hub.stream_count())
            refuse(sse.Status.ERROR, "over_capacity")
            return True
        if self._hub.count_of(user_id) >= self._settings.max_connections_per_user:
            self._metrics.limit_user_connections += 1
            log.info("stream refused: user=%s holds too many streams", user_id)
            refuse(sse.Status.ERROR, "too_many_connections")
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

    def _retry_ms(self, status: sse.Status) -> int:
        if status is sse.Status.ERROR:
            # Jitter so an outage or overload doesn't bring every client back in the same second.
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

    # Ending ----------------------------------------------------------------
    def end(
        self,
        sub: Subscriber,
        status: sse.Status,
        reason: str | None = None,
        head: bytes = http.SSE_HEAD,
    ) -> None:
        """Send ``status`` after what is pending, then close the stream."""
        was = sub.state
        if was is State.CLOSED:
            return
        self._hub.remove(sub)
        self._count(status)
        frame = sse.encode_status(
            sub.last_id,
            status,
            self._retry_ms(status),
            json_flavour=sub.json_flavour,
            reason=reason,
        )
        if was is State.STARTING:
            data = head + frame  # never went live: held messages were never promised
            sub.held = []
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

    def end_all(self, status: sse.Status, reason: str | None = None) -> int:
        subs = self._hub.subscribers()
        for sub in subs:
            self.end(sub, status, reason)
        return len(subs)

    def on_broker_lost(self) -> None:
        count = self.end_all(sse.Status.ERROR, "broker_unavailable")
        log.error("broker lost: closed %d streams with `error`", count)

    def expire(self) -> int:
        """End the streams whose token has expired; return how many."""
        now = self._wall_clock()
        expired = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, _, sub = heapq.heappop(self._expiries)
            if sub.state is not State.CLOSED:
                self.end(sub, sse.Status.FAILURE, "expired")
                expired += 1
        self._metrics.tokens_expired += expired
        return expired

    # Rights refresh ----------------------------------------------------------
    def on_user_message(self, user_id: str, position: int) -> None:
        """A message reached ``user:<id>`` at ``position``: re-read its set.

        A burst of notices causes one refresh plus at most one more, which
        replays added channels from the earliest notice of the burst.
        """
        since = self._refresh_since.get(user_id)
        self._refresh_since[user_id] = position if since is None else min(since, position)
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
                since = self._refresh_since.pop(user_id, self._hub.position)
                await self._refresh_once(user_id, since)
                if user_id not in self._refresh_again:
                    return
        finally:
            self._refreshing.discard(user_id)
            self._refresh_again.discard(user_id)
            self._refresh_since.pop(user_id, None)

    async def _refresh_once(self, user_id: str, since: int) -> None:
        try:
            async with asyncio.timeout(self._settings.broker_timeout):
                members = await self._broker.user_channels(user_id)
        except (BrokerUnavailable, TimeoutError) as exc:
            # Rights can't be checked: close rather than keep serving possibly revoked channels.
            log.warning("refresh user=%s failed: %s", user_id, exc)
            for sub in self._hub.streams_of(user_id):
                self.end(sub, sse.Status.ERROR, "broker_unavailable")
            return
        subs = self._hub.streams_of(user_id)
        if members is None:
            for sub in subs:
                self.end(sub, sse.Status.DISCONNECTED, "no_channels")
            log.info("user=%s has no channel left: %d streams disconnected", user_id, len(subs))
            return
        readable = self._readable(user_id, members)
        if readable is None:
            for sub in subs:
                self.end(sub, sse.Status.FAILURE, "too_many_channels")
            return
        added = readable.difference(*(sub.channels for sub in subs)) if subs else frozenset()
        for sub in subs:
            # Removals take effect now: nothing published on a removed channel after this.
            self._hub.update(sub, sub.channels & readable)
        if added:
            await self._add_channels(user_id, readable, added, since)
        else:
            for sub in self._hub.streams_of(user_id):
                self._hub.update(sub, readable)

    async def _add_channels(
        self, user_id: str, readable: frozenset[str], added: frozenset[str], since: int
    ) -> None:
        """Subscribe ``added`` without losing what was published since the rights notice.

        A collector listens on the new channels while their subscription is set up;
        then the retained messages since the notice and the collected ones are handed
        to the user's streams, which take over the channels in the same step.
        """
        collector = Subscriber(_Detached(), user_id, b"", 0, self._loop.time())
        self._hub.update(collector, added)
        try:
            async with asyncio.timeout(self._settings.broker_timeout):
                await self._broker.wait_subscribed(added)
                replay = await self._read_replay(added, since)
                if replay.entries:
                    await self._broker.barrier()  # as in open(): tell held from replayed
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("refresh user=%s: subscribing failed: %s", user_id, exc)
            self._hub.remove(collector)
            for sub in self._hub.streams_of(user_id):
                self.end(sub, sse.Status.ERROR, "broker_unavailable")
            return
        epoch = self._hub.epoch
        for sub in self._hub.streams_of(user_id):
            if sub.state is State.STARTING:
                self._hub.update(sub, readable)  # its own handshake replays and holds
                continue
            frames: list[bytes] = []
            sub.last_id = self._catch_up(
                sub, replay, since, sub.last_id, epoch, frames, collector.held
            )
            for frame in frames:
                self._hub.push(sub, frame)
            self._hub.update(sub, readable)
        self._hub.remove(collector)

    async def wait_idle(self) -> None:
        """Wait for running refreshes (used at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
