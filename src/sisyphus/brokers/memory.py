"""The embedded broker: the same semantics as Redis, inside the process.

Used when no Redis URL is configured, so a fresh machine runs Sisyphus with
nothing else installed. Publishing and rights go through the HTTP API and CLI.
"""

from __future__ import annotations

from collections.abc import Iterable

from sisyphus.brokers.base import LostHandler, MessageHandler
from sisyphus.protocol.names import user_channel


def _drop(channel: str, payload: bytes) -> None:
    """Deliver nowhere (before :meth:`MemoryBroker.bind`)."""


def _ignore() -> None:
    """Tell nobody (before :meth:`MemoryBroker.bind`)."""


class MemoryBroker:
    name = "embedded"

    def __init__(self) -> None:
        self._sets: dict[str, set[str]] = {}
        self._subscribed: set[str] = set()
        self._on_message: MessageHandler = _drop
        self._on_lost: LostHandler = _ignore

    def bind(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        self._on_message = on_message
        self._on_lost = on_lost

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribed.clear()

    @property
    def connected(self) -> bool:
        return True

    def subscribe(self, channels: list[str]) -> None:
        self._subscribed.update(channels)

    def unsubscribe(self, channels: list[str]) -> None:
        self._subscribed.difference_update(channels)

    async def wait_subscribed(self, channels: Iterable[str]) -> None:
        return None

    async def user_channels(self, user_id: str) -> set[str] | None:
        members = self._sets.get(user_id)
        return set(members) if members else None

    async def publish(self, channel: str, payload: bytes) -> None:
        if channel in self._subscribed:
            self._on_message(channel, payload)

    async def grant(self, user_id: str, channels: list[str], notice: bytes) -> None:
        self._sets.setdefault(user_id, set()).update(channels)
        await self.publish(user_channel(user_id), notice)

    async def revoke(self, user_id: str, channels: list[str], notice: bytes) -> None:
        members = self._sets.get(user_id)
        if members is not None:
            members.difference_update(channels)
            if not members:
                # Like Redis: an empty set no longer exists, so the user is unknown again.
                del self._sets[user_id]
        await self.publish(user_channel(user_id), notice)
