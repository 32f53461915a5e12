"""Reconnects on Redis answered from what the process holds: a user's set read while its
``user:<id>`` stays subscribed, dropped at the next message there or when it is
unsubscribed. A change the main app announces is never missed by a later connect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis

from sisyphus.client import RedisPublisher
from sisyphus.protocol.names import history_key
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory
from tests.faults.test_review_regressions import (  # noqa: F401 (world is a fixture)
    SLOW,
    pubsub_link,
    slow_command_links,
    start,
    world,
)
from tests.server.test_redis_contract import connect_ok, wait_no_channels
from tests.support.redis_server import RedisServer
from tests.support.sse_client import SseClient, status
from tests.support.tcp_proxy import Link, TcpProxy


@pytest.fixture
def broker_kind() -> str:
    """Every test here runs on Redis only."""
    return "redis"


def commands_run(client: redis.Redis) -> dict[str, int]:
    """Calls per command (INFO commandstats), but the test's own INFO and health PINGs."""
    return {
        name: stats["calls"]
        for name, stats in client.info("commandstats").items()
        if name not in ("cmdstat_info", "cmdstat_ping")
    }


async def no_streams(service: Service) -> None:
    for _ in range(200):
        if service.hub.stream_count() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the closed streams were never detached")


async def held_in_process(service: Service, user: str) -> None:
    """Open and close two tabs: the second tab's read, made while ``user:<id>`` was
    subscribed, is what the process now holds (the user's channel lingers)."""
    for _ in range(2):
        tab = await connect_ok(service, user)
        await tab.close()
        await no_streams(service)


async def test_a_reconnect_within_the_linger_costs_redis_no_command(
    make_service: ServiceFactory, redis_client: redis.Redis
) -> None:
    service = await make_service(subscription_linger=30.0)
    redis_client.sadd("user:1:channels", "room:5")
    await held_in_process(service, "1")
    before = commands_run(redis_client)
    again = await connect_ok(service, "1")
    assert commands_run(redis_client) == before
    redis_client.publish("room:5", "delivered")
    assert (await again.next_message()).data == "delivered"


@pytest.mark.parametrize("announce", ["plain", "api"])
@pytest.mark.parametrize("change", ["grant", "revoke"])
async def test_a_reconnect_after_an_announced_change_reads_the_new_set(
    make_service: ServiceFactory,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    change: str,
    announce: str,
) -> None:
    """With no stream open, nothing refreshes at the notice; the next connect still sees
    the change, whether announced by SADD/SREM + PUBLISH or through the API's path."""
    service = await make_service(subscription_linger=30.0)
    redis_client.sadd("user:1:channels", "room:5", "room:6")
    await held_in_process(service, "1")
    if announce == "plain":
        if change == "grant":
            redis_client.sadd("user:1:channels", "room:7")
        else:
            redis_client.srem("user:1:channels", "room:6")
        redis_client.publish("user:1", "rights changed")
    else:
        publisher = RedisPublisher(f"redis://127.0.0.1:{redis_server.port}/0")
        try:
            if change == "grant":
                publisher.grant("1", ["room:7"])
            else:
                publisher.revoke("1", ["room:6"])
        finally:
            publisher.close()
    await asyncio.sleep(0.2)  # the notice has reached the process
    tab = await connect_ok(service, "1")
    changed = "room:7" if change == "grant" else "room:6"
    redis_client.publish(changed, "on the changed channel")
    redis_client.publish("room:5", "marker")
    got = await tab.messages_until("marker")
    if change == "grant":
        assert got == ["on the changed channel", "marker"]
    else:
        assert got == ["marker"]


async def test_a_connect_after_the_linger_sees_an_unannounced_change(
    make_service: ServiceFactory, redis_client: redis.Redis
) -> None:
    """Once the user's channel is unsubscribed, no notice could reach the process: what
    it held is dropped, and a change made without a notice is read."""
    service = await make_service(subscription_linger=0.3)
    redis_client.sadd("user:1:channels", "room:5")
    await held_in_process(service, "1")
    await wait_no_channels(redis_client, 5.0)
    redis_client.sadd("user:1:channels", "room:7")  # no notice
    tab = await connect_ok(service, "1")
    redis_client.publish("room:7", "on the new channel")
    assert (await tab.next_message()).data == "on the new channel"


async def test_a_set_read_across_a_notice_is_not_kept(
    world: tuple[RedisServer, TcpProxy, redis.Redis],  # noqa: F811
) -> None:
    """A tab's read runs at Redis before a grant, and its answer arrives after the grant's
    notice: that answer may be stale, so the next tab reads the set again."""
    server, proxy, plain = world
    service = await start(proxy, subscription_linger=30.0)
    publisher = RedisPublisher(f"redis://127.0.0.1:{server.port}/0")
    try:
        plain.sadd("user:u:channels", "room")
        await held_in_process(service, "u")
        plain.publish("user:u", "nothing changed")  # what was held is dropped
        await asyncio.sleep(0.2)
        slow_command_links(proxy, plain, SLOW)
        opening = asyncio.ensure_future(SseClient.open(service.port, "user=u"))
        await asyncio.sleep(0.5 * SLOW)  # the tab's read has run; its answer is late
        plain.sadd("user:u:channels", "granted")
        plain.publish("user:u", "rights changed")  # reaches the process before the answer
        first = await opening
        assert (await first.expect()).data == status("ok")
        second = await SseClient.open(service.port, "user=u")
        assert (await second.expect()).data == status("ok")
        publisher.publish("granted", "on the granted channel")
        publisher.publish("room", "marker")
        assert await second.messages_until("marker") == ["on the granted channel", "marker"]
    finally:
        publisher.close()
        await service.stop()


async def test_a_first_connect_on_a_channel_granted_since_gets_nothing_older(
    make_service: ServiceFactory, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    """The held position predates a channel granted since: a new tab still starts at the
    broker's current position, and gets nothing published before it connected."""
    service = await make_service(subscription_linger=30.0)
    publisher = RedisPublisher(f"redis://127.0.0.1:{redis_server.port}/0")
    try:
        redis_client.sadd("user:1:channels", "room:5")
        await held_in_process(service, "1")
        first = await connect_ok(service, "1")
        publisher.publish("room:6", "before the grant")  # no process listens to room:6 yet
        redis_client.sadd("user:1:channels", "room:6")
        redis_client.publish("user:1", "granted")
        assert (await first.next_message()).data == "granted"
        for _ in range(200):
            if "room:6" in service.hub.channels() and service.broker.ready:
                break
            await asyncio.sleep(0.01)
        second = await connect_ok(service, "1")
        publisher.publish("room:6", "after the second tab")
        assert await second.messages_until("after the second tab") == ["after the second tab"]
    finally:
        publisher.close()


def seq_of(event_id: str) -> int:
    return int(event_id.split("-")[1])


@contextlib.asynccontextmanager
async def held_user_behind_a_lagging_link(
    world: tuple[RedisServer, TcpProxy, redis.Redis],  # noqa: F811
) -> AsyncIterator[tuple[Service, Link]]:
    """User u's set held in-process, then the pub/sub link frozen towards the service
    and three messages on u's room published (and acknowledged) behind it."""
    _, proxy, plain = world
    service = await start(proxy, subscription_linger=30.0)
    try:
        plain.sadd("user:u:channels", "room")
        await held_in_process(service, "u")
        link = pubsub_link(proxy, plain)
        link.freeze(to_redis=False)
        for i in range(3):
            await service.broker.publish("room", b"old %d" % i)
        yield service, link
    finally:
        await service.stop()


async def test_a_tab_served_in_process_under_a_lagging_link_only_goes_forward(
    world: tuple[RedisServer, TcpProxy, redis.Redis],  # noqa: F811
) -> None:
    """The pub/sub link lags: a tab served from the held set starts at the last message
    the process heard. What was still on its way comes after its `ok`, each message once,
    in order, with ids that only go forward (docs/delivery.md)."""
    async with held_user_behind_a_lagging_link(world) as (service, link):
        tab = await SseClient.open(service.port, "user=u")
        ok = await tab.expect()
        assert ok.data == status("ok")
        link.thaw()
        await service.broker.publish("room", b"new")
        events = []
        while not events or events[-1].data != "new":
            events.append(await tab.next_message())
        assert [event.data for event in events] == ["old 0", "old 1", "old 2", "new"]
        seqs = [seq_of(ok.id), *(seq_of(event.id) for event in events)]
        assert seqs == sorted(set(seqs)), seqs


async def test_a_page_connecting_at_its_rendered_position_gets_nothing_older(
    world: tuple[RedisServer, TcpProxy, redis.Redis],  # noqa: F811
) -> None:
    """The exact first connect (render `position()`, connect with it) under a lagging
    link, the user's set held: nothing published before the position reaches the page."""
    async with held_user_behind_a_lagging_link(world) as (service, link):
        position = await service.broker.position()
        rendered = f"{position.epoch}-{position.seqs[0]}-0"
        opening = asyncio.ensure_future(
            SseClient.open(service.port, "user=u", headers={"Last-Event-ID": rendered})
        )
        await asyncio.sleep(0.3)
        link.thaw()
        tab = await opening
        assert (await tab.expect()).data == status("ok")
        await service.broker.publish("room", b"new")
        assert await tab.messages_until("new") == ["new"]


async def test_a_tab_served_in_process_after_the_sequence_went_back_loses_nothing(
    world: tuple[RedisServer, TcpProxy, redis.Redis],  # noqa: F811
) -> None:
    """Redis lost its latest writes (a restart from a file that lacks them) and the
    failover guard could not act (an ACL without INFO: the service serves on, unguarded).
    The highest seq heard on the old pub/sub link outlives the link: a fresh tab starts
    there, above the broker's sequence, and drops what is published after it connected."""
    _, proxy, plain = world
    service = await start(proxy, subscription_linger=30.0)
    try:
        plain.sadd("user:u:channels", "room")
        await held_in_process(service, "u")  # room and user:u linger, subscribed
        for i in range(8):
            await service.broker.publish("room", b"before %d" % i)
        for _ in range(200):
            if service.hub.delivered >= (8,):
                break
            await asyncio.sleep(0.01)
        plain.set("sisyphus:seq", 2)  # the writes of seq 3-8 are lost
        plain.delete(history_key("room"))
        pubsub_link(proxy, plain).cut()  # ... and the pub/sub link with them
        for _ in range(300):
            if service.broker.ready and service.broker.reconnects:
                break
            await asyncio.sleep(0.01)
        await held_in_process(service, "u")
        tab = await SseClient.open(service.port, "user=u")
        assert (await tab.expect()).data == status("ok")
        for i in range(8):  # seq 3-10: all published after the tab connected
            await service.broker.publish("room", b"after %d" % i)
        await service.broker.publish("room", b"marker")
        got = await asyncio.wait_for(tab.messages_until("marker"), 5.0)
        assert got == [f"after {i}" for i in range(8)] + ["marker"]
    finally:
        await service.stop()
