"""One browser connection's delivery state, as the hub sees it.

Owns the bytes waiting for the connection's transport, its last event id, the
messages held while it starts or catches up, and the bound on unsent data. Its
state moves only through :mod:`sisyphus.hub.states`. Must not know about HTTP
parsing or brokers. The transport is anything with the methods of
:class:`Transport`, so tests of the hub can pass their own.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from sisyphus.hub.states import State, can_move
from sisyphus.protocol.resume import Seqs


class Transport(Protocol):
    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class Held(NamedTuple):
    """A message kept raw while its stream starts or catches up, until it can go in order."""

    event_id: bytes
    seq: int | None  # None for a plain PUBLISH
    channel: str
    payload: bytes
    # Where it stands in the sequence(s): its seq in its group and, in the others (and
    # for a plain PUBLISH), the highest seq the process had seen when it arrived.
    position: Seqs
    group: int = 0  # its sequence group (one group but on a Redis Cluster)
    time: int = 0  # when it was published (Unix seconds), for its id


class Subscriber:
    """A stream's channels, pending frames, held messages, position and liveness clock."""

    __slots__ = (
        "channels",
        "expires_at",
        "floor",
        "head",
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
        head: bytes = b"",
    ) -> None:
        if not last_id:
            # Every status a stream may end with repeats this id: it must exist from birth.
            raise ValueError("a subscriber needs the client's position as its last id")
        self.transport = transport
        self.user_id = user_id
        # The JSON flavour gets `{"channel", "data"}` messages and named status events.
        self.json_flavour = json_flavour
        # When the stream's token expires (wall clock, leeway included), or None.
        self.expires_at = expires_at
        # The HTTP head, written with the first event (`ok` or a closing status).
        self.head = head
        self.channels: frozenset[str] = frozenset()
        # Frames accepted but not yet written; flushed as one write per loop iteration.
        self.pending: list[bytes] = []
        # Messages that arrived while STARTING or CATCHING_UP, in arrival order.
        self.held: list[Held] = []
        # The id of the last event this stream was given (the client's position):
        # keep-alives and statuses repeat it, so they never move the client's position.
        self.last_id = last_id
        self.last_write = now
        self.max_unsent = max_unsent
        self.state = State.STARTING
        # The seq the stream started after: a sequenced message at or below it that
        # arrives once live (the pub/sub link lagging) was before its start.
        self.floor: Seqs = (0,)

    def move(self, target: State) -> bool:
        """Move to ``target`` if the state table allows it; return whether it moved."""
        if not can_move(self.state, target):
            return False
        self.state = target
        return True

    def flush(self, now: float) -> bool:
        """Write the pending frames in one call; return False if the stream was cut as slow."""
        pending = self.pending
        state = self.state
        if not pending or (state is not State.LIVE and state is not State.CATCHING_UP):
            return True  # a starting stream writes with its head; a closed one not at all
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
        """Write the head and ``first_bytes`` (`ok`, catch-up) and start streaming.

        This first write is not held to the unsent bound: a replay may exceed it,
        and is already bounded by the replay limits.
        """
        if not self.move(State.LIVE):
            return
        self.last_id = last_id
        data = self.head + first_bytes
        self.head = b""
        pending = self.pending
        if pending:
            data += b"".join(pending)
            pending.clear()
        self.transport.write(data)
        self.last_write = now
