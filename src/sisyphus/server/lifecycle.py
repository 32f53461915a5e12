"""Ending streams: from any state, for any reason, without ever raising.

Owns the closing statuses (with their ``retry:`` hints and counts), refusals of
connects that never got a subscriber, the client going away, broker loss, and
token expiry. Every path that ends a stream comes here, so a closing status
always repeats the client's own position and one broken stream never stops
the ending of the others.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections.abc import Callable
from typing import Protocol

from sisyphus.config import Settings
from sisyphus.hub.hub import Hub
from sisyphus.hub.states import State
from sisyphus.hub.subscriber import Subscriber, Transport
from sisyphus.metrics import Metrics
from sisyphus.protocol import sse

log = logging.getLogger("sisyphus.lifecycle")

# Reconnect hint of a stopping process: clients come back after 1 to 2 s and resume by id.
RECONNECT_HINT_MS = 1000

# Closed streams tolerated in the expiry heap before it is rebuilt without them.
EXPIRY_SLACK = 64


def shutdown_retry_ms() -> int:
    """The ``retry:`` of a stream ended or refused by a stop, jittered per connection."""
    return RECONNECT_HINT_MS + random.randrange(RECONNECT_HINT_MS)  # noqa: S311 - jitter


class StreamTransport(Transport, Protocol):
    """A subscriber's transport that can also tell whether it is closing."""

    def is_closing(self) -> bool: ...


class Lifecycle:
    def __init__(
        self, settings: Settings, hub: Hub, metrics: Metrics, wall_clock: Callable[[], float]
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._metrics = metrics
        self._wall_clock = wall_clock
        # (expiry, tie-breaker, stream). Closed streams are dropped lazily, and the heap
        # is rebuilt once it holds more than twice the open streams (however they
        # closed: ended, gone, or cut as slow), so memory follows open streams.
        self._expiries: list[tuple[float, int, Subscriber]] = []
        self._tie = itertools.count()

    # Statuses ----------------------------------------------------------------
    def retry_ms(self, status: sse.Status) -> int:
        if status is sse.Status.ERROR:
            # Jitter so an outage or overload doesn't bring every client back in the same second.
            base = self._settings.retry_ms
            return base + random.randrange(base // 2 + 1)  # noqa: S311 - jitter, not a secret
        return self._settings.failure_retry_ms

    def count(self, status: sse.Status) -> None:
        if status is sse.Status.FAILURE:
            self._metrics.status_failure += 1
        elif status is sse.Status.ERROR:
            self._metrics.status_error += 1
        elif status is sse.Status.DISCONNECTED:
            self._metrics.status_disconnected += 1

    def refuse(
        self,
        transport: StreamTransport,
        head: bytes,
        event_id: bytes,
        status: sse.Status,
        reason: str,
        json_flavour: bool,
        retry_ms: int | None = None,
    ) -> None:
        """Answer a connect that has no subscriber yet: head, closing status, close.

        ``retry_ms`` overrides the status's usual hint (a draining process sends its own).
        """
        self.count(status)
        try:
            retry = self.retry_ms(status) if retry_ms is None else retry_ms
            frame = sse.encode_status(
                event_id, status, retry, json_flavour=json_flavour, reason=reason
            )
            if not transport.is_closing():
                transport.write(head + frame)
            transport.close()
        except Exception:
            log.exception("refusing a stream failed")
            _abort(transport)

    # Ending ------------------------------------------------------------------
    def end(
        self,
        sub: Subscriber,
        status: sse.Status,
        reason: str | None = None,
        retry_ms: int | None = None,
    ) -> None:
        """Send ``status`` after what is pending, then close; from any state, never raises.

        ``retry_ms`` overrides the status's usual hint (a draining process sends its own).
        """
        was = sub.state
        if was is State.CLOSED:
            return
        try:
            self._hub.remove(sub)
        except Exception:
            log.exception("unsubscribing an ending stream failed user=%s", sub.user_id)
            sub.move(State.CLOSED)
        self._compact_expiries()
        self.count(status)
        try:
            frame = sse.encode_status(
                sub.last_id,
                status,
                self.retry_ms(status) if retry_ms is None else retry_ms,
                json_flavour=sub.json_flavour,
                reason=reason,
            )
            if was is State.STARTING:
                data = sub.head + frame  # never went live: held messages were never promised
            else:
                # Held messages (CATCHING_UP) were never promised either: the client
                # resumes from its last id and gets them then.
                data = b"".join(sub.pending) + frame
                self._metrics.connections_closed += 1
            sub.pending.clear()
            sub.held = []
            sub.head = b""
            sub.transport.write(data)
            sub.transport.close()
        except Exception:
            log.exception("ending a stream failed user=%s", sub.user_id)
            _abort(sub.transport)

    def detach(self, sub: Subscriber) -> None:
        """The client went away."""
        if sub.state in (State.LIVE, State.CATCHING_UP):
            self._metrics.connections_closed += 1
        self._hub.remove(sub)
        sub.held = []
        sub.pending.clear()
        self._compact_expiries()

    def close(self, sub: Subscriber, farewell: bytes = b"", abort: bool = False) -> None:
        """Close without a status (shutdown): ``farewell`` after what is pending, then close."""
        was = sub.state
        if was is State.CLOSED:
            return
        if was in (State.LIVE, State.CATCHING_UP):
            self._metrics.connections_closed += 1
        try:
            self._hub.remove(sub)
            self._compact_expiries()
            data = b"" if was is State.STARTING else b"".join(sub.pending) + farewell
            sub.pending.clear()
            sub.held = []
            if abort:
                sub.transport.abort()
                return
            if data:
                sub.transport.write(data)
            sub.transport.close()
        except Exception:
            log.exception("closing a stream failed user=%s", sub.user_id)
            _abort(sub.transport)

    def end_all(self, status: sse.Status, reason: str | None = None) -> int:
        """End every stream of the process; one failing stream never stops the rest."""
        subs = self._hub.subscribers()
        for sub in subs:
            self.end(sub, status, reason)
        return len(subs)

    def end_user(self, user_id: str, status: sse.Status, reason: str) -> int:
        subs = self._hub.streams_of(user_id)
        for sub in subs:
            self.end(sub, status, reason)
        return len(subs)

    def on_broker_lost(self) -> None:
        count = self.end_all(sse.Status.ERROR, "broker_unavailable")
        log.error("broker lost: closed %d streams with `error`", count, extra={"streams": count})

    # Expiry ------------------------------------------------------------------
    def watch_expiry(self, sub: Subscriber) -> None:
        """Remember to end ``sub`` when its token expires."""
        if sub.expires_at is not None:
            heapq.heappush(self._expiries, (sub.expires_at, next(self._tie), sub))
            self._compact_expiries()

    def expiry_entries(self) -> int:
        """How many streams the expiry heap holds (open ones plus a bounded slack)."""
        return len(self._expiries)

    def _compact_expiries(self) -> None:
        """Rebuild the heap without closed streams once they could outnumber the open ones."""
        if len(self._expiries) > 2 * self._hub.stream_count() + EXPIRY_SLACK:
            self._expiries = [e for e in self._expiries if e[2].state is not State.CLOSED]
            heapq.heapify(self._expiries)

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


def _abort(transport: Transport) -> None:
    try:
        transport.abort()
    except Exception:
        log.exception("aborting a transport failed")
