"""History and retention, the same on both brokers: what a resuming stream is given.

Each test runs on the embedded broker and on a real Redis (one conformance suite).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from sisyphus.brokers.base import Broker
from sisyphus.brokers.memory import MemoryBroker
from sisyphus.brokers.redis import RedisBroker
from sisyphus.protocol.resume import OVER_BUDGET
from tests.support.redis_server import RedisServer

BIG = 1 << 30


@pytest.fixture
async def make_broker(broker_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    started: list[Broker] = []

    async def make(history_size: int = 10, history_max_age: float = 3600.0) -> Broker:
        broker: Broker
        if broker_kind == "embedded":
            broker = MemoryBroker(history_size, history_max_age)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            redis.Redis.from_url(server.url).flushall()
            broker = RedisBroker(
                server.url, history_size=history_size, history_max_age=history_max_age
            )
        await broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        await broker.close()


async def publish_all(broker: Broker, messages: list[tuple[str, bytes]]) -> None:
    for channel, payload in messages:
        await broker.publish(channel, payload)


async def test_history_gives_what_came_after_the_position_per_channel_oldest_first(
    make_broker: Any,
) -> None:
    """Each channel's retained messages after the position, in seq order."""
    broker = await make_broker()
    await publish_all(broker, [("room:1", b"a"), ("room:2", b"b"), ("room:1", b"c")])
    await publish_all(broker, [("room:2", b"d"), ("room:1", b"e")])
    histories = await broker.history(["room:1", "room:2", "room:3"], (2,), 10, BIG)
    got = {h.entries[0].channel: [(e.seq, e.payload) for e in h.entries]
           for h in histories if h.entries}  # fmt: skip
    assert got == {"room:1": [(3, b"c"), (5, b"e")], "room:2": [(4, b"d")]}
    assert not any(h.trimmed or h.over_budget for h in histories)


async def test_more_than_the_limit_over_all_channels_is_over_budget(make_broker: Any) -> None:
    """The count bound is over all channels together: reading stops past it."""
    broker = await make_broker()
    await publish_all(broker, [(f"room:{i % 3}", b"x") for i in range(9)])
    channels = ["room:0", "room:1", "room:2"]
    assert await broker.history(channels, (0,), 8, BIG) == OVER_BUDGET
    assert sum(len(h.entries) for h in await broker.history(channels, (0,), 9, BIG)) == 9


async def test_more_payload_bytes_than_the_bound_is_over_budget(make_broker: Any) -> None:
    """The byte bound stops the read as soon as the payloads found exceed it."""
    broker = await make_broker()
    await publish_all(broker, [("room:1", b"x" * 100) for _ in range(5)])
    assert await broker.history(["room:1"], (0,), 10, 499) == OVER_BUDGET
    assert len((await broker.history(["room:1"], (0,), 10, 500))[0].entries) == 5


async def test_history_says_trimmed_when_the_count_bound_dropped_missed_messages(
    make_broker: Any,
) -> None:
    """A position before what a channel still retains reads as trimmed."""
    broker = await make_broker(history_size=3)
    # Redis trims whole nodes of 100 entries (MAXLEN ~): publish past that.
    await publish_all(broker, [("room:1", b"%d" % i) for i in range(250)])
    assert any(h.trimmed for h in await broker.history(["room:1"], (1,), 1000, BIG))
    recent = await broker.history(["room:1"], (248,), 1000, BIG)
    assert not any(h.trimmed for h in recent)
    assert [e.seq for h in recent for e in h.entries] == [249, 250]


async def test_history_at_the_current_position_is_empty(make_broker: Any) -> None:
    """Nothing published since the position: nothing to read."""
    broker = await make_broker(history_size=3)
    await publish_all(broker, [("room:1", b"x"), ("room:1", b"y")])
    assert await broker.history(["room:1"], (2,), 10, BIG) == []


async def test_the_retention_edge_comes_from_the_brokers_own_record(make_broker: Any) -> None:
    """`oldest` is the first seq published within the retention age, whatever ids claim."""
    broker = await make_broker()
    _, before = await broker.snapshot("1")
    assert before.oldest == (before.seqs[0] + 1,)  # nothing published yet
    await publish_all(broker, [("room:1", b"a"), ("room:1", b"b")])
    _, after = await broker.snapshot("1")
    assert after.seqs == (2,)
    assert after.oldest == (1,)


def first_retained(broker: Broker, channel: str) -> int:
    """The seq of the oldest message the broker still retains on ``channel``."""
    if isinstance(broker, MemoryBroker):
        return broker._history[channel].entries[0].seq
    assert isinstance(broker, RedisBroker)
    url = broker._url
    info = redis.Redis.from_url(url).xinfo_stream(f"sisyphus:history:{channel}")
    return int(info["first-entry"][0].split(b"-")[0])


async def test_a_position_on_the_last_trimmed_message_is_not_trimmed(make_broker: Any) -> None:
    """Channels share one sequence: a client that got a channel's last trimmed message resumes."""
    broker = await make_broker(history_size=10)
    for i in range(300):
        await broker.publish("room", b"r%d" % i)
        await broker.publish("other", b"o%d" % i)
    first = first_retained(broker, "room")
    # The client received `room`'s message just before the first retained one (first - 2:
    # `other` took the seq between): nothing it lacks was trimmed.
    histories = await broker.history(["room"], (first - 2,), 10_000, BIG)
    assert not any(h.trimmed for h in histories)
    assert next(e.seq for h in histories for e in h.entries) == first
    assert any(h.trimmed for h in await broker.history(["room"], (first - 4,), 10_000, BIG))
