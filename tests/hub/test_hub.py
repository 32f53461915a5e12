"""Fan-out, reference counts, coalescing, slow clients and keep-alives (sisyphus.hub).

The hub is driven through its own seams: a fake transport records writes, a fake
sink records (un)subscriptions, ``schedule`` appends to a list that the test runs
as "the next loop iteration", and both clocks are values the test sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import pytest

from sisyphus.hub.hub import Hub
from sisyphus.hub.states import State
from sisyphus.hub.subscriber import Held, Subscriber
from sisyphus.metrics import Metrics
from sisyphus.protocol import sse
from sisyphus.protocol.resume import Seqs, channel_group, history_name

WALL = 1_700_000_000.75  # the wall clock, in seconds; ids carry int(WALL)
MAX_UNSENT = 1000
HEAD = b"HTTP/1.1 200 OK\r\n\r\n"


class FakeTransport:
    """Records what the hub writes; its buffer size and write failure are set by the test."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffer_size = 0
        self.fail: Exception | None = None
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffer_size

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class FakeSink:
    """Records the broker subscriptions the hub asks for, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def subscribe(self, channels: list[str]) -> None:
        self.calls.append(("subscribe", sorted(channels)))

    def unsubscribe(self, channels: list[str]) -> None:
        self.calls.append(("unsubscribe", sorted(channels)))


class World:
    """A hub with fake seams; ``run_loop`` runs what the hub scheduled, as one loop iteration."""

    def __init__(self) -> None:
        self.sink = FakeSink()
        self.scheduled: list[Callable[[], None]] = []
        self.now = 0.0
        self.wall = WALL
        self.metrics = Metrics()
        self.user_messages: list[tuple[str, Seqs]] = []
        self.on_user_message: Callable[[str, Seqs], None] = self._record_user_message
        self.hub = Hub(
            sink=self.sink,
            schedule=self.scheduled.append,
            clock=lambda: self.now,
            metrics=self.metrics,
            on_user_message=lambda user_id, position: self.on_user_message(user_id, position),
            wall_clock=lambda: self.wall,
        )

    def _record_user_message(self, user_id: str, position: Seqs) -> None:
        self.user_messages.append((user_id, position))

    def run_loop(self) -> None:
        callbacks, self.scheduled[:] = list(self.scheduled), []
        for callback in callbacks:
            callback()

    def starting(
        self,
        channels: Iterable[str],
        user_id: str = "1",
        json_flavour: bool = False,
    ) -> tuple[Subscriber, FakeTransport]:
        """A stream that is identified and subscribing, not yet live."""
        transport = FakeTransport()
        sub = Subscriber(
            transport, user_id, b"0-0-0", MAX_UNSENT, self.now, json_flavour=json_flavour
        )
        self.hub.add(sub, channels)
        return sub, transport

    def live(
        self,
        channels: Iterable[str],
        user_id: str = "1",
        json_flavour: bool = False,
        last_id: bytes = b"ep-0-0",
    ) -> tuple[Subscriber, FakeTransport]:
        """A live stream whose head was written; its transport's writes start empty."""
        sub, transport = self.starting(channels, user_id, json_flavour=json_flavour)
        sub.go_live(HEAD, last_id, self.now)
        assert transport.writes == [HEAD]
        transport.writes.clear()
        return sub, transport


@pytest.fixture
def world() -> World:
    return World()


def frame(event_id: bytes, payload: bytes) -> bytes:
    return sse.encode_event(event_id, payload)


# Dispatch: encode once, write to all --------------------------------------------------


def test_dispatch_writes_one_encoded_frame_to_every_listener(world: World) -> None:
    """Every listener of a channel gets the event, encoded once: the very same bytes object."""
    transports = [world.live(["room:1"], user_id=str(i))[1] for i in range(5)]
    world.hub.dispatch("room:1", b"hello", seq=5, epoch=b"ep", time=1700)
    world.run_loop()
    written = [t.writes for t in transports]
    assert all(len(w) == 1 for w in written)
    first = written[0][0]
    assert first == b"id: ep-5-1700\ndata: hello\n\n"
    assert all(w[0] is first for w in written)


def test_a_broadcast_writes_to_streams_in_the_order_they_subscribed(world: World) -> None:
    """Writes go out in the order streams subscribed (the order their sockets were
    opened), not in an order of memory addresses, which made a broadcast's p99 markedly
    slower (docs/performance.md)."""
    order: list[int] = []
    streams = []
    for i in range(300):
        sub, transport = world.live(["room:1"], user_id=str(i))
        transport.write = lambda data, i=i: order.append(i)  # type: ignore[method-assign]
        streams.append(sub)
    world.hub.remove(streams[7])  # a stream that closed, and a new one opened since
    _, transport = world.live(["room:1"], user_id="300")
    transport.write = lambda data: order.append(300)  # type: ignore[method-assign]
    world.hub.dispatch("room:1", b"hello", seq=5, epoch=b"ep", time=1700)
    world.run_loop()
    assert order == [i for i in range(301) if i != 7]


def test_dispatch_encodes_once(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many listeners a channel has, the event is encoded once."""
    calls: list[bytes] = []
    real = sse.encode_event

    def counting(event_id: bytes, payload: bytes, *args: object, **kwargs: object) -> bytes:
        calls.append(payload)
        return real(event_id, payload, *args, **kwargs)  # type: ignore[arg-type]

    for i in range(10):
        world.live(["room:1"], user_id=str(i))
    monkeypatch.setattr(sse, "encode_event", counting)
    world.hub.dispatch("room:1", b"x", seq=1, epoch=b"ep")
    world.run_loop()
    assert calls == [b"x"]


def test_nothing_is_written_before_the_loop_runs(world: World) -> None:
    """Dispatch only queues; the write happens in the scheduled flush."""
    _, transport = world.live(["room:1"])
    world.hub.dispatch("room:1", b"x")
    assert transport.writes == []
    assert len(world.scheduled) == 1
    world.run_loop()
    assert len(transport.writes) == 1


def test_plain_publish_repeats_each_streams_own_id(world: World) -> None:
    """A plain PUBLISH carries the id each stream already holds: it never moves a position."""
    _, first = world.live(["room:1"], last_id=b"ep-3-10")
    _, second = world.live(["room:1"], user_id="2", last_id=b"ep-5-12")
    world.hub.dispatch("room:1", b"a")
    world.hub.set_position("ep", (9,))
    world.hub.dispatch("room:1", b"b")
    world.hub.dispatch("room:1", b"c", seq=10, epoch=b"ep", time=20)
    world.hub.dispatch("room:1", b"d")
    world.run_loop()
    assert first.writes == [
        frame(b"ep-3-10", b"a") + frame(b"ep-3-10", b"b")
        + frame(b"ep-10-20", b"c") + frame(b"ep-10-20", b"d")
    ]  # fmt: skip
    assert second.writes == [
        frame(b"ep-5-12", b"a") + frame(b"ep-5-12", b"b")
        + frame(b"ep-10-20", b"c") + frame(b"ep-10-20", b"d")
    ]  # fmt: skip


def test_own_publish_moves_the_position(world: World) -> None:
    """A message published through Sisyphus sets the hub's epoch and position."""
    world.hub.dispatch("room:nobody", b"x", seq=12, epoch=b"ab")
    assert (world.hub.epoch, world.hub.position) == ("ab", (12,))
    assert world.hub.current_id() == b"ab-12-1700000000"


def test_multi_line_payload_is_split_into_data_lines(world: World) -> None:
    """A multi-line payload reaches the client as one data line per line."""
    _, transport = world.live(["room:1"])
    world.hub.dispatch("room:1", b"a\r\nb\nc", seq=1, epoch=b"ep", time=2)
    world.run_loop()
    assert transport.writes == [b"id: ep-1-2\ndata: a\ndata: b\ndata: c\n\n"]


def test_dispatch_moves_each_listeners_last_id(world: World) -> None:
    """Each live listener remembers the id of the last event it was given."""
    sub, _ = world.live(["room:1"])
    other, _ = world.live(["room:2"], last_id=b"ep-0-0")
    world.hub.dispatch("room:1", b"x", seq=3, epoch=b"ep", time=4)
    assert sub.last_id == b"ep-3-4"
    assert other.last_id == b"ep-0-0"


# Coalescing ------------------------------------------------------------------------------


def test_several_dispatches_in_one_iteration_make_one_write(world: World) -> None:
    """Events arriving in one loop iteration reach each client in ONE write, in order."""
    _, both = world.live(["room:1", "room:2"], user_id="a")
    _, only_one = world.live(["room:1"], user_id="b")
    world.hub.dispatch("room:1", b"one", seq=1, epoch=b"ep", time=0)
    world.hub.dispatch("room:2", b"two", seq=2, epoch=b"ep", time=0)
    world.hub.dispatch("room:1", b"three", seq=3, epoch=b"ep", time=0)
    assert len(world.scheduled) == 1
    world.run_loop()
    assert both.writes == [
        frame(b"ep-1-0", b"one") + frame(b"ep-2-0", b"two") + frame(b"ep-3-0", b"three")
    ]
    assert only_one.writes == [frame(b"ep-1-0", b"one") + frame(b"ep-3-0", b"three")]


def test_next_iteration_makes_a_new_write(world: World) -> None:
    """After a flush, the next event is scheduled and written on its own."""
    _, transport = world.live(["room:1"])
    world.hub.dispatch("room:1", b"a", seq=1, epoch=b"ep")
    world.run_loop()
    world.hub.dispatch("room:1", b"b", seq=2, epoch=b"ep")
    assert len(world.scheduled) == 1
    world.run_loop()
    assert transport.writes == [frame(b"ep-1-0", b"a"), frame(b"ep-2-0", b"b")]


def test_pushed_frames_coalesce_with_messages(world: World) -> None:
    """A status pushed in the same iteration as a message goes out in the same write."""
    sub, transport = world.live(["room:1"])
    world.hub.dispatch("room:1", b"a", seq=1, epoch=b"ep")
    status = sse.encode_status(b"ep-1-0", sse.Status.DISCONNECTED, 60000)
    world.hub.push(sub, status)
    assert len(world.scheduled) == 1
    world.run_loop()
    assert transport.writes == [frame(b"ep-1-0", b"a") + status]


def test_flush_updates_last_write(world: World) -> None:
    """A write marks the stream as recently active for the keep-alive sweep."""
    sub, _ = world.live(["room:1"])
    world.now = 42.0
    world.hub.dispatch("room:1", b"a")
    world.run_loop()
    assert sub.last_write == 42.0


# Starting streams --------------------------------------------------------------------------


def test_starting_stream_holds_events_until_it_goes_live(world: World) -> None:
    """While a stream starts, events are held raw; going live writes head and them in one write."""
    sub, transport = world.starting(["room:1", "room:2"])
    world.hub.dispatch("room:1", b"a", seq=1, epoch=b"ep", time=10)
    world.hub.dispatch("room:2", b"b")
    world.run_loop()
    assert transport.writes == []
    assert sub.pending == []
    assert sub.held == [
        Held(b"ep-1-10", 1, "room:1", b"a", (1,), 0, 10),
        Held(b"", None, "room:2", b"b", (1,)),
    ]
    assert sub.last_id == b"0-0-0"

    first = HEAD + frame(b"ep-1-10", b"a") + frame(b"ep-1-10", b"b")
    sub.go_live(first, b"ep-1-10", world.now)
    assert transport.writes == [HEAD + frame(b"ep-1-10", b"a") + frame(b"ep-1-10", b"b")]
    assert sub.state is State.LIVE
    assert sub.last_id == b"ep-1-10"


def test_frames_pushed_while_starting_follow_the_head_in_the_same_write(world: World) -> None:
    """A status queued during the handshake goes out right after the head, in one write."""
    sub, transport = world.starting(["room:1"])
    status = sse.encode_status(b"ep-0-0", sse.Status.RESET)
    world.hub.push(sub, status)
    world.run_loop()
    assert transport.writes == []
    sub.go_live(HEAD, b"ep-0-0", world.now)
    assert transport.writes == [HEAD + status]


def test_a_stream_gone_live_receives_later_events(world: World) -> None:
    """Once live, the stream gets events like any other."""
    sub, transport = world.starting(["room:1"])
    sub.go_live(HEAD, b"ep-0-0", world.now)
    world.hub.dispatch("room:1", b"a", seq=1, epoch=b"ep")
    world.run_loop()
    assert transport.writes == [HEAD, frame(b"ep-1-0", b"a")]


def test_starting_stream_still_subscribes_its_channels(world: World) -> None:
    """The broker is asked for a starting stream's channels, so nothing is missed meanwhile."""
    world.starting(["room:1", "user:1"])
    assert world.sink.calls == [("subscribe", ["room:1", "user:1"])]


# Reference counting and membership -----------------------------------------------------------


def test_first_listener_subscribes_and_last_unsubscribes(world: World) -> None:
    """The broker hears of a channel once for its first local listener and once when it's left."""
    a, _ = world.live(["room:1"], user_id="a")
    assert world.sink.calls == [("subscribe", ["room:1"])]
    b, _ = world.live(["room:1"], user_id="b")
    c, _ = world.live(["room:1"], user_id="c")
    assert world.sink.calls == [("subscribe", ["room:1"])]
    world.hub.remove(a)
    world.hub.remove(b)
    assert world.sink.calls == [("subscribe", ["room:1"])]
    assert world.hub.channels() == ["room:1"]
    world.hub.remove(c)
    assert world.sink.calls == [("subscribe", ["room:1"]), ("unsubscribe", ["room:1"])]
    assert world.hub.channels() == []


def test_subscribing_again_after_the_last_listener_left(world: World) -> None:
    """A channel dropped by its last listener is subscribed again for a new one."""
    a, _ = world.live(["room:1"])
    world.hub.remove(a)
    world.live(["room:1"])
    assert world.sink.calls == [
        ("subscribe", ["room:1"]),
        ("unsubscribe", ["room:1"]),
        ("subscribe", ["room:1"]),
    ]


def test_one_subscribe_call_for_all_new_channels(world: World) -> None:
    """A stream's new channels reach the broker in one batch."""
    world.live(["room:1", "room:2", "user:1"])
    world.live(["room:2", "room:3", "user:2"], user_id="2")
    assert world.sink.calls == [
        ("subscribe", ["room:1", "room:2", "user:1"]),
        ("subscribe", ["room:3", "user:2"]),
    ]


def test_update_subscribes_added_and_unsubscribes_removed(world: World) -> None:
    """A rights change drops only channels nobody else listens to and adds only new ones."""
    sub, _ = world.live(["a:1", "b:1", "c:1", "shared:1"], user_id="1")
    world.live(["shared:1"], user_id="2")
    world.sink.calls.clear()
    world.hub.update(sub, frozenset({"b:1", "c:1", "d:1", "e:1"}))
    assert world.sink.calls == [
        ("unsubscribe", ["a:1"]),
        ("subscribe", ["d:1", "e:1"]),
    ]
    assert sub.channels == {"b:1", "c:1", "d:1", "e:1"}
    assert sorted(world.hub.channels()) == ["b:1", "c:1", "d:1", "e:1", "shared:1"]


def test_update_to_the_same_channels_changes_nothing(world: World) -> None:
    """A refresh that finds the same rights makes no broker call."""
    sub, _ = world.live(["room:1", "user:1"])
    world.sink.calls.clear()
    world.hub.update(sub, frozenset({"room:1", "user:1"}))
    assert world.sink.calls == []


def test_update_to_no_channels_unsubscribes_everything(world: World) -> None:
    """A stream moved to no channel releases every channel it alone held."""
    sub, _ = world.live(["room:1", "room:2"])
    world.sink.calls.clear()
    world.hub.update(sub, frozenset())
    assert world.sink.calls == [("unsubscribe", ["room:1", "room:2"])]
    assert world.hub.channels() == []


def test_removed_channel_no_longer_delivers(world: World) -> None:
    """After a refresh drops a channel, nothing published on it reaches the stream."""
    sub, transport = world.live(["room:1", "room:2"])
    world.hub.update(sub, frozenset({"room:2"}))
    world.hub.dispatch("room:1", b"secret")
    world.hub.dispatch("room:2", b"ok", seq=1, epoch=b"ep")
    world.run_loop()
    assert transport.writes == [frame(b"ep-1-0", b"ok")]


def test_added_channel_delivers(world: World) -> None:
    """After a refresh adds a channel, messages on it reach the stream."""
    sub, transport = world.live(["room:1"])
    world.hub.update(sub, frozenset({"room:1", "room:2"}))
    world.hub.dispatch("room:2", b"new", seq=1, epoch=b"ep")
    world.run_loop()
    assert transport.writes == [frame(b"ep-1-0", b"new")]


def test_messages_on_other_channels_never_arrive(world: World) -> None:
    """A stream gets nothing published on a channel it doesn't read."""
    _, mine = world.live(["room:1"], user_id="a")
    _, theirs = world.live(["room:2"], user_id="b")
    world.hub.dispatch("room:2", b"for b", seq=1, epoch=b"ep")
    world.hub.dispatch("user:b", b"for b too")
    world.hub.dispatch("room:3", b"for nobody")
    world.run_loop()
    assert mine.writes == []
    assert theirs.writes == [frame(b"ep-1-0", b"for b")]


def test_message_without_listeners_schedules_nothing(world: World) -> None:
    """A message on a channel no local stream reads costs no write and no flush."""
    world.live(["room:1"])
    world.hub.dispatch("room:9", b"x")
    assert world.scheduled == []
    assert world.metrics.messages_in == 1
    assert world.metrics.messages_out == 0


def test_removed_stream_gets_nothing(world: World) -> None:
    """A stream removed from the hub is closed and gets no further events."""
    sub, transport = world.live(["room:1"])
    world.live(["room:1"], user_id="2")
    world.hub.remove(sub)
    assert sub.state is State.CLOSED
    world.hub.dispatch("room:1", b"x")
    world.hub.push(sub, b"late status")
    world.run_loop()
    assert transport.writes == []


def test_stream_counts(world: World) -> None:
    """The hub counts streams in total and per user, starting and live alike."""
    a1, _ = world.live(["room:1"], user_id="a")
    a2, _ = world.starting(["room:1"], user_id="a")
    b1, _ = world.live(["room:2"], user_id="b")
    assert world.hub.stream_count() == 3
    assert world.hub.count_of("a") == 2
    assert world.hub.count_of("b") == 1
    assert world.hub.count_of("nobody") == 0
    assert set(world.hub.streams_of("a")) == {a1, a2}
    assert world.hub.streams_of("nobody") == []
    assert set(world.hub.subscribers()) == {a1, a2, b1}
    world.hub.remove(a1)
    world.hub.remove(a2)
    assert world.hub.stream_count() == 1
    assert world.hub.count_of("a") == 0
    assert world.hub.subscribers() == [b1]


def test_adding_a_stream_twice_counts_it_once(world: World) -> None:
    """Adding a known stream again only moves it to the new channels."""
    sub, _ = world.live(["room:1"])
    world.hub.add(sub, ["room:2"])
    assert world.hub.stream_count() == 1
    assert world.hub.count_of("1") == 1
    assert sub.channels == {"room:2"}
    assert world.sink.calls == [
        ("subscribe", ["room:1"]),
        ("unsubscribe", ["room:1"]),
        ("subscribe", ["room:2"]),
    ]


def test_removing_a_stream_twice_is_harmless(world: World) -> None:
    """A stream removed twice (close races) counts down once and calls the broker once."""
    sub, _ = world.live(["room:1"])
    world.hub.remove(sub)
    world.hub.remove(sub)
    assert world.hub.stream_count() == 0
    assert world.sink.calls == [("subscribe", ["room:1"]), ("unsubscribe", ["room:1"])]


# Positions -----------------------------------------------------------------------------


def test_set_position_only_moves_forward_within_an_epoch(world: World) -> None:
    """Within one epoch the position never goes back; a new epoch is adopted as it is."""
    world.hub.set_position("ep", (10,))
    world.hub.set_position("ep", (4,))
    assert (world.hub.epoch, world.hub.position) == ("ep", (10,))
    world.hub.set_position("ep", (11,))
    assert world.hub.position == (11,)
    world.hub.set_position("new", (2,))
    assert (world.hub.epoch, world.hub.position) == ("new", (2,))
    assert world.hub.current_id() == b"new-2-1700000000"


def test_initial_position(world: World) -> None:
    """Before the broker tells its position, ids are `0-0-<wall time>`."""
    assert (world.hub.epoch, world.hub.position) == ("0", (0,))
    assert world.hub.current_id() == b"0-0-1700000000"


# Rights notices on user channels ------------------------------------------------------------


def test_user_message_triggers_refresh_after_it_is_queued(world: World) -> None:
    """A message on `user:<id>` is queued for the user first, then its rights are refreshed."""
    sub, transport = world.live(["user:42", "room:1"], user_id="42")
    seen: list[tuple[str, Seqs, list[bytes]]] = []
    world.on_user_message = lambda user_id, position: seen.append(
        (user_id, position, list(sub.pending))
    )
    world.hub.dispatch("user:42", b'{"rights": "grant"}', seq=7, epoch=b"ep", time=1)
    notice = frame(b"ep-7-1", b'{"rights": "grant"}')
    assert seen == [("42", (7,), [notice])]
    world.run_loop()
    assert transport.writes == [notice]


def test_user_message_for_a_user_without_local_stream_is_ignored(world: World) -> None:
    """A rights notice for a user with no stream here refreshes nothing."""
    world.live(["user:42"], user_id="42")
    world.hub.dispatch("user:43", b"x")
    world.hub.dispatch("room:42", b"x")
    world.hub.dispatch("users:42", b"x")
    assert world.user_messages == []


def test_user_message_after_the_users_last_stream_left(world: World) -> None:
    """Once a user's last stream is gone here, its notices trigger no refresh."""
    sub, _ = world.live(["user:42"], user_id="42")
    world.hub.remove(sub)
    world.hub.dispatch("user:42", b"x")
    assert world.user_messages == []


def test_user_message_refreshes_a_starting_stream_too(world: World) -> None:
    """A rights change during the handshake is not lost: the refresh runs for starting streams."""
    world.starting(["user:42"], user_id="42")
    world.hub.dispatch("user:42", b"x", seq=3, epoch=b"ep")
    assert world.user_messages == [("42", (3,))]


def test_user_message_refresh_runs_once_per_message(world: World) -> None:
    """A user with several streams is refreshed once per notice, with the current position."""
    world.live(["user:42"], user_id="42")
    world.live(["user:42"], user_id="42")
    world.hub.set_position("ep", (5,))
    world.hub.dispatch("user:42", b"x")
    world.hub.dispatch("user:42", b"y", seq=6, epoch=b"ep")
    assert world.user_messages == [("42", (5,)), ("42", (6,))]


# Slow and broken clients ---------------------------------------------------------------------


def test_slow_client_is_cut_and_counted(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A client whose unsent bytes exceed the bound is aborted; the others still get the event."""
    slow_sub, slow = world.live(["room:1"], user_id="slow")
    _, fast = world.live(["room:1"], user_id="fast")
    slow.buffer_size = MAX_UNSENT + 1
    with caplog.at_level(logging.INFO, logger="sisyphus.hub"):
        world.hub.dispatch("room:1", b"x", seq=1, epoch=b"ep")
        world.run_loop()
    assert slow.aborted
    assert slow_sub.state is State.CLOSED
    assert world.metrics.slow_client_cuts == 1
    assert fast.writes == [frame(b"ep-1-0", b"x")]
    assert not fast.aborted
    assert "slow client cut user=slow" in caplog.text


def test_cut_client_gets_nothing_more(world: World) -> None:
    """After a slow client is cut, later events and keep-alives skip it."""
    _, slow = world.live(["room:1"])
    slow.buffer_size = MAX_UNSENT + 1
    world.hub.dispatch("room:1", b"a")
    world.run_loop()
    world.hub.dispatch("room:1", b"b")
    world.now = 1000.0
    assert world.hub.sweep_keepalive(15.0) == 0
    world.run_loop()
    assert len(slow.writes) == 1
    assert world.metrics.slow_client_cuts == 1


def test_buffer_at_the_bound_is_not_cut(world: World) -> None:
    """A client holding exactly the allowed unsent bytes keeps its stream."""
    sub, transport = world.live(["room:1"])
    transport.buffer_size = MAX_UNSENT
    world.hub.dispatch("room:1", b"a")
    world.run_loop()
    assert not transport.aborted
    assert sub.state is State.LIVE
    assert world.metrics.slow_client_cuts == 0


def test_failing_write_does_not_stop_delivery(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection whose write raises is logged; every other client still gets the event."""
    broken = [world.live(["room:1"], user_id=f"broken{i}")[1] for i in range(3)]
    for transport in broken:
        transport.fail = OSError("connection gone")
    healthy = [world.live(["room:1"], user_id=f"ok{i}")[1] for i in range(5)]
    with caplog.at_level(logging.ERROR, logger="sisyphus.hub"):
        world.hub.dispatch("room:1", b"x", seq=1, epoch=b"ep")
        world.run_loop()
    assert all(t.writes == [frame(b"ep-1-0", b"x")] for t in healthy)
    assert all(t.writes == [] for t in broken)
    assert caplog.text.count("write failed") == 3


def test_failing_write_drops_the_frames_instead_of_piling_them_up(world: World) -> None:
    """A broken connection's frames are dropped, and the next event still reaches the others."""
    sub, broken = world.live(["room:1"])
    broken.fail = RuntimeError("boom")
    _, healthy = world.live(["room:1"], user_id="2")
    world.hub.dispatch("room:1", b"a", seq=1, epoch=b"ep")
    world.run_loop()
    assert sub.pending == []
    world.hub.dispatch("room:1", b"b", seq=2, epoch=b"ep")
    world.run_loop()
    assert healthy.writes == [frame(b"ep-1-0", b"a"), frame(b"ep-2-0", b"b")]


# Keep-alives --------------------------------------------------------------------------------


def test_keepalive_only_for_silent_streams(world: World) -> None:
    """A noop with the stream's last id goes only to streams silent for the interval."""
    _, silent = world.live(["room:1"], user_id="silent", last_id=b"ep-3-100")
    _, busy = world.live(["room:2"], user_id="busy")
    world.now = 10.0
    world.hub.dispatch("room:2", b"x", seq=4, epoch=b"ep", time=110)
    world.run_loop()
    busy.writes.clear()

    world.now = 16.0
    assert world.hub.sweep_keepalive(15.0) == 1
    assert world.metrics.keepalives == 1
    world.run_loop()
    assert silent.writes == [b"id: ep-3-100\ndata: noop\n\n"]
    assert busy.writes == []


def test_keepalive_does_not_move_the_position(world: World) -> None:
    """The noop reuses the last id, so a client resuming after it misses nothing."""
    sub, transport = world.live(["room:1"], last_id=b"ep-3-100")
    world.hub.dispatch("room:1", b"m", seq=8, epoch=b"ep", time=200)
    world.run_loop()
    world.now = 100.0
    world.hub.sweep_keepalive(15.0)
    world.run_loop()
    assert transport.writes[-1] == b"id: ep-8-200\ndata: noop\n\n"
    assert sub.last_id == b"ep-8-200"


def test_keepalive_at_exactly_the_interval(world: World) -> None:
    """A stream silent for exactly the interval gets its noop."""
    world.live(["room:1"])
    world.now = 15.0
    assert world.hub.sweep_keepalive(15.0) == 1


def test_keepalive_resets_the_silence(world: World) -> None:
    """After a noop is written, the next sweep within the interval sends nothing."""
    _, transport = world.live(["room:1"])
    world.now = 20.0
    world.hub.sweep_keepalive(15.0)
    world.run_loop()
    world.now = 30.0
    assert world.hub.sweep_keepalive(15.0) == 0
    world.now = 35.0
    assert world.hub.sweep_keepalive(15.0) == 1
    world.run_loop()
    assert len(transport.writes) == 2


def test_keepalive_skips_streams_with_pending_frames(world: World) -> None:
    """A stream about to be written to this iteration needs no noop on top."""
    _, transport = world.live(["room:1"])
    world.now = 100.0
    world.hub.dispatch("room:1", b"x", seq=1, epoch=b"ep")
    assert world.hub.sweep_keepalive(15.0) == 0
    world.run_loop()
    assert transport.writes == [frame(b"ep-1-0", b"x")]


def test_keepalive_skips_starting_streams(world: World) -> None:
    """A stream still starting gets no noop before its head."""
    _, transport = world.starting(["room:1"])
    world.now = 100.0
    assert world.hub.sweep_keepalive(15.0) == 0
    world.run_loop()
    assert transport.writes == []


def test_keepalive_json_flavour(world: World) -> None:
    """A JSON-flavour stream's keep-alive is a named `noop` event."""
    _, transport = world.live(["room:1"], json_flavour=True, last_id=b"ep-1-1")
    world.now = 100.0
    world.hub.sweep_keepalive(15.0)
    world.run_loop()
    assert transport.writes == [b"id: ep-1-1\nevent: noop\ndata: {}\n\n"]


def test_keepalives_coalesce_into_one_flush(world: World) -> None:
    """One sweep over many silent streams schedules one flush, one write each."""
    transports = [world.live(["room:1"], user_id=str(i))[1] for i in range(4)]
    world.now = 100.0
    assert world.hub.sweep_keepalive(15.0) == 4
    assert len(world.scheduled) == 1
    world.run_loop()
    assert all(t.writes == [b"id: ep-0-0\ndata: noop\n\n"] for t in transports)


# JSON flavour and metrics ------------------------------------------------------------------


def test_json_flavour_streams_share_one_json_frame(world: World) -> None:
    """JSON-flavour streams get `{"channel", "data"}`, encoded once; XML streams the plain frame."""
    _, plain = world.live(["room:1"], user_id="p")
    _, json_a = world.live(["room:1"], user_id="a", json_flavour=True)
    _, json_b = world.live(["room:1"], user_id="b", json_flavour=True)
    world.hub.dispatch("room:1", b"hi\nthere", seq=2, epoch=b"ep", time=3)
    world.run_loop()
    assert plain.writes == [b"id: ep-2-3\ndata: hi\ndata: there\n\n"]
    assert json_a.writes == [b'id: ep-2-3\ndata: {"channel":"room:1","data":"hi\\nthere"}\n\n']
    assert json_a.writes[0] is json_b.writes[0]


def test_message_counters(world: World) -> None:
    """Every message in is counted, and every delivery to a listener out."""
    world.live(["room:1"], user_id="a")
    world.live(["room:1"], user_id="b")
    world.live(["room:2"], user_id="c")
    world.hub.dispatch("room:1", b"x")
    world.hub.dispatch("room:2", b"x")
    world.hub.dispatch("room:3", b"x")
    assert world.metrics.messages_in == 3
    assert world.metrics.messages_out == 3


# Subscriber on its own -----------------------------------------------------------------------


def test_subscriber_flush_with_nothing_pending_writes_nothing() -> None:
    """An idle stream makes no empty write."""
    transport = FakeTransport()
    sub = Subscriber(transport, "1", b"0-0-0", MAX_UNSENT, 0.0)
    sub.state = State.LIVE
    assert sub.flush(5.0) is True
    assert transport.writes == []
    assert sub.last_write == 0.0


def test_subscriber_single_frame_is_written_as_is() -> None:
    """A lone pending frame is written without copying it."""
    transport = FakeTransport()
    sub = Subscriber(transport, "1", b"0-0-0", MAX_UNSENT, 0.0)
    sub.state = State.LIVE
    data = b"id: 1\ndata: x\n\n"
    sub.pending.append(data)
    assert sub.flush(1.0) is True
    assert transport.writes[0] is data


def test_subscriber_go_live_may_exceed_the_bound_once() -> None:
    """The first write (head, ok, a replay) isn't cut; the next write over the bound is."""
    transport = FakeTransport()
    transport.buffer_size = MAX_UNSENT + 1
    sub = Subscriber(transport, "1", b"0-0-0", MAX_UNSENT, 0.0)
    sub.go_live(HEAD, b"ep-0-0", 0.0)
    assert not transport.aborted
    assert sub.state is State.LIVE
    sub.pending.append(b"more")
    assert sub.flush(1.0) is False
    assert transport.aborted
    assert sub.state is State.CLOSED


def test_a_stream_that_holds_too_much_is_ended_and_the_others_go_on() -> None:
    """Past the hold bound a starting stream is handed to on_overflow; live ones still get all."""
    ended: list[Subscriber] = []
    scheduled: list[Callable[[], None]] = []
    hub = Hub(FakeSink(), scheduled.append, lambda: 0.0, Metrics(), lambda u, p: None,
              lambda: WALL, max_held=3, on_overflow=ended.append)  # fmt: skip
    starting = Subscriber(FakeTransport(), "1", b"ep-0-0", MAX_UNSENT, 0.0)
    hub.add(starting, ["room:1"])
    live_transport = FakeTransport()
    live = Subscriber(live_transport, "2", b"ep-0-0", MAX_UNSENT, 0.0)
    hub.add(live, ["room:1"])
    live.go_live(b"", b"ep-0-0", 0.0)
    for seq in range(1, 5):
        hub.dispatch("room:1", b"m%d" % seq, seq=seq, epoch=b"ep", time=1)
    for callback in scheduled:
        callback()
    assert ended == [starting]
    assert live_transport.writes[-1].count(b"data: m") == 4


# Several sequence groups (a Redis Cluster) -------------------------------------------------


def grouped_channel(group: int) -> str:
    return next(f"room:{n}" for n in range(100) if channel_group(f"room:{n}", 3) == group)


def three_groups(world: World) -> str:
    """The hub on three groups named e0, e1, e2; returns the ids' epoch."""
    epoch = history_name(["e0", "e1", "e2"])
    world.hub.set_position(epoch, (0, 0, 0), ("e0", "e1", "e2"))
    return epoch


def test_an_id_holds_what_the_process_delivered_in_the_other_groups(world: World) -> None:
    epoch = three_groups(world)
    first, second = grouped_channel(0), grouped_channel(1)
    transports = [world.live([first, second], user_id=str(i))[1] for i in range(3)]
    world.hub.dispatch(second, b"b", seq=10, epoch=b"e1", time=7)
    world.hub.dispatch(first, b"a", seq=5, epoch=b"e0", time=8)
    world.run_loop()
    expected = frame(f"{epoch}-0.10.0-7".encode(), b"b") + frame(f"{epoch}-5.10.0-8".encode(), b"a")
    assert all(b"".join(t.writes) == expected for t in transports)


def test_a_stream_that_started_ahead_in_another_group_keeps_its_start_there(
    world: World,
) -> None:
    """Its start (its floor) is after what the link delivered in group 1 so far: its ids
    keep the start there, never going backwards; the others share one frame."""
    epoch = three_groups(world)
    channel = grouped_channel(0)
    ahead, ahead_transport = world.live([channel], user_id="1")
    world.hub.set_floor(ahead, (0, 50, 0))
    others = [world.live([channel], user_id=str(i))[1] for i in range(2, 4)]
    world.hub.dispatch(channel, b"x", seq=3, epoch=b"e0", time=9)
    world.run_loop()
    assert ahead_transport.writes == [frame(f"{epoch}-3.50.0-9".encode(), b"x")]
    shared = [t.writes[0] for t in others]
    assert shared[0] == frame(f"{epoch}-3.0.0-9".encode(), b"x") and shared[0] is shared[1]


def test_a_groups_history_replaced_renames_the_ids(world: World) -> None:
    three_groups(world)
    channel = grouped_channel(2)
    _, transport = world.live([channel])
    world.hub.dispatch(channel, b"x", seq=1, epoch=b"new", time=9)
    world.run_loop()
    renamed = history_name(["e0", "e1", "new"])
    assert world.hub.epoch == renamed
    assert transport.writes == [frame(f"{renamed}-0.0.1-9".encode(), b"x")]


def test_a_history_replaced_under_live_streams_reaches_them_from_its_first_message(
    world: World,
) -> None:
    """A wiped Redis (new epoch, seqs from 1 again) while streams stay open: the new
    history's messages are all new to them, whatever their start in the old one."""
    world.hub.set_position("ep", (0,))
    sub, transport = world.live(["room:1"], last_id=b"ep-40-1")
    world.hub.set_floor(sub, (40,))
    world.hub.dispatch("room:1", b"after the wipe", seq=1, epoch=b"new", time=2)
    world.run_loop()
    assert transport.writes == [frame(b"new-1-2", b"after the wipe")]
