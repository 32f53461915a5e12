"""The delivery-latency histogram the hub keeps: once per message, at the end of its flush."""

from __future__ import annotations

from collections.abc import Callable

from sisyphus.hub.hub import Hub
from sisyphus.hub.subscriber import Subscriber
from sisyphus.metrics import Metrics
from tests.hub.test_hub import HEAD, MAX_UNSENT, FakeSink, FakeTransport


class Timed:
    """A hub whose latency timer is a value the test moves."""

    def __init__(self) -> None:
        self.timer = 100.0
        self.scheduled: list[Callable[[], None]] = []
        self.metrics = Metrics()
        self.hub = Hub(
            sink=FakeSink(),
            schedule=self.scheduled.append,
            clock=lambda: 0.0,
            metrics=self.metrics,
            on_user_message=lambda user_id, position: None,
            wall_clock=lambda: 1_700_000_000.0,
            timer=lambda: self.timer,
        )

    def listeners(self, count: int, channel: str = "room:1") -> list[FakeTransport]:
        transports = []
        for index in range(count):
            transport = FakeTransport()
            sub = Subscriber(transport, f"u{index}", b"ep-0-0", MAX_UNSENT, 0.0)
            self.hub.add(sub, [channel])
            sub.go_live(HEAD, b"ep-0-0", 0.0)
            transports.append(transport)
        return transports

    def run_loop(self) -> None:
        callbacks, self.scheduled[:] = list(self.scheduled), []
        for callback in callbacks:
            callback()

    def counts(self) -> dict[str, int]:
        return dict(self.metrics.delivery_latency.cumulative())


def test_each_message_is_one_observation_whatever_its_listeners() -> None:
    """Two messages to 50 streams in one loop iteration count 2, at the time of their flush."""
    timed = Timed()
    transports = timed.listeners(50)
    timed.hub.dispatch("room:1", b"a", 1, b"ep", 1)
    timed.timer += 0.0001
    timed.hub.dispatch("room:1", b"b", 2, b"ep", 1)
    timed.timer += 0.002  # the flush writes 2.1 ms after the first one arrived
    timed.run_loop()
    assert all(len(t.writes) == 2 for t in transports)  # head, then both messages in one write
    counts = timed.counts()
    assert (counts["0.001"], counts["0.0025"], counts["+Inf"]) == (0, 2, 2)
    assert abs(timed.metrics.delivery_latency.sum - 2 * 0.0021) < 1e-9


def test_a_later_flush_is_measured_from_its_own_messages() -> None:
    """A message of the next loop iteration is timed from its own arrival, not the first's."""
    timed = Timed()
    timed.listeners(1)
    timed.hub.dispatch("room:1", b"a", 1, b"ep", 1)
    timed.timer += 3.0
    timed.run_loop()
    timed.hub.dispatch("room:1", b"b", 2, b"ep", 1)
    timed.timer += 0.0003
    timed.run_loop()
    counts = timed.counts()
    assert (counts["0.0005"], counts["2.5"], counts["5.0"]) == (1, 1, 2)


def test_a_message_nobody_here_listens_to_is_not_observed() -> None:
    """No local listener, no flush of it: the histogram stays empty."""
    timed = Timed()
    timed.listeners(3, channel="room:2")
    timed.hub.dispatch("room:1", b"a", 1, b"ep", 1)
    timed.run_loop()
    assert timed.counts()["+Inf"] == 0
