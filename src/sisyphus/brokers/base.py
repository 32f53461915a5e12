"""The interface every broker implements; the server only speaks to this.

Rights semantics, the same for every broker: a user is known while its set
``user:<id>:channels`` exists, and a set that loses its last member is gone
(Redis deletes empty sets; the embedded broker does the same).

History semantics, the same for every broker: everything published through
:meth:`Broker.publish`, :meth:`Broker.grant` and :meth:`Broker.revoke` takes
the next number of ONE sequence, atomically with the delivery, and is kept
per channel (bounded by count and age) so streams can resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

from sisyphus.protocol.resume import ChannelHistory, EventId, Seqs

# channel, payload, seq, epoch, time: seq/epoch are None for a plain PUBLISH.
MessageHandler = Callable[[str, bytes, int | None, bytes | None, int], None]
LostHandler = Callable[[], None]


def drop_message(
    channel: str, payload: bytes, seq: int | None, epoch: bytes | None, time: int
) -> None:
    """Deliver nowhere: a broker's handler until ``bind`` is called."""


def ignore_loss() -> None:
    """Tell nobody: a broker's loss handler until ``bind`` is called."""


@dataclass(frozen=True, slots=True)
class Position:
    """The broker's history name, the last seq it handed out, and the retention edge,
    each per sequence group (one, but on a Redis Cluster).

    ``oldest`` is the first seq published within the retention age (``seq + 1``
    when nothing was): a position whose next message is older gets `reset`. It is
    the broker's own record, never a field of a client's id.
    """

    epoch: str
    seqs: Seqs
    oldest: Seqs
    # The broker's count of subscription confirmations when the snapshot's read was
    # sent (0: not counted); see :meth:`Broker.confirmed_before`.
    confirmations: int = 0
    # Each group's own history name; ``epoch`` is their history_name (empty: one group,
    # named ``epoch``).
    epochs: tuple[str, ...] = ()


class Broker(Protocol):
    """Pub/sub plus per-user channel sets plus per-channel history."""

    name: str
    reconnects: int  # how often the broker link came back after a loss
    malformed: int  # internal (sequenced) messages dropped as malformed, never delivered

    def bind(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        """Where to deliver messages, and whom to tell when the broker connection is lost."""

    async def start(self) -> None:
        """Connect (or keep trying in the background)."""

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...

    @property
    def ready(self) -> bool:
        """Connected and every wanted subscription confirmed (what /readyz reports)."""

    def tick(self, now: float) -> None:
        """Called by the service's periodic tick (loop clock): health checks; never blocks."""

    def subscribe(self, channels: list[str]) -> None:
        """Start delivering ``channels``; must not block (confirmation comes later)."""

    def unsubscribe(self, channels: list[str]) -> None:
        """Stop delivering ``channels``; must not block."""

    async def wait_subscribed(self, channels: Iterable[str]) -> None:
        """Return once the broker confirmed every channel in ``channels``."""

    def confirmed_before(self, channels: Iterable[str], position: Position) -> bool:
        """Whether every channel in ``channels`` was confirmed, and has stayed so, since
        before the snapshot that returned ``position`` was read: every message on them
        published after that read is then delivered, none is due in a history read."""

    async def barrier(self) -> None:
        """Return once every message published before this call has been delivered."""

    async def snapshot(self, user_id: str) -> tuple[Set[str] | None, Position]:
        """The user's channel set (``None`` if unknown) and the current position.

        The members may be the broker's own (held for :meth:`held_snapshot`): read
        them, never change them."""

    def held_snapshot(self, user_id: str) -> tuple[Set[str] | None, Position] | None:
        """A snapshot without a read, when the process holds one it can trust; else
        ``None`` (only :meth:`snapshot` can tell). Its position is at or after every
        message delivered already, and every later message on a channel
        :meth:`confirmed_before` it is still to arrive (one published an instant before
        the call may be among them)."""

    async def user_channels_many(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        """For each user, the members of ``user:<id>:channels``, or ``None`` if the user
        is unknown; all read together (one round trip on Redis)."""

    def user_channels_now(self, user_id: str) -> tuple[bool, Set[str] | None]:
        """The user's set as of this instant, when the process holds it (no round trip):
        ``(True, members or None)``; ``(False, None)`` when only a read can tell.
        The members are the broker's own: read them, never change them."""

    async def position(self) -> Position: ...

    async def history(
        self,
        channels: Iterable[str],
        after: Seqs,
        limit: int,
        max_bytes: int,
        not_before: int | None = None,
    ) -> list[ChannelHistory]:
        """Per channel, the retained messages with a seq above ``after`` (in the
        channel's group). With several groups and ``not_before`` (Unix seconds), each
        group's read starts no later than its first message published at or after
        ``not_before``; with one group ``after`` is exact and ``not_before`` unused.

        Bounded work: once more than ``limit`` messages, or more than ``max_bytes``
        payload bytes, are found over all channels, reading stops and the answer is
        :data:`~sisyphus.protocol.resume.OVER_BUDGET`. A channel with nothing
        retained after ``after`` (and nothing trimmed) may be left out of the list.
        """

    async def publish(self, channel: str, payload: bytes) -> EventId:
        """Deliver and retain ``payload``; return the id it got."""

    async def grant(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        """Add ``channels`` to the user's set, then publish ``notice`` on ``user:<id>``."""

    async def revoke(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        """Remove ``channels`` from the user's set, then publish ``notice`` on ``user:<id>``."""
