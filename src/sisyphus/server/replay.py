"""Catch-up: what a stream missed, merged with what it held, in the order of the sequence.

Owns reading a replay from the broker within the replay bounds, merging it
with the messages a stream held while it started or caught up (no duplicate,
ids never going backwards), and framing the result. Used by the handshake and
by the rights refresh; knows nothing of either.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterable, Sequence

from sisyphus.brokers.base import Broker
from sisyphus.config import Settings
from sisyphus.hub.subscriber import Held
from sisyphus.protocol import sse
from sisyphus.protocol.resume import EventId, HistoryEntry, Replay, Seqs, plan_replay


def frames(
    messages: Iterable[Held], last_id: bytes, json_flavour: bool
) -> tuple[list[bytes], bytes]:
    """The SSE frames of ``messages`` for a stream at ``last_id``, and its id after them.

    A plain PUBLISH (no seq) repeats the id before it: it never moves the position.
    """
    out = []
    for message in messages:
        if message.seq is not None:
            last_id = message.event_id
        if json_flavour:
            out.append(sse.encode_json_message(last_id, message.channel, message.payload))
        else:
            out.append(sse.encode_event(last_id, message.payload))
    return out, last_id


async def read_replay(
    broker: Broker,
    settings: Settings,
    epoch: str,
    channels: Iterable[str],
    after: Seqs,
    not_before: int | None = None,
) -> Replay:
    """The retained messages after ``after`` on ``channels``, or why to reset instead
    (``not_before``: see :meth:`Broker.history`).

    The replay is the stream's first write, so it is held to the stream's unsent
    bound too: at most ``min(--replay-max-bytes, --max-unsent-bytes)`` wire bytes.
    """
    limit = settings.replay_max_messages
    max_bytes = min(settings.replay_max_bytes, settings.max_unsent_bytes)
    histories = await broker.history(channels, after, limit, max_bytes, not_before)
    return plan_replay(histories, epoch, limit, max_bytes, after)


def merge(
    epoch: str, replayed: Sequence[HistoryEntry], held: Iterable[Held], after: Seqs
) -> list[Held]:
    """Replayed and held messages as one list in sequence order, each once.

    ``replayed`` is in seq order; ``held`` in arrival order (so in position order).
    A held message already replayed, or at or before ``after`` (the client has it),
    is dropped. A plain PUBLISH goes right after the seq it arrived behind, which
    keeps every channel in publication order and the ids from going backwards.
    """
    if len(after) > 1:
        return _merge_groups(epoch, replayed, held, after)
    (start,) = after
    replayed_seqs = {entry.seq for entry in replayed}
    kept = [
        message
        for message in held
        if message.seq is None or (message.seq > start and message.seq not in replayed_seqs)
    ]
    if not replayed:
        return kept
    as_held = [
        Held(EventId(epoch, (entry.seq,), entry.time).encode(), entry.seq, entry.channel,
             entry.payload, (entry.seq,), 0, entry.time)
        for entry in replayed
    ]  # fmt: skip
    if not kept:
        return as_held
    return list(heapq.merge(as_held, kept, key=_order))


def _order(message: Held) -> tuple[Seqs, int]:
    # A sequenced message at its seq; a plain one just after the seq it arrived behind.
    return (message.position, 0 if message.seq is not None else 1)


def _merge_groups(
    epoch: str, replayed: Sequence[HistoryEntry], held: Iterable[Held], after: Seqs
) -> list[Held]:
    """Several sequence groups: within each group, replayed and held messages merged in
    seq order, each once; across groups, the held ones in arrival order, each preceded by
    the replayed ones of its group that come before it, then the rest of the replay.

    A rights refresh replays only the added channels, while the held messages are of
    every channel: a held message is dropped only if it was replayed or is at or before
    ``after``, never for a replayed message of another channel with a higher seq. Ids are
    made in the output's order, from ``after``: each group's part of them moves forward
    with that group's messages only.
    """
    replayed_keys = {(entry.group, entry.seq) for entry in replayed}
    due: dict[int, collections.deque[HistoryEntry]] = {}
    for entry in sorted(replayed, key=lambda e: (e.group, e.seq)):
        if entry.seq > after[entry.group]:
            due.setdefault(entry.group, collections.deque()).append(entry)
    running = list(after)
    out: list[Held] = []

    def replay_before(group: int, seq: float) -> None:
        queue = due.get(group)
        while queue and queue[0].seq < seq:
            entry = queue.popleft()
            running[group] = entry.seq
            seqs = tuple(running)
            out.append(
                Held(EventId(epoch, seqs, entry.time).encode(), entry.seq, entry.channel,
                     entry.payload, seqs, entry.group, entry.time)
            )  # fmt: skip

    for message in held:
        if message.seq is None:
            out.append(message._replace(position=tuple(running)))
            continue
        group = message.group
        replay_before(group, message.seq)
        if (group, message.seq) in replayed_keys:
            replay_before(group, message.seq + 1)  # its replayed copy, in its place
            continue
        if message.seq <= running[group]:
            continue  # the client has it
        running[group] = message.seq
        seqs = tuple(running)
        event_id = EventId(epoch, seqs, message.time).encode()
        out.append(message._replace(event_id=event_id, position=seqs))
    # What is left of the replay: each group in seq order, the groups by time.
    left = [list(queue) for queue in due.values() if queue]
    for entry in heapq.merge(*left, key=lambda e: e.time):
        replay_before(entry.group, entry.seq + 1)
    return out
