"""A stream's states and the moves between them: the one table every path goes through.

Owns what a state means for delivery (write, hold, drop) and which moves are
allowed. Must not know about sockets, brokers or HTTP: the hub and the stream
lifecycle ask this table, so "end this stream" works from every state.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where a stream is in its life; the comment says what happens to a message."""

    STARTING = 1  # identified and subscribing: messages are held until the `ok` status
    LIVE = 2  # messages are written
    CATCHING_UP = 3  # live, but a rights refresh is adding channels: messages are held
    CLOSED = 4  # gone: messages are dropped

    # Members are singletons: identity is their equality, so hash them as objects, in C
    # (Enum's own hash is a Python call, paid by every move of every stream).
    __hash__ = object.__hash__


# The allowed moves. Ending is allowed from every state and is idempotent.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.LIVE, State.CLOSED}),
    State.LIVE: frozenset({State.CATCHING_UP, State.CLOSED}),
    State.CATCHING_UP: frozenset({State.LIVE, State.CLOSED}),
    State.CLOSED: frozenset({State.CLOSED}),
}

# States whose messages are kept raw until the stream can write them in order.
HOLDING = frozenset({State.STARTING, State.CATCHING_UP})


def can_move(current: State, target: State) -> bool:
    """Whether a stream in ``current`` may move to ``target`` (never raises)."""
    return target in TRANSITIONS[current]
