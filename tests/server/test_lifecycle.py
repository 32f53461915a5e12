"""Ending streams (sisyphus.server.lifecycle): from any state, never raising, ids of the client.

Streams are built with the production constructors (Hub, Subscriber, Lifecycle)
on a transport that records writes and can be told to fail.
"""

from __future__ import annotations

import pytest

from sisyphus.config import Settings
from sisyphus.hub.hub import Hub
from sisyphus.hub.states import State
from sisyphus.hub.subscriber import Subscriber
from sisyphus.metrics import Metrics
from sisyphus.protocol import sse
from sisyphus.server.lifecycle import EXPIRY_SLACK, Lifecycle
from tests.hub.test_hub import FakeSink, FakeTransport

HEAD = b"HTTP/1.1 200 OK\r\n\r\n"
CLIENT_ID = b"ep-7-100"


class World:
    def __init__(self) -> None:
        self.scheduled: list[object] = []
        self.wall = 1_000.0
        self.metrics = Metrics()
        self.hub = Hub(FakeSink(), self.scheduled.append, lambda: 0.0, self.metrics,
                       lambda user, position: None, lambda: self.wall)  # fmt: skip
        self.lifecycle = Lifecycle(Settings(), self.hub, self.metrics, lambda: self.wall)

    def stream(self, state: State, expires_at: float | None = None) -> Subscriber:
        sub = Subscriber(FakeTransport(), "1", CLIENT_ID, 1 << 20, 0.0, expires_at=expires_at,
                         head=HEAD)  # fmt: skip
        self.hub.add(sub, ["room:1", "user:1"])
        if state is not State.STARTING:
            sub.go_live(b"", CLIENT_ID, 0.0)
            self.lifecycle.watch_expiry(sub)
        if state is State.CATCHING_UP:
            self.hub.hold(sub)
        if state is State.CLOSED:
            self.lifecycle.detach(sub)
        return sub


@pytest.mark.parametrize("state", list(State))
def test_ending_from_any_state_repeats_the_clients_position(state: State) -> None:
    """Whatever the state, the closing status carries the id the client already holds."""
    world = World()
    sub = world.stream(state)
    transport = sub.transport
    assert isinstance(transport, FakeTransport)
    transport.writes.clear()
    world.lifecycle.end(sub, sse.Status.ERROR, "broker_unavailable")
    assert sub.state is State.CLOSED
    if state is State.CLOSED:
        assert transport.writes == []
        return
    status = transport.writes[-1]
    assert b"id: " + CLIENT_ID + b"\n" in status
    assert status.startswith(HEAD) is (state is State.STARTING)
    assert transport.closed


@pytest.mark.parametrize("state", [State.STARTING, State.LIVE, State.CATCHING_UP])
def test_a_broken_transport_never_makes_ending_raise(state: State) -> None:
    """A write that raises while ending is logged; the stream is aborted and gone."""
    world = World()
    sub = world.stream(state)
    transport = sub.transport
    assert isinstance(transport, FakeTransport)
    transport.fail = ConnectionResetError("peer gone")
    world.lifecycle.end(sub, sse.Status.FAILURE, "expired")
    assert sub.state is State.CLOSED
    assert transport.aborted
    assert world.hub.stream_count() == 0


def test_one_broken_stream_never_stops_ending_the_others() -> None:
    """Broker loss ends every stream, even when one of them fails to write."""
    world = World()
    subs = [world.stream(State.LIVE) for _ in range(5)]
    broken = subs[2].transport
    assert isinstance(broken, FakeTransport)
    broken.fail = OSError("broken pipe")
    world.lifecycle.on_broker_lost()
    assert all(sub.state is State.CLOSED for sub in subs)
    assert world.hub.stream_count() == 0
    assert world.metrics.status_error == 5


def test_held_messages_are_dropped_with_a_catching_up_stream() -> None:
    """A stream ended while catching up sends only what it was promised, then the status."""
    world = World()
    sub = world.stream(State.CATCHING_UP)
    world.hub.dispatch("room:1", b"held", seq=8, epoch=b"ep", time=101)
    assert len(sub.held) == 1
    transport = sub.transport
    assert isinstance(transport, FakeTransport)
    world.lifecycle.end(sub, sse.Status.ERROR, "broker_unavailable")
    assert b"held" not in b"".join(transport.writes)
    assert sub.held == []


def test_closed_streams_do_not_stay_in_the_expiry_heap() -> None:
    """20,000 streams with hour-long tokens opened and closed leave a bounded expiry heap."""
    world = World()
    kept = [world.stream(State.LIVE, expires_at=world.wall + 3600) for _ in range(10)]
    for _ in range(20_000):
        sub = world.stream(State.LIVE, expires_at=world.wall + 3600)
        world.lifecycle.detach(sub)
    assert world.lifecycle.expiry_entries() <= 2 * len(kept) + EXPIRY_SLACK + 1
    world.wall += 3601
    assert world.lifecycle.expire() == len(kept)
    assert all(sub.state is State.CLOSED for sub in kept)
    assert world.lifecycle.expiry_entries() == 0


def test_streams_cut_as_slow_do_not_stay_in_the_expiry_heap() -> None:
    """Streams with tokens cut as slow clients, then gone, leave a bounded expiry heap."""
    world = World()
    for _ in range(5_000):
        sub = world.stream(State.LIVE, expires_at=world.wall + 3600)
        transport = sub.transport
        assert isinstance(transport, FakeTransport)
        transport.buffer_size = 1 << 30  # it reads nothing
        world.hub.push(sub, b"data: x\n\n")
        world.hub.flush()
        assert sub.state is State.CLOSED
        world.lifecycle.detach(sub)
    assert world.lifecycle.expiry_entries() <= EXPIRY_SLACK + 1
    assert world.metrics.slow_client_cuts == world.metrics.connections_closed == 5_000
