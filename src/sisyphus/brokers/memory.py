"""The embedded broker: the same semantics as Redis, inside the process.

Used when no Redis URL is configured, so a fresh machine runs Sisyphus with
nothing else installed. Publishing and rights go through the HTTP API and CLI.
History lives in memory and dies with the process; a restart starts a new
epoch, so ids from before it are recognised as foreign.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable, Iterable, Sequence, Set

from sisyphus.brokers.base import LostHandler, MessageHandler, Position, drop_message, ignore_loss
from sisyphus.protocol.names import user_channel
from sisyphus.protocol.resume import OVER_BUDGET, ChannelHistory, EventId, HistoryEntry, Seqs


def new_epoch() -> str:
    return secrets.token_hex(4)


class _ChannelHistory:
    __slots__ = ("channel", "entries", "last_publish", "trimmed_through")

    def __init__(self, channel: str, size: int) -> None:
        # Every entry shares this one name object: a retained message costs its payload,
        # its seq and a tuple, not a copy of the channel name.
        self.channel = channel
        self.entries: collections.deque[HistoryEntry] = collections.deque(maxlen=size)
        self.trimmed_through = 0  # the highest seq dropped by the count bound
        self.last_publish = 0.0


class MemoryBroker:
    name = "embedded"
    reconnects = 0  # in the process: never lost
    malformed = 0  # in the process: nothing to forge

    def __init__(
        self,
        history_size: int = 1000,
        history_max_age: float = 3600.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._sets: dict[str, set[str]] = {}
        self._subscribed: set[str] = set()
        self._on_message: MessageHandler = drop_message
        self._on_lost: LostHandler = ignore_loss
        self._history_size = history_size
        self._max_age = history_max_age
        self._clock = wall_clock
        self._epoch = new_epoch()
        self._epoch_bytes = self._epoch.encode()
        self._seq = 0
        # (second, first seq published in it), one entry per second that saw a publish,
        # for the retention age: the broker's own record of when each seq was published.
        self._timeline: collections.deque[tuple[int, int]] = collections.deque()
        self._next_expiry = 0.0
        self._seconds = 0
        # Ordered by last publish, so expired channels are found at the front.
        self._history: collections.OrderedDict[str, _ChannelHistory] = collections.OrderedDict()

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

    @property
    def ready(self) -> bool:
        return True

    def tick(self, now: float) -> None:
        return None

    def subscribe(self, channels: list[str]) -> None:
        self._subscribed.update(channels)

    def unsubscribe(self, channels: list[str]) -> None:
        self._subscribed.difference_update(channels)

    async def wait_subscribed(self, channels: Iterable[str]) -> None:
        return None

    def confirmed_before(self, channels: Iterable[str], position: Position) -> bool:
        # Subscribing takes effect at once: if nothing was published since the snapshot,
        # every later message will be delivered and the history has nothing to add.
        return position.seqs == (self._seq,) and position.epoch == self._epoch

    async def barrier(self) -> None:
        return None  # delivery is synchronous with publish

    async def user_channels_many(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        return [self._copy_of_set(user_id) for user_id in user_ids]

    def _copy_of_set(self, user_id: str) -> set[str] | None:
        members = self._sets.get(user_id)
        return set(members) if members else None

    def user_channels_now(self, user_id: str) -> tuple[bool, Set[str] | None]:
        return True, self._sets.get(user_id) or None

    async def position(self) -> Position:
        return Position(self._epoch, (self._seq,), (self._oldest(),))

    def _oldest(self) -> int:
        """The first seq published within the retention age (``seq + 1`` if none)."""
        cutoff = self._clock() - self._max_age
        timeline = self._timeline
        while timeline and timeline[0][0] < int(cutoff):
            timeline.popleft()
        return timeline[0][1] if timeline else self._seq + 1

    async def snapshot(self, user_id: str) -> tuple[Set[str] | None, Position]:
        return self._copy_of_set(user_id), await self.position()

    def held_snapshot(self, user_id: str) -> tuple[Set[str] | None, Position]:
        return self._sets.get(user_id) or None, Position(
            self._epoch, (self._seq,), (self._oldest(),)
        )

    async def history(
        self,
        channels: Iterable[str],
        after_seqs: Seqs,
        limit: int,
        max_bytes: int,
        not_before: int | None = None,  # one group: ``after_seqs`` is exact
    ) -> list[ChannelHistory]:
        (after,) = after_seqs
        if after >= self._seq:
            return []  # nothing was published since: the usual first connect
        self._expire()
        result = []
        found = size = 0
        for channel in channels:
            kept = self._history.get(channel)
            if kept is None:
                continue
            # Entries are in seq order: walk back from the newest to the position only,
            # and no further than the budget over all channels.
            newer = []
            for entry in reversed(kept.entries):
                if entry.seq <= after:
                    break
                found += 1
                size += len(entry.payload)
                if found > limit or size > max_bytes:
                    return OVER_BUDGET
                newer.append(entry)
            newer.reverse()
            result.append(ChannelHistory(newer, trimmed=kept.trimmed_through > after))
        return result

    def _expire(self) -> None:
        """Drop channels whose last message is older than the retention age."""
        deadline = self._clock() - self._max_age
        while self._history:
            channel, kept = next(iter(self._history.items()))
            if kept.last_publish >= deadline:
                return
            del self._history[channel]

    def _sequenced(self, channel: str, payload: bytes) -> EventId:
        self._seq += 1
        seq = self._seq
        now = self._clock()
        seconds = int(now)
        if seconds == self._seconds:
            seconds = self._seconds  # one int object per second, shared by its entries
        else:
            self._seconds = seconds
            timeline = self._timeline
            timeline.append((seconds, seq))
            while timeline[0][0] < seconds - self._max_age:
                timeline.popleft()
        history = self._history
        kept = history.get(channel)
        if kept is None:
            kept = history[channel] = _ChannelHistory(channel, self._history_size)
        else:
            history.move_to_end(channel)  # the most recently published go to the end
        entries = kept.entries
        if len(entries) == self._history_size:
            kept.trimmed_through = entries[0].seq
        entries.append(HistoryEntry(seq, kept.channel, payload, seconds))
        kept.last_publish = now
        if now >= self._next_expiry:
            self._next_expiry = now + 1.0  # retention is in seconds: a sweep a second will do
            self._expire()
        if channel in self._subscribed:
            self._on_message(channel, payload, seq, self._epoch_bytes, seconds)
        return EventId(self._epoch, (seq,), seconds)

    async def publish(self, channel: str, payload: bytes) -> EventId:
        return self._sequenced(channel, payload)

    async def grant(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        self._sets.setdefault(user_id, set()).update(channels)
        return self._sequenced(user_channel(user_id), notice)

    async def revoke(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        members = self._sets.get(user_id)
        if members is not None:
            members.difference_update(channels)
            if not members:
                # Like Redis: an empty set no longer exists, so the user is unknown again.
                del self._sets[user_id]
        return self._sequenced(user_channel(user_id), notice)
