"""Regressions found by a review of the stream lifecycle: rights notices, lagging links, bounds.

Real Redis behind the test proxy, so the pub/sub link can lag (one direction held)
while the command link answers: the situations a loaded network produces.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest
import redis

from sisyphus.brokers.memory import MemoryBroker
from sisyphus.client import RedisPublisher
from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.faults.test_broker_faults import readiness
from tests.support.redis_server import RedisServer
from tests.support.sse_client import SseClient, status
from tests.support.tcp_proxy import Link, TcpProxy


@pytest.fixture
async def world() -> AsyncIterator[tuple[RedisServer, TcpProxy, redis.Redis]]:
    server = RedisServer()
    server.start()
    proxy = TcpProxy(server.port)
    await proxy.start()
    plain = redis.Redis(port=server.port)
    yield server, proxy, plain
    plain.close()
    await proxy.close()
    server.close()


async def start(proxy: TcpProxy, **overrides: object) -> Service:
    settings = Settings(port=0, redis_url=proxy.url, broker_timeout=2.0,
                        broker_ping_interval=0.2, keepalive=5.0).replace(**overrides)  # fmt: skip
    service = Service(settings)
    await service.start()
    return service


def pubsub_link(proxy: TcpProxy, plain: redis.Redis) -> Link:
    [entry] = [c for c in plain.client_list() if int(c.get("sub", 0)) > 0]
    return proxy.link(int(entry["addr"].rsplit(":", 1)[1]))


async def test_a_revoke_that_is_the_last_thing_a_starting_stream_held_takes_effect(
    world: tuple[RedisServer, TcpProxy, redis.Redis],
) -> None:
    """A stream starting while its user is revoked a channel never reads that channel."""
    _, proxy, plain = world
    service = await start(proxy)
    try:
        plain.sadd("user:anchor:channels", "lobby")
        anchor = await SseClient.open(service.port, "user=anchor")
        assert (await anchor.expect()).data == status("ok")
        await service.broker.grant("u", ["room", "secret"], b"granted")
        link = pubsub_link(proxy, plain)
        link.freeze(to_redis=False)  # the stream's subscriptions are confirmed late
        opening = asyncio.ensure_future(SseClient.open(service.port, "user=u"))
        for _ in range(200):
            if plain.pubsub_numsub("secret") == [(b"secret", 1)]:
                break
            await asyncio.sleep(0.01)
        await service.broker.revoke("u", ["secret"], b"revoked secret")
        link.thaw()
        client = await opening
        assert (await client.expect()).data == status("ok")
        assert (await client.next_message()).data == "revoked secret"
        await asyncio.sleep(0.2)  # the refresh reads the set
        await service.broker.publish("secret", b"after the revoke")
        await service.broker.publish("room", b"marker")
        assert await client.messages_until("marker") == ["marker"]
    finally:
        await service.stop()


async def test_a_revoke_missed_by_a_resetting_resume_still_takes_effect(
    world: tuple[RedisServer, TcpProxy, redis.Redis],
) -> None:
    """A resume that gets `reset` re-reads the rights: a revoke it couldn't replay applies."""
    _, proxy, plain = world
    service = await start(proxy, replay_max_messages=5)
    try:
        plain.sadd("user:anchor:channels", "lobby")
        anchor = await SseClient.open(service.port, "user=anchor")
        assert (await anchor.expect()).data == status("ok")
        first = await service.broker.grant("u", ["room", "secret"], b"granted")
        for i in range(10):  # more than one replay may carry: the resume resets
            await service.broker.publish("room", b"missed %d" % i)
        link = pubsub_link(proxy, plain)
        link.freeze(to_client=False)  # the stream's SUBSCRIBE reaches Redis late
        opening = asyncio.ensure_future(
            SseClient.open(
                service.port, "user=u", headers={"Last-Event-ID": first.encode().decode()}
            )
        )
        for _ in range(200):
            if service.hub.count_of("u") == 1:
                break
            await asyncio.sleep(0.01)
        await service.broker.revoke("u", ["secret"], b"revoked secret")  # before it subscribed
        link.thaw()
        client = await opening
        assert (await client.expect()).data == status("ok")
        assert (await client.expect()).data == status("reset")
        await asyncio.sleep(0.2)
        await service.broker.publish("secret", b"after the revoke")
        await service.broker.publish("room", b"marker")
        assert await client.messages_until("marker") == ["marker"]
    finally:
        await service.stop()


async def test_a_grant_replays_from_its_notice_even_when_the_link_lags(
    world: tuple[RedisServer, TcpProxy, redis.Redis],
) -> None:
    """The first message on a granted channel arrives, though another handshake ran ahead."""
    _, proxy, plain = world
    service = await start(proxy)
    try:
        plain.sadd("user:u:channels", "room")
        plain.sadd("user:v:channels", "lobby")
        tab = await SseClient.open(service.port, "user=u")
        assert (await tab.expect()).data == status("ok")
        link = pubsub_link(proxy, plain)
        link.freeze(to_redis=False)  # the pub/sub link lags behind the command link
        await service.broker.grant("u", ["news"], b"granted news")
        await service.broker.publish("news", b"first on news")
        other = asyncio.ensure_future(SseClient.open(service.port, "user=v"))
        for _ in range(200):  # the other user's snapshot moves the hub ahead
            if service.hub.position[0] >= 2:
                break
            await asyncio.sleep(0.01)
        link.thaw()
        assert await tab.messages_until("first on news") == ["granted news", "first on news"]
        await (await other).close()
    finally:
        await service.stop()


async def test_a_second_tab_never_gets_messages_from_before_its_start(
    world: tuple[RedisServer, TcpProxy, redis.Redis],
) -> None:
    """With the pub/sub link lagging, a new tab's ids start at its `ok` and only go forward."""
    _, proxy, plain = world
    service = await start(proxy)
    try:
        plain.sadd("user:u:channels", "room")
        first_tab = await SseClient.open(service.port, "user=u")
        assert (await first_tab.expect()).data == status("ok")
        link = pubsub_link(proxy, plain)
        link.freeze(to_redis=False)
        for i in range(3):
            await service.broker.publish("room", b"old %d" % i)
        second_tab = await SseClient.open(service.port, "user=u")
        ok = await second_tab.expect()
        assert ok.data == status("ok")
        link.thaw()
        await service.broker.publish("room", b"new")
        assert await second_tab.messages_until("new") == ["new"]
        assert await first_tab.messages_until("new") == ["old 0", "old 1", "old 2", "new"]
    finally:
        await service.stop()


def slow_command_links(proxy: TcpProxy, plain: redis.Redis, seconds: float) -> None:
    """Every command link of the service answers ``seconds`` late (pub/sub stays quick)."""
    for entry in plain.client_list():
        if int(entry.get("sub", 0)) == 0:
            try:
                link = proxy.link(int(entry["addr"].rsplit(":", 1)[1]))
            except LookupError:
                continue  # a connection of the test's own, not through the proxy
            link.delay_replies(seconds)


# With the service's replies SLOW seconds late, each step below lands in a window of
# half that width: the service's Redis commands run at once, their answers come late.
SLOW = 0.4


@contextlib.asynccontextmanager
async def first_tab_with_slow_commands(
    world: tuple[RedisServer, TcpProxy, redis.Redis], *channels: str
) -> AsyncIterator[tuple[Service, RedisPublisher, SseClient]]:
    """A service with user u's first tab open on ``channels``, then its command links
    made slow; a publisher that writes straight to Redis (not slowed)."""
    server, proxy, plain = world
    service = await start(proxy)
    publisher = RedisPublisher(f"redis://127.0.0.1:{server.port}/0")
    try:
        plain.sadd("user:u:channels", *channels)
        first = await SseClient.open(service.port, "user=u")
        assert (await first.expect()).data == status("ok")
        slow_command_links(proxy, plain, SLOW)
        yield service, publisher, first
    finally:
        publisher.close()
        await service.stop()


async def test_a_revoke_during_the_refresh_after_a_tab_started_takes_effect(
    world: tuple[RedisServer, TcpProxy, redis.Redis],
) -> None:
    """A tab goes live behind a notice while a refresh reads; a revoke that comes during
    the next read: no tab gets a message on the revoked channel."""
    async with first_tab_with_slow_commands(world, "room", "secret") as (service, publisher, first):
        opening = asyncio.ensure_future(SseClient.open(service.port, "user=u"))
        await asyncio.sleep(1.5 * SLOW)  # the tab's history read has run
        publisher.publish("user:u", "hello")  # a refresh reads; the tab goes live behind it
        await asyncio.sleep(1.5 * SLOW)  # that refresh ended; if a next one read, it did
        publisher.revoke("u", ["secret"])
        publisher.publish("secret", "after the revoke")
        publisher.publish("room", "marker")
        second = await opening
        assert (await second.expect()).data == status("ok")
        for tab in (first, second):
            got = await tab.messages_until("marker")
            assert "after the revoke" not in got, got
            assert got[0] == "hello" and got[-1] == "marker", got


async def test_a_tab_that_goes_live_behind_an_earlier_notice_loses_nothing_after_it(
    world: tuple[RedisServer, TcpProxy, redis.Redis],
) -> None:
    """A tab's catch-up stops at a notice older than the one a running refresh started
    from: what came between the two reaches that tab too, in order."""
    async with first_tab_with_slow_commands(world, "room") as (service, publisher, first):
        opening = asyncio.ensure_future(SseClient.open(service.port, "user=u"))
        await asyncio.sleep(0.5 * SLOW)  # the tab's snapshot has run, not its history read
        publisher.publish("user:u", "first notice")
        publisher.publish("room", "between")
        await asyncio.sleep(1.25 * SLOW)  # the refresh of the first notice is done
        publisher.publish("user:u", "second notice")  # a refresh from here is reading
        second = await opening
        assert (await second.expect()).data == status("ok")
        publisher.publish("room", "marker")
        expected = ["first notice", "between", "second notice", "marker"]
        assert await second.messages_until("marker") == expected
        assert await first.messages_until("marker") == expected


async def test_a_message_published_while_a_tab_reads_its_snapshot_reaches_it(
    world: tuple[RedisServer, TcpProxy, redis.Redis],
) -> None:
    """A tab whose channels are already subscribed skips the history read only when no
    message after its snapshot has arrived: one that did (the snapshot's answer late,
    the pub/sub link quick) still reaches it."""
    async with first_tab_with_slow_commands(world, "room") as (service, publisher, first):
        opening = asyncio.ensure_future(SseClient.open(service.port, "user=u"))
        await asyncio.sleep(0.5 * SLOW)  # the snapshot has run, its answer is on its way
        publisher.publish("room", "during the handshake")
        second = await opening
        assert (await second.expect()).data == status("ok")
        publisher.publish("room", "marker")
        for tab in (first, second):
            assert await tab.messages_until("marker") == ["during the handshake", "marker"]


async def test_a_black_holed_command_link_is_not_ready(
    world: tuple[RedisServer, TcpProxy, redis.Redis],
) -> None:
    """Only the command link dead, quietly: /readyz turns 503 without waiting for a command."""
    _, proxy, plain = world
    service = await start(proxy, broker_timeout=0.5)
    try:
        plain.sadd("user:u:channels", "room")
        client = await SseClient.open(service.port, "user=u")
        assert (await client.expect()).data == status("ok")
        assert await readiness(service) == 200
        subscribed = {int(c["addr"].rsplit(":", 1)[1])
                      for c in plain.client_list() if int(c.get("sub", 0)) > 0}  # fmt: skip
        for link in proxy.links:
            if link.upstream_port not in subscribed:
                link.dead = True  # its packets vanish; the socket stays open
        for _ in range(100):
            if await readiness(service) == 503:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("/readyz stayed 200 with the command link dead")
    finally:
        await service.stop()


class SlowRights(MemoryBroker):
    """The embedded broker whose rights reads take 50 ms, as a loaded Redis would."""

    async def user_channels_many(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        await asyncio.sleep(0.05)
        return await super().user_channels_many(user_ids)


async def test_steady_personal_messages_never_starve_a_stream() -> None:
    """Messages on user:<id> every 20 ms, each re-reading rights: other messages keep flowing."""
    broker = SlowRights()
    service = Service(Settings(port=0, keepalive=5.0), broker=broker)
    await service.start()
    try:
        await broker.grant("u", ["room"], b"granted")
        client = await SseClient.open(service.port, "user=u")
        assert (await client.expect()).data == status("ok")
        received: list[str] = []

        async def read() -> None:
            while True:
                received.append((await client.next_message()).data)

        reader = asyncio.ensure_future(read())
        for i in range(50):
            await broker.publish("user:u", b"personal %d" % i)
            await broker.publish("room", b"room %d" % i)
            await asyncio.sleep(0.02)
        # While the traffic still flows, most of it has been delivered.
        delivered_while_busy = sum(1 for data in received if data.startswith("room"))
        reader.cancel()
        assert delivered_while_busy >= 40, received[-5:]
    finally:
        await service.stop()
