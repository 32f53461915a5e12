"""Channel -> subscribers, reference-counted subscriptions, and dispatch.

Owns: which local streams listen on which channel, telling the broker when a
channel gains its first or loses its last local listener, the event id
sequence, and the hot path (encode once, write to all, one write per
connection per loop iteration). Must not await, parse HTTP or know Redis.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from sisyphus.hub.states import State
from sisyphus.hub.subscriber import Held, Subscriber
from sisyphus.metrics import Metrics
from sisyphus.protocol import sse
from sisyphus.protocol.names import user_of_channel
from sisyphus.protocol.resume import EventId, Seqs, channel_group, history_name, later_of

log = logging.getLogger("sisyphus.hub")

# A channel's listeners: an insertion-ordered set (the values are unused).
Listeners = dict[Subscriber, None]


class SubscriptionSink(Protocol):
    """The part of a broker the hub drives: it must not block."""

    def subscribe(self, channels: list[str]) -> None: ...
    def unsubscribe(self, channels: list[str]) -> None: ...


class Hub:
    """Fan-out of broker messages to local subscribers."""

    def __init__(
        self,
        sink: SubscriptionSink,
        schedule: Callable[[Callable[[], None]], Any],
        clock: Callable[[], float],
        metrics: Metrics,
        on_user_message: Callable[[str, Seqs], None],
        wall_clock: Callable[[], float],
        max_held: int = 1000,
        on_overflow: Callable[[Subscriber], None] | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._sink = sink
        # A starting or catching-up stream holds at most this many messages; past it,
        # ``on_overflow`` ends it (it resumes by id) instead of growing our memory.
        self._max_held = max_held
        self._on_overflow = on_overflow
        self._overflowing: list[Subscriber] = []
        self._schedule = schedule
        self._clock = clock
        self._metrics = metrics
        self._on_user_message = on_user_message
        # Each channel's listeners in the order they subscribed (a dict as an ordered
        # set): a broadcast writes to sockets in the order they connected, which walks the
        # kernel's socket memory in allocation order. With a set's order (by address)
        # the same broadcast's p99 was about a fifth higher (docs/performance.md).
        self._channels: dict[str, Listeners] = {}
        self._users: dict[str, set[Subscriber]] = {}
        self._stream_count = 0
        self._dirty: list[Subscriber] = []
        # Messages queued since the last flush, and when the first of them arrived (loop
        # clock): the flush records their delivery latency once per message, not per
        # subscriber, measured from that first arrival (messages dispatched in one loop
        # iteration came in one read, so they arrived together).
        # (On ``timer``: uvloop's loop clock has a resolution of 1 ms.)
        self._timer = timer
        self._batch = 0
        self._batch_arrival = 0.0
        self._wall_clock = wall_clock
        # Per sequence group (one, but on a Redis Cluster): the group's history name,
        # the highest seq this process knows of (snapshots included), and the highest
        # seq delivered over the pub/sub link; and the name of them all (ids' epoch).
        self._groups = 1
        self._epochs = [b"0"]
        self._epoch = b"0"
        self._position = [0]
        self._delivered = [0]
        # The highest start position of a live stream: a sequenced message at or below
        # it may be older than some stream's start (the pub/sub link lags the commands).
        self._max_floor = [0]

    # Positions ---------------------------------------------------------------
    def set_position(self, epoch: str, seqs: Seqs, epochs: Sequence[str] = ()) -> None:
        """Adopt the broker's epoch and position (at start, and after a reconnect);
        ``epochs`` name each group's history when there are several."""
        named = [e.encode("ascii") for e in epochs or (epoch,)]
        if len(seqs) != self._groups:
            # The broker's groups (a cluster's first connect): everything starts here.
            self._groups = len(seqs)
            self._epochs = named
            self._epoch = epoch.encode("ascii")
            self._position, self._delivered = list(seqs), list(seqs)
            self._max_floor = [0] * len(seqs)
            return
        for group, seq in enumerate(seqs):
            if named[group] != self._epochs[group]:
                self._rename(group, named[group], seq)
            elif seq > self._position[group]:
                self._position[group] = seq

    def _rename(self, group: int, epoch: bytes, seq: int) -> None:
        """A group's history was replaced (a wiped Redis): its position starts over, and
        so do the live streams' starts there (the new history's seqs are all new)."""
        self._epochs[group] = epoch
        self._epoch = history_name([e.decode("ascii") for e in self._epochs]).encode("ascii")
        self._position[group] = self._delivered[group] = seq
        if self._max_floor[group]:
            self._max_floor[group] = 0
            for streams in self._users.values():
                for sub in streams:
                    floor = sub.floor
                    if len(floor) > group and floor[group]:
                        sub.floor = (*floor[:group], 0, *floor[group + 1 :])

    @property
    def epoch(self) -> str:
        return self._epoch.decode("ascii")

    @property
    def position(self) -> Seqs:
        return tuple(self._position)

    @property
    def delivered(self) -> Seqs:
        """The highest seqs that arrived over the pub/sub link (a plain PUBLISH came after)."""
        return tuple(self._delivered)

    def set_floor(self, sub: Subscriber, seqs: Seqs) -> None:
        """A live stream starts after ``seqs``: later-arriving messages at or below are old."""
        sub.floor = seqs
        max_floor = self._max_floor
        for group, seq in enumerate(seqs):
            if seq > max_floor[group]:
                max_floor[group] = seq

    def current_id(self) -> bytes:
        """The id of "now": every message this process has seen is at or before it."""
        return EventId(self.epoch, self.position, int(self._wall_clock())).encode()

    # Membership ------------------------------------------------------------
    def add(self, sub: Subscriber, channels: Iterable[str]) -> None:
        """Register ``sub`` and subscribe it to ``channels``."""
        if len(sub.floor) != self._groups:
            sub.floor = (0,) * self._groups  # its start, once live, replaces it
        streams = self._users.setdefault(sub.user_id, set())
        if sub not in streams:
            streams.add(sub)
            self._stream_count += 1
        self.update(sub, frozenset(channels))

    def remove(self, sub: Subscriber) -> None:
        """Forget ``sub``; channels left without local listeners are unsubscribed."""
        sub.move(State.CLOSED)
        self.update(sub, frozenset())
        streams = self._users.get(sub.user_id)
        if streams is not None and sub in streams:
            streams.remove(sub)
            self._stream_count -= 1
            if not streams:
                del self._users[sub.user_id]

    def update(self, sub: Subscriber, wanted: frozenset[str]) -> None:
        """Move ``sub`` to exactly the channels ``wanted``."""
        first: list[str] = []
        last: list[str] = []
        for channel in wanted - sub.channels:
            listeners = self._channels.get(channel)
            if listeners is None:
                self._channels[channel] = {sub: None}
                first.append(channel)
            else:
                listeners[sub] = None
        for channel in sub.channels - wanted:
            listeners = self._channels.get(channel)
            if listeners is None:
                continue
            listeners.pop(sub, None)
            if not listeners:
                del self._channels[channel]
                last.append(channel)
        sub.channels = wanted
        if last:
            self._sink.unsubscribe(last)
        if first:
            self._sink.subscribe(first)

    def stream_count(self) -> int:
        """How many streams this process holds (starting and live)."""
        return self._stream_count

    def count_of(self, user_id: str) -> int:
        """How many streams ``user_id`` holds in this process."""
        return len(self._users.get(user_id, ()))

    def streams_of(self, user_id: str) -> list[Subscriber]:
        return list(self._users.get(user_id, ()))

    def subscribers(self) -> list[Subscriber]:
        return [sub for subs in self._users.values() for sub in subs]

    def channels(self) -> list[str]:
        """Every channel with at least one local listener (what the broker must deliver)."""
        return list(self._channels)

    # Hot path --------------------------------------------------------------
    def dispatch(
        self,
        channel: str,
        payload: bytes,
        seq: int | None = None,
        epoch: bytes | None = None,
        time: int = 0,
    ) -> None:
        """A message arrived from the broker: encode it once, queue it for every listener.

        ``seq``/``epoch``/``time`` come with messages published through Sisyphus's own
        path. A plain PUBLISH has none: each stream gets it under the id it already
        holds, so nothing a plain PUBLISH carries can move a client's position.
        """
        self._metrics.messages_in += 1
        groups = self._groups
        group = 0
        if seq is not None and epoch is not None:
            if groups > 1:
                group = channel_group(channel, groups)
            if epoch != self._epochs[group]:
                self._rename(group, epoch, seq)
            else:
                if seq > self._position[group]:
                    self._position[group] = seq
                if seq > self._delivered[group]:
                    self._delivered[group] = seq
        listeners = self._channels.get(channel)
        if listeners:
            dirty = self._dirty
            if not dirty:
                self._schedule(self.flush)
            if not self._batch:
                self._batch_arrival = self._timer()
            self._batch += 1
            if seq is None:
                self._fan_out_plain(listeners, channel, payload)
            elif groups == 1:
                self._fan_out_sequenced(listeners, channel, payload, seq, time)
            else:
                self._fan_out_grouped(listeners, channel, payload, seq, time, group)
            self._metrics.messages_out += len(listeners)
            if self._overflowing:
                self._end_overflowing()
        user_id = user_of_channel(channel)
        if user_id is not None and user_id in self._users:
            # Forward first, then refresh rights: the notice itself reaches the client.
            if seq is None:
                at = tuple(self._delivered)
            elif groups == 1:
                at = (seq,)
            else:
                delivered = self._delivered
                at = (*delivered[:group], seq, *delivered[group + 1 :])
            try:
                self._on_user_message(user_id, at)
            except Exception:
                # The refresh's trouble is its own: delivery to everyone else goes on.
                log.exception("rights refresh failed to start user=%s", user_id)

    def _fan_out_sequenced(
        self, listeners: Listeners, channel: str, payload: bytes, seq: int, time: int
    ) -> None:
        """The hot path: one frame, the same bytes queued for every live listener."""
        event_id = b"%s-%d-%d" % (self._epoch, seq, time)
        frame = sse.encode_event(event_id, payload)
        json_frame = None  # encoded once, only if a JSON-flavour stream listens
        dirty = self._dirty
        maybe_old = seq <= self._max_floor[0]
        for sub in listeners:
            state = sub.state
            if state is State.LIVE:
                if maybe_old and seq <= sub.floor[0]:
                    continue  # published before this stream's start: never backwards
                sub.last_id = event_id
                pending = sub.pending
                if not pending:
                    dirty.append(sub)
                if sub.json_flavour:
                    if json_frame is None:
                        json_frame = sse.encode_json_message(event_id, channel, payload)
                    pending.append(json_frame)
                else:
                    pending.append(frame)
            elif state is not State.CLOSED:
                # STARTING or CATCHING_UP: held raw until the stream can write it in
                # order with what it replays.
                held = sub.held
                held.append(Held(event_id, seq, channel, payload, (seq,), 0, time))
                if len(held) > self._max_held:
                    self._overflowing.append(sub)

    def _fan_out_grouped(
        self,
        listeners: Listeners,
        channel: str,
        payload: bytes,
        seq: int,
        time: int,
        group: int,
    ) -> None:
        """Several sequence groups: the id carries this message's seq in its group and,
        in the others, what the process has delivered there, which every live stream has
        (all earlier messages there arrived, on links that keep their order). A stream
        that started after that in another group keeps its start there instead: the one
        case that needs a frame of its own."""
        seqs = list(self._delivered)
        seqs[group] = seq
        event_id = EventId(self.epoch, tuple(seqs), time).encode()
        frame = sse.encode_event(event_id, payload)
        json_frame = None
        dirty = self._dirty
        max_floor = self._max_floor
        maybe_old = seq <= max_floor[group]
        ahead = [g for g, floor in enumerate(max_floor) if g != group and floor > seqs[g]]
        for sub in listeners:
            state = sub.state
            if state is State.LIVE:
                floor = sub.floor
                if maybe_old and seq <= floor[group]:
                    continue  # published before this stream's start: never backwards
                pending = sub.pending
                if not pending:
                    dirty.append(sub)
                if ahead and any(floor[g] > seqs[g] for g in ahead):
                    own_id = EventId(self.epoch, later_of(tuple(seqs), floor), time).encode()
                    sub.last_id = own_id
                    if sub.json_flavour:
                        pending.append(sse.encode_json_message(own_id, channel, payload))
                    else:
                        pending.append(sse.encode_event(own_id, payload))
                    continue
                sub.last_id = event_id
                if sub.json_flavour:
                    if json_frame is None:
                        json_frame = sse.encode_json_message(event_id, channel, payload)
                    pending.append(json_frame)
                else:
                    pending.append(frame)
            elif state is not State.CLOSED:
                held = sub.held
                held.append(Held(event_id, seq, channel, payload, tuple(seqs), group, time))
                if len(held) > self._max_held:
                    self._overflowing.append(sub)

    def _fan_out_plain(self, listeners: Listeners, channel: str, payload: bytes) -> None:
        """A plain PUBLISH: each stream's own id, the frame encoded once per distinct id."""
        frames: dict[bytes, bytes] = {}
        json_frames: dict[bytes, bytes] = {}
        dirty = self._dirty
        position = tuple(self._delivered)
        last_id = b""
        frame = b""
        for sub in listeners:
            state = sub.state
            if state is State.LIVE:
                if sub.json_flavour:
                    json_frame = json_frames.get(sub.last_id)
                    if json_frame is None:
                        json_frame = sse.encode_json_message(sub.last_id, channel, payload)
                        json_frames[sub.last_id] = json_frame
                    out = json_frame
                else:
                    if sub.last_id is not last_id:  # streams often share one id object
                        last_id = sub.last_id
                        cached = frames.get(last_id)
                        if cached is None:
                            cached = frames[last_id] = sse.encode_event(last_id, payload)
                        frame = cached
                    out = frame
                pending = sub.pending
                if not pending:
                    dirty.append(sub)
                pending.append(out)
            elif state is not State.CLOSED:
                held = sub.held
                held.append(Held(b"", None, channel, payload, position))
                if len(held) > self._max_held:
                    self._overflowing.append(sub)

    def _end_overflowing(self) -> None:
        """End the streams that held too much (after the fan-out: it iterates the sets)."""
        overflowing, self._overflowing = self._overflowing, []
        for sub in overflowing:
            if sub.state is State.CLOSED or self._on_overflow is None:
                continue
            try:
                self._on_overflow(sub)
            except Exception:
                log.exception("ending an overflowing stream failed user=%s", sub.user_id)

    def push(self, sub: Subscriber, frame: bytes) -> None:
        """Queue one frame for one subscriber (keep-alives, statuses)."""
        if sub.state is State.CLOSED:
            return
        if not self._dirty:
            self._schedule(self.flush)
        if not sub.pending and sub.state in (State.LIVE, State.CATCHING_UP):
            self._dirty.append(sub)
        sub.pending.append(frame)

    def hold(self, sub: Subscriber) -> bool:
        """Start holding a live stream's messages (a rights refresh adds channels)."""
        return sub.move(State.CATCHING_UP)

    def release(
        self, sub: Subscriber, frames: list[bytes], last_id: bytes, keep: list[Held] | None = None
    ) -> None:
        """Queue ``frames`` after what was pending; go live again unless ``keep`` is given.

        ``keep`` (possibly empty) is what arrived after the next rights notice: the
        stream stays held, ``keep`` in order, for the next refresh pass, while
        ``frames`` are written now.
        """
        if sub.state is not State.CATCHING_UP:
            return
        if keep is None:
            sub.move(State.LIVE)
        sub.held = keep or []
        sub.last_id = last_id
        sub.pending.extend(frames)
        if sub.pending:
            if not self._dirty:
                self._schedule(self.flush)
            self._dirty.append(sub)  # a second flush of one stream finds nothing pending

    def flush(self) -> None:
        """Write each dirty subscriber's pending frames in one call."""
        dirty, self._dirty = self._dirty, []
        now = self._clock()
        for sub in dirty:
            try:
                if not sub.flush(now):
                    self._metrics.slow_client_cuts += 1
                    self._metrics.connections_closed += 1
                    log.info("slow client cut user=%s", sub.user_id)
            except Exception:
                # One broken connection must never stop delivery to the others.
                log.exception("write failed user=%s", sub.user_id)
        batch = self._batch
        if batch:
            # Once per flush, when every listener's transport has its messages' bytes.
            self._batch = 0
            elapsed = self._timer() - self._batch_arrival
            latency = self._metrics.delivery_latency
            latency.counts[bisect_left(latency.bounds, elapsed)] += batch
            latency.sum += elapsed * batch

    def sweep_keepalive(self, interval: float) -> int:
        """Queue a noop for every live stream silent for ``interval`` seconds; return how many."""
        deadline = self._clock() - interval
        count = 0
        for subs in self._users.values():
            for sub in subs:
                if sub.state is State.LIVE and sub.last_write <= deadline and not sub.pending:
                    self.push(sub, sse.encode_noop(sub.last_id, json_flavour=sub.json_flavour))
                    count += 1
        self._metrics.keepalives += count
        return count
