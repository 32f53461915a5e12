"""Event ids as positions, and the replay that resumes a stream, without I/O.

An event id is ``<epoch>-<seq>-<time>``:

* ``seq`` is a number from ONE sequence per broker, taken atomically with the
  publish, so ids order a user's messages across all its channels and the id
  doesn't grow with the number of channels;
* ``epoch`` names the broker's history (a random word stored with it): an id
  from a wiped Redis or a restarted embedded broker is recognised as foreign;
* ``time`` (Unix seconds) says when it was published, for people reading ids.
  Nothing is decided from it: a client can write any time into an id, so
  whether a position is older than retention is decided from the broker's own
  timeline (the first seq published within the retention age).

A stream resumes from ``seq``: it gets every retained message with a larger
seq on its channels, in order, then the live stream.

On a Redis Cluster the channels are spread over several sequences ("groups", each in
a hash slot of its own, see :mod:`sisyphus.brokers.groups`), and ``seq`` is one number
per group, dot-separated (``<epoch>-<s0>.<s1>.<s2>-<time>``): the id grows with the
number of groups, never with the number of channels. ``epoch`` then names all the
groups' histories at once (:func:`history_name`). With one group, ids are as above.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sisyphus.protocol.http import Request

# Sequence groups a cluster may have: bounds the id at 16 + 1 + 64 * 20 + 1 + 12 bytes.
MAX_GROUPS = 64
_ID = re.compile(
    rf"([0-9a-z]{{1,16}})-([0-9]{{1,19}}(?:\.[0-9]{{1,19}}){{0,{MAX_GROUPS - 1}}})-([0-9]{{1,12}})"
)

# A position: one seq per sequence group (one group but on a Redis Cluster).
Seqs = tuple[int, ...]

# Reasons for the `reset` status, as the JSON flavour names them.
RESET_EPOCH = "epoch"  # the id is from another history (wiped Redis, restarted embedded broker)
RESET_RETENTION = "retention"  # messages after the id are no longer retained
RESET_LIMIT = "replay_limit"  # more missed messages than one reconnect may replay


class InvalidEventId(ValueError):
    """A ``Last-Event-ID`` that is too long or not an id Sisyphus could have sent."""


# EventId and HistoryEntry are NamedTuples, not dataclasses: a tuple of ints, strings
# and bytes is untracked by the cyclic GC after its first collection, so a history of
# millions of retained messages costs the collector nothing (as frozen dataclasses it
# cost 13 % of the server's CPU in S3), and a tuple is cheaper to build.
class EventId(NamedTuple):
    epoch: str
    seqs: Seqs
    time: int

    def encode(self) -> bytes:
        seqs = self.seqs
        if len(seqs) == 1:
            return f"{self.epoch}-{seqs[0]}-{self.time}".encode()  # ASCII
        return f"{self.epoch}-{seqs_text(seqs)}-{self.time}".encode()


def seqs_text(seqs: Seqs) -> str:
    return ".".join(map(str, seqs))


def parse_event_id(text: str) -> EventId:
    match = _ID.fullmatch(text)
    if match is None:
        raise InvalidEventId("Last-Event-ID is not an id this service sent")
    return EventId(match[1], tuple(map(int, match[2].split("."))), int(match[3]))


def history_name(epochs: Sequence[str]) -> str:
    """The epoch of an id: the one history's name, or with several groups a digest of all
    their names, so that any group's history being replaced makes every id foreign."""
    if len(epochs) == 1:
        return epochs[0]
    return hashlib.sha1(" ".join(epochs).encode()).hexdigest()[:12]  # noqa: S324 (a name)


def channel_group(channel: str, groups: int) -> int:
    """The sequence group of a channel (0 when there is one). The service, the Python
    publishers and every process must agree on it: CRC-32 of the name, modulo."""
    if groups == 1:
        return 0
    return zlib.crc32(channel.encode()) % groups


def at_or_before(first: Seqs, second: Seqs) -> bool:
    """Every group of ``first`` at or before the same group of ``second``."""
    if len(first) == 1 == len(second):
        return first[0] <= second[0]  # one group (all but a cluster): every connect asks
    return all(a <= b for a, b in zip(first, second, strict=True))


def later_of(first: Seqs, second: Seqs) -> Seqs:
    """Group by group, the later of two positions."""
    return tuple(max(a, b) for a, b in zip(first, second, strict=True))


def earlier_of(first: Seqs, second: Seqs) -> Seqs:
    """Group by group, the earlier of two positions."""
    return tuple(min(a, b) for a, b in zip(first, second, strict=True))


def last_event_id(request: Request, max_bytes: int) -> EventId | None:
    """The ``Last-Event-ID`` header, else the ``lastEventId`` query parameter (polyfills)."""
    value = request.headers.get("last-event-id")
    if value is None:
        value = request.query_value("lastEventId")
    if value is None or value == "":
        return None
    if len(value) > max_bytes:
        raise InvalidEventId(f"Last-Event-ID longer than {max_bytes} bytes")
    return parse_event_id(value)


class HistoryEntry(NamedTuple):
    """One retained message."""

    seq: int
    channel: str
    payload: bytes
    time: int
    group: int = 0


@dataclass(frozen=True, slots=True)
class ChannelHistory:
    """What a broker retains of one channel after a position.

    ``entries`` are in seq order (at most the replay bound plus one);
    ``trimmed`` says messages after the position may have been dropped.
    """

    entries: list[HistoryEntry]
    trimmed: bool
    # More was missed than the replay bounds allow: the broker stopped reading.
    over_budget: bool = False


# What a broker answers when it stopped reading at the replay bounds.
OVER_BUDGET = [ChannelHistory([], trimmed=False, over_budget=True)]


@dataclass(frozen=True, slots=True)
class Replay:
    """The messages to replay, or why the stream must be told to reset."""

    entries: Sequence[HistoryEntry]
    reset: str | None = None


NOTHING_TO_REPLAY = Replay(())


def start_position(
    claimed: EventId | None, epoch: str, current: Seqs, oldest: Seqs
) -> tuple[Seqs, str | None]:
    """Where a stream starts: (position to replay after, reset reason or None).

    ``oldest`` is, per group, the first seq the broker published within the
    retention age (``current + 1`` if none): a client whose next message is older
    than that gets `reset`. Without a claimed id the stream starts at the broker's
    current position, and still replays what is published while it subscribes.
    """
    if claimed is None:
        return current, None
    seqs = claimed.seqs
    if claimed.epoch != epoch or len(seqs) != len(current) or not at_or_before(seqs, current):
        return current, RESET_EPOCH
    for seq, now, first in zip(seqs, current, oldest, strict=True):
        if seq < now and seq + 1 < first:
            return current, RESET_RETENTION
    return seqs, None


def wire_size(epoch: str, entry: HistoryEntry, other_groups: int = 0) -> int:
    """The bytes ``entry`` takes on the wire as a default-flavour event (exact with one
    group; ``other_groups`` bytes of the id's other groups added with several)."""
    payload = entry.payload
    lf, cr = payload.count(b"\n"), payload.count(b"\r")
    breaks = lf + cr - payload.count(b"\r\n")
    id_size = len(epoch) + len(str(entry.seq)) + len(str(entry.time)) + 2 + other_groups
    # "id: <id>\n", then "data: <line>\n" per line, then the blank line.
    return 4 + id_size + 1 + len(payload) - lf - cr + 7 * (breaks + 1) + 1


def plan_replay(
    histories: Iterable[ChannelHistory],
    epoch: str,
    max_count: int,
    max_bytes: int,
    after: Seqs = (0,),
) -> Replay:
    """Merge per-channel histories into one replay in seq order, within the bounds.

    ``max_bytes`` counts wire bytes (as the default flavour frames them), so the
    bound is what the replay costs the stream's buffer, not its payloads. With
    several groups each group's messages are in its seq order, the groups interleaved
    by time; the ids' other groups are bounded from ``after`` and the replay's seqs.
    """
    histories = list(histories)
    if any(history.over_budget for history in histories):
        return Replay([], RESET_LIMIT)
    if any(history.trimmed for history in histories):
        return Replay([], RESET_RETENTION)
    with_entries = [h.entries for h in histories if h.entries]
    if not with_entries:
        return NOTHING_TO_REPLAY  # the usual case: a connect that missed nothing
    merged = _merge(with_entries)
    others = 0 if len(after) == 1 else _id_digits(after, merged)
    if len(merged) > max_count or sum(wire_size(epoch, e, others) for e in merged) > max_bytes:
        return Replay([], RESET_LIMIT)
    return Replay(merged)


def _id_digits(after: Seqs, entries: list[HistoryEntry]) -> int:
    """An upper bound of the digits and dots of every replayed id's groups (counted
    beside each entry's own seq): the latest seq of each group, and a dot each."""
    latest = list(after)
    for entry in entries:
        if entry.seq > latest[entry.group]:
            latest[entry.group] = entry.seq
    return len(seqs_text(tuple(latest)))


def _merge(per_channel: list[list[HistoryEntry]]) -> list[HistoryEntry]:
    """One list: each group's entries in seq order (its channels merged), the groups'
    lists then interleaved by publication time (any interleaving keeps every group's
    order, which is all an id needs)."""
    if len(per_channel) == 1:
        return per_channel[0]
    by_group: dict[int, list[list[HistoryEntry]]] = {}
    for entries in per_channel:
        by_group.setdefault(entries[0].group, []).append(entries)
    groups = [
        lists[0] if len(lists) == 1 else list(heapq.merge(*lists, key=lambda e: e.seq))
        for lists in by_group.values()
    ]
    if len(groups) == 1:
        return groups[0]
    return list(heapq.merge(*groups, key=lambda entry: entry.time))
