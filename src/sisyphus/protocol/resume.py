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
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sisyphus.protocol.http import Request

_ID = re.compile(r"([0-9a-z]{1,16})-([0-9]{1,19})-([0-9]{1,12})")

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
    seq: int
    time: int

    def encode(self) -> bytes:
        return f"{self.epoch}-{self.seq}-{self.time}".encode()  # ASCII by construction


def parse_event_id(text: str) -> EventId:
    match = _ID.fullmatch(text)
    if match is None:
        raise InvalidEventId("Last-Event-ID is not an id this service sent")
    return EventId(match[1], int(match[2]), int(match[3]))


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
    claimed: EventId | None, epoch: str, current_seq: int, oldest_seq: int
) -> tuple[int, str | None]:
    """Where a stream starts: (seq to replay after, reset reason or None).

    ``oldest_seq`` is the first seq the broker published within the retention
    age (``current_seq + 1`` if none): a client whose next message is older than
    that gets `reset`. Without a claimed id the stream starts at the broker's
    current position, and still replays what is published while it subscribes.
    """
    if claimed is None:
        return current_seq, None
    if claimed.epoch != epoch or claimed.seq > current_seq:
        return current_seq, RESET_EPOCH
    if claimed.seq < current_seq and claimed.seq + 1 < oldest_seq:
        return current_seq, RESET_RETENTION
    return claimed.seq, None


def wire_size(epoch: str, entry: HistoryEntry) -> int:
    """The bytes ``entry`` takes on the wire as a default-flavour event (exact, not built)."""
    payload = entry.payload
    lf, cr = payload.count(b"\n"), payload.count(b"\r")
    breaks = lf + cr - payload.count(b"\r\n")
    id_size = len(epoch) + len(str(entry.seq)) + len(str(entry.time)) + 2
    # "id: <id>\n", then "data: <line>\n" per line, then the blank line.
    return 4 + id_size + 1 + len(payload) - lf - cr + 7 * (breaks + 1) + 1


def plan_replay(
    histories: Iterable[ChannelHistory], epoch: str, max_count: int, max_bytes: int
) -> Replay:
    """Merge per-channel histories into one replay in seq order, within the bounds.

    ``max_bytes`` counts wire bytes (as the default flavour frames them), so the
    bound is what the replay costs the stream's buffer, not its payloads.
    """
    histories = list(histories)
    if any(history.over_budget for history in histories):
        return Replay([], RESET_LIMIT)
    if any(history.trimmed for history in histories):
        return Replay([], RESET_RETENTION)
    with_entries = [h.entries for h in histories if h.entries]
    if not with_entries:
        return NOTHING_TO_REPLAY  # the usual case: a connect that missed nothing
    if len(with_entries) == 1:
        merged = with_entries[0]
    else:
        merged = list(heapq.merge(*with_entries, key=lambda entry: entry.seq))
    if len(merged) > max_count or sum(wire_size(epoch, e) for e in merged) > max_bytes:
        return Replay([], RESET_LIMIT)
    return Replay(merged)
