"""The interface every broker implements; the server only speaks to this.

Rights semantics, the same for every broker: a user is known while its set
``user:<id>:channels`` exists, and a set that loses its last member is gone
(Redis deletes empty sets; the embedded broker does the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

MessageHandler = Callable[[str, bytes], None]
LostHandler = Callable[[], None]


class Broker(Protocol):
    """Pub/sub plus per-user channel sets."""

    name: str

    def bind(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        """Where to deliver messages, and whom to tell when the broker connection is lost."""

    async def start(self) -> None:
        """Connect; raises :class:`~sisyphus.errors.BrokerUnavailable` if it can't."""

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...

    def subscribe(self, channels: list[str]) -> None:
        """Start delivering ``channels``; must not block (confirmation comes later)."""

    def unsubscribe(self, channels: list[str]) -> None:
        """Stop delivering ``channels``; must not block."""

    async def wait_subscribed(self, channels: Iterable[str]) -> None:
        """Return once the broker confirmed every channel in ``channels``."""

    async def user_channels(self, user_id: str) -> set[str] | None:
        """The members of ``user:<id>:channels``, or ``None`` if the user is unknown."""

    async def publish(self, channel: str, payload: bytes) -> None: ...

    async def grant(self, user_id: str, channels: list[str], notice: bytes) -> None:
        """Add ``channels`` to the user's set, then publish ``notice`` on ``user:<id>``."""

    async def revoke(self, user_id: str, channels: list[str], notice: bytes) -> None:
        """Remove ``channels`` from the user's set, then publish ``notice`` on ``user:<id>``."""
