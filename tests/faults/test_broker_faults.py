"""Broker outages: Redis killed, down at start, wedged, restarted empty; real Redis."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest
import redis

from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.support.metrics import samples
from tests.support.redis_server import RedisServer, free_port
from tests.support.sse_client import SseClient, status
from tests.support.tcp_proxy import TcpProxy


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


async def readiness(service: Service) -> int:
    return (await asyncio.to_thread(http_get, service.port, "/readyz"))[0]


async def wait_ready(service: Service, want: int = 200) -> None:
    """Poll /readyz until it answers ``want`` (the service reconnects with backoff)."""
    for _ in range(500):
        if await readiness(service) == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"/readyz never answered {want}")


async def connect_ok(service: Service, user: str) -> SseClient:
    client = await SseClient.open(service.port, f"user={user}")
    event = await client.expect()
    assert event.data == status("ok"), event
    return client


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A Redis of this test's own, which it may kill and restart."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


def settings_for(url: str) -> Settings:
    return Settings(
        port=0, redis_url=url, broker_timeout=0.5, broker_ping_interval=0.2, keepalive=0.3
    )


async def test_redis_killed_with_clients_connected(own_redis: RedisServer) -> None:
    """Clients get `error` + retry and close; the service stays up and serves once Redis is back."""
    service = Service(settings_for(own_redis.url))
    await service.start()
    try:
        redis.Redis.from_url(own_redis.url).sadd("user:1:channels", "room:1")
        clients = [await connect_ok(service, "1") for _ in range(5)]
        assert await readiness(service) == 200
        own_redis.stop()
        for client in clients:
            events = [e for e in await client.until_closed() if not e.is_noop]
            assert [e.data for e in events] == [status("error")]
            assert events[0].retry is not None
        await wait_ready(service, 503)
        attempt = await SseClient.open(service.port, "user=1")
        assert [e.data for e in await attempt.until_closed()] == [status("error")]
        own_redis.start()
        await wait_ready(service)
        # Redis came back empty: the rights are gone until the application writes them again.
        refused = await SseClient.open(service.port, "user=1")
        assert [e.data for e in await refused.until_closed()] == [status("failure")]
        redis.Redis.from_url(own_redis.url).sadd("user:1:channels", "room:1")
        client = await connect_ok(service, "1")
        redis.Redis.from_url(own_redis.url).publish("room:1", "after recovery")
        assert (await client.next_message()).data == "after recovery"
        assert service.broker.reconnects >= 1
        metrics = (await asyncio.to_thread(http_get, service.port, "/metrics"))[1].decode()
        assert samples(metrics)["sisyphus_broker_reconnects_total"] >= 1
    finally:
        await service.stop()


async def test_redis_down_at_start_up() -> None:
    """The service starts without Redis, isn't ready, and becomes ready when Redis appears."""
    port = free_port()
    server = RedisServer(port)
    service = Service(settings_for(server.url))
    await service.start()
    try:
        assert await readiness(service) == 503
        assert (await asyncio.to_thread(http_get, service.port, "/healthz"))[0] == 200
        client = await SseClient.open(service.port, "user=1")
        assert [e.data for e in await client.until_closed()] == [status("error")]
        server.start()
        await wait_ready(service)
        redis.Redis.from_url(server.url).sadd("user:1:channels", "room:1")
        client = await connect_ok(service, "1")
        await client.close()
    finally:
        await service.stop()
        server.close()


@pytest.fixture
async def proxied(own_redis: RedisServer) -> AsyncIterator[tuple[TcpProxy, Service]]:
    """A service that reaches its Redis through a proxy the test can cut or freeze."""
    proxy = TcpProxy(own_redis.port)
    await proxy.start()
    service = Service(settings_for(proxy.url))
    await service.start()
    redis.Redis.from_url(own_redis.url).sadd("user:1:channels", "room:1")
    yield proxy, service
    await service.stop()
    await proxy.close()


async def test_wedged_pubsub_link_is_detected_by_ping(
    own_redis: RedisServer, proxied: tuple[TcpProxy, Service]
) -> None:
    """A link that stays open but forwards nothing is found by the PING, reported, and healed."""
    proxy, service = proxied
    client = await connect_ok(service, "1")
    proxy.freeze()
    events = [e for e in await client.until_closed() if not e.is_noop]
    assert [e.data for e in events] == [status("error")]
    assert service.metrics.status_error >= 1
    await wait_ready(service, 503)
    proxy.cut()
    proxy.thaw()
    await wait_ready(service)
    client = await connect_ok(service, "1")
    redis.Redis.from_url(own_redis.url).publish("room:1", "healed")
    assert (await client.next_message()).data == "healed"


async def test_cut_network_then_resume_by_id(proxied: tuple[TcpProxy, Service]) -> None:
    """A cut link closes streams with `error`; clients resume by id without loss afterwards."""
    proxy, service = proxied
    client = await connect_ok(service, "1")
    first = await service.broker.publish("room:1", b"before")
    assert (await client.next_message()).id == first.encode().decode()
    proxy.cut()
    events = [e.data for e in await client.until_closed() if not e.is_noop]
    assert events == [status("error")]
    await wait_ready(service)
    await service.broker.publish("room:1", b"during")
    client = await SseClient.open(
        service.port, "user=1", headers={"Last-Event-ID": first.encode().decode()}
    )
    assert (await client.expect()).data == status("ok")
    assert (await client.next_message()).data == "during"


async def test_ops_endpoints(own_redis: RedisServer) -> None:
    """/healthz is 200, /readyz 200 when connected, /metrics counts in Prometheus format."""
    service = Service(settings_for(own_redis.url))
    await service.start()
    try:
        redis.Redis.from_url(own_redis.url).sadd("user:1:channels", "room:1")
        client = await connect_ok(service, "1")
        code, body = await asyncio.to_thread(http_get, service.port, "/healthz")
        assert (code, json.loads(body)) == (200, {"status": "alive"})
        code, body = await asyncio.to_thread(http_get, service.port, "/metrics")
        assert code == 200
        text = body.decode()
        values = samples(text)
        assert values["sisyphus_streams"] == 1
        assert values["sisyphus_broker_connected"] == 1
        assert values["sisyphus_connections_opened_total"] == 1
        await client.close()
    finally:
        await service.stop()
