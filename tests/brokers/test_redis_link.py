"""The Redis links (sisyphus.brokers.redis_link, redis): set-up, own timeouts, backoff, loss.

Against a real Redis-compatible server, reached directly or through the TCP proxy.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from redis.asyncio.connection import parse_url

from sisyphus.brokers.redis import RedisBroker
from sisyphus.brokers.redis_link import CommandLink, LinkError, ReplyError, RespProtocol, open_link
from tests.support.redis_server import RedisServer, free_port, server_binary
from tests.support.tcp_proxy import TcpProxy

PASSWORD = "right-password"


def fixed(params: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A locator that always names the same server."""

    async def locate() -> dict[str, Any]:
        return params

    return locate


@pytest.fixture
def locked_redis() -> Iterator[int]:
    """A Redis of the test's own that wants a password; yields its port."""
    port = free_port()
    process = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, password=PASSWORD)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    client.close()
    yield port
    process.terminate()
    process.wait(10)


def connections(port: int) -> tuple[int, int]:
    """(other clients connected now, connections received before this look) per the server."""
    client = redis.Redis(port=port, password=PASSWORD)
    try:
        info = client.info("all")
        return int(info["connected_clients"]) - 1, int(info["total_connections_received"]) - 1
    finally:
        client.close()


async def test_a_refused_password_leaves_no_socket_open(locked_redis: int) -> None:
    """open_link raises on a wrong password and the server sees the connection gone."""
    params = dict(parse_url(f"redis://:wrong@127.0.0.1:{locked_redis}/0"))
    for _ in range(5):
        with pytest.raises(ReplyError, match=r"WRONGPASS|invalid"):
            await open_link(params, RespProtocol, 2.0, select_db=True)
    await asyncio.sleep(0.1)
    open_now, _ = await asyncio.to_thread(connections, locked_redis)
    assert open_now == 0


async def test_a_refusing_server_is_not_hammered(locked_redis: int) -> None:
    """Calls during the backoff fail at once without a new connection; the delay grows."""
    params = dict(parse_url(f"redis://:wrong@127.0.0.1:{locked_redis}/0"))
    link = CommandLink(fixed(params), 2.0, backoff_base=0.2, backoff_cap=5.0, rand=lambda: 0.0)
    _, before = await asyncio.to_thread(connections, locked_redis)
    for _ in range(50):
        with pytest.raises((LinkError, ReplyError)):
            await link.call("PING")
    _, after = await asyncio.to_thread(connections, locked_redis)
    assert after - before == 2  # one attempt, one look; the other 49 calls waited
    assert not link.healthy
    link.close()


async def test_a_link_that_stops_answering_is_aborted_and_replaced(
    redis_server: RedisServer,
) -> None:
    """A command that times out aborts its link; the next call connects a new one."""
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    try:
        link = CommandLink(fixed(dict(parse_url(proxy.url))), 0.3)
        assert await link.call("PING") == b"PONG"
        assert link.healthy
        proxy.freeze()
        with pytest.raises(LinkError, match="did not answer"):
            await link.call("PING")
        assert not link.healthy
        proxy.thaw()
        assert await link.call("PING") == b"PONG"
        assert link.healthy
        link.close()
    finally:
        await proxy.close()


async def test_a_caller_that_gives_up_first_does_not_keep_a_dead_link(
    redis_server: RedisServer,
) -> None:
    """The link's own timeout, checked by the tick, aborts it even when callers gave up."""
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    try:
        link = CommandLink(fixed(dict(parse_url(proxy.url))), 0.3)
        assert await link.call("PING") == b"PONG"
        proxy.freeze()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):  # a handshake's shorter deadline
                await link.call("PING")
        assert link.healthy  # not yet overdue
        await asyncio.sleep(0.35)
        assert not link.healthy
        link.check(asyncio.get_running_loop().time())
        proxy.thaw()
        assert await link.call("PING") == b"PONG"
        link.close()
    finally:
        await proxy.close()


@pytest.fixture
async def broker(redis_server: RedisServer) -> AsyncIterator[RedisBroker]:
    broker = RedisBroker(redis_server.url, timeout=0.5, backoff_base=0.05, backoff_cap=0.2)
    yield broker
    await broker.close()


async def test_a_failing_loss_listener_never_stops_the_reconnect(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    """The broker schedules its own reconnect before it tells anyone, and survives them."""
    told: list[str] = []

    def on_lost() -> None:
        told.append("lost")
        raise ValueError("a listener that breaks")

    broker.bind(lambda *message: None, on_lost)
    await broker.start()
    broker.subscribe(["room:1"])
    await broker.wait_subscribed(["room:1"])
    killer = redis.Redis.from_url(redis_server.url)
    for round_ in range(3):
        killer.client_kill_filter(_type="pubsub")
        for _ in range(200):
            if broker.reconnects > round_ and broker.connected:
                break
            await asyncio.sleep(0.02)
        await broker.wait_subscribed(["room:1"])
    killer.close()
    assert told == ["lost"] * 3
    assert broker.reconnects == 3


async def test_a_wait_for_a_channel_unsubscribed_before_its_confirmation_ends(
    broker: RedisBroker,
) -> None:
    """A refresh waits for a channel it subscribed; the channel's last stream closes before
    Redis confirms it (no linger): the wait ends at once, instead of running into the
    broker timeout (which ended every stream of the user with `error`)."""
    broker.bind(lambda *message: None, lambda: None)
    await broker.start()
    broker.subscribe(["news"])
    waiting = asyncio.ensure_future(broker.wait_subscribed(["news"]))
    await asyncio.sleep(0)  # waiting, before any answer could arrive
    broker.unsubscribe(["news"])
    await asyncio.wait_for(waiting, 0.4)  # the broker's own timeout is 0.5 s
    broker.subscribe(["news"])  # wanted again: waits for its own confirmation
    await asyncio.wait_for(broker.wait_subscribed(["news"]), 0.4)
