"""The embedded broker's history: what a resuming stream is given."""

from __future__ import annotations

from sisyphus.brokers.memory import MemoryBroker


async def publish_all(broker: MemoryBroker, messages: list[tuple[str, bytes]]) -> None:
    for channel, payload in messages:
        await broker.publish(channel, payload)


async def test_history_gives_what_came_after_the_position_per_channel_oldest_first() -> None:
    broker = MemoryBroker(history_size=10)
    await publish_all(broker, [("room:1", b"a"), ("room:2", b"b"), ("room:1", b"c")])
    await publish_all(broker, [("room:2", b"d"), ("room:1", b"e")])
    histories = await broker.history(["room:1", "room:2", "room:3"], after=2, limit=10)
    got = {h.entries[0].channel: [(e.seq, e.payload) for e in h.entries] for h in histories}
    assert got == {"room:1": [(3, b"c"), (5, b"e")], "room:2": [(4, b"d")]}
    assert not any(h.trimmed for h in histories)


async def test_history_stops_at_the_limit_keeping_the_oldest() -> None:
    broker = MemoryBroker(history_size=10)
    await publish_all(broker, [("room:1", b"%d" % i) for i in range(6)])
    (history,) = await broker.history(["room:1"], after=1, limit=3)
    assert [e.seq for e in history.entries] == [2, 3, 4]


async def test_history_says_trimmed_when_the_count_bound_dropped_missed_messages() -> None:
    broker = MemoryBroker(history_size=3)
    await publish_all(broker, [("room:1", b"%d" % i) for i in range(6)])
    (history,) = await broker.history(["room:1"], after=1, limit=10)
    assert history.trimmed
    assert [e.seq for e in history.entries] == [4, 5, 6]
    (recent,) = await broker.history(["room:1"], after=3, limit=10)
    assert not recent.trimmed


async def test_history_at_the_current_position_is_empty() -> None:
    broker = MemoryBroker(history_size=3)
    await publish_all(broker, [("room:1", b"x"), ("room:1", b"y")])
    assert await broker.history(["room:1"], after=2, limit=10) == []
