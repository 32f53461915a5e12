"""One browser connection's delivery state, as the hub sees it.

Owns the bytes waiting for the connection's transport, its last event id and
the bound on unsent data. Must not know about HTTP parsing or brokers. The
transport is anything with the three methods of :class:`Transport`, so tests
of the hub can pass their own.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol


class Transport(Protocol):
    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class Held(NamedTuple):
    """A message that arrived while the stream was starting, kept raw until it goes live."""

    event_id: bytes
    seq: int | None  # None for a plain PUBLISH
    channel: str
    payload: bytes


class State(enum.Enum):
    STARTING = 1  # identified and subscribing: events are held until the `ok` status
    LIVE = 2  # events are written
    CLOSED = 3  # gone: events are dropped


class Subscriber:
    """A stream's channels, pending frames, position and liveness clock."""

    __slots__ = (
        "channels",
        "expires_at",
        "held",
        "json_flavour",
        "last_id",
        "last_write",
        "max_unsent",
        "pending",
        "state",
        "transport",
        "user_id",
    )

    def __init__(
        self,
        transport: Transport,
        user_id: str,
        last_id: bytes,
        max_unsent: int,
        now: float,
        json_flavour: bool = False,
        expires_at: float | None = None,
    ) -> None:
        self.transport = transport
        self.user_id = user_id
        # The JSON flavour gets `{"channel", "data"}` messages and named status events.
        self.json_flavour = json_flavour
        # When the stream's token expires (wall clock), or None in development mode.
        self.expires_at = expires_at
        self.channels: frozenset[str] = frozenset()
        # Frames accepted but not yet written; flushed as one write per loop iteration.
        self.pending: list[bytes] = []
        # Messages that arrived while STARTING; emptied when the stream goes live.
        self.held: list[Held] = []
        # The id of the last event this stream was given: keep-alives and statuses reuse it,
        # so they never move the client's position.
        self.last_id = last_id
        self.last_write = now
        self.max_unsent = max_unsent
        self.state = State.STARTING

    def flush(self, now: float) -> bool:
        """Write the pending frames in one call; return False if the stream was cut as slow."""
        pending = self.pending
        if not pending or self.state is not State.LIVE:
            return True
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        transport = self.transport
        transport.write(data)
        self.last_write = now
        if transport.get_write_buffer_size() > self.max_unsent:
            # A client that doesn't read must not grow our memory: cut it, it resumes by id.
            self.state = State.CLOSED
            transport.abort()
            return False
        return True

    def go_live(self, first_bytes: bytes, last_id: bytes, now: float) -> None:
        """Write ``first_bytes`` (head, `ok`, replay, held messages) and start streaming.

        This first write is not held to the unsent bound: a replay may exceed it,
        and is already bounded by the replay limits.
        """
        self.state = State.LIVE
        self.held = []
        self.last_id = last_id
        pending = self.pending
        data = first_bytes + b"".join(pending) if pending else first_bytes
        pending.clear()
        self.transport.write(data)
        self.last_write = now
