"""Fixtures shared by the whole suite: a real Redis, and a Sisyphus per test on each broker."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.support.redis_cluster import ClusterTopology
from tests.support.redis_server import RedisServer
from tests.support.sse_client import OPEN_CLIENTS


async def close_clients() -> None:
    while OPEN_CLIENTS:
        await OPEN_CLIENTS.pop().close()


@pytest.fixture(autouse=True)
async def _close_sse_clients() -> AsyncIterator[None]:
    """Streams a test left open are closed before its event loop goes away."""
    yield
    await close_clients()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private Redis-compatible server for the whole run, on a free port."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterTopology]:
    """A private three-primary Redis Cluster for the whole run, started on first use."""
    with ClusterTopology(primaries=3) as cluster:
        yield cluster


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client to the test Redis, as the main application would hold; data wiped."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(params=["embedded", "redis"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def make_service(
    broker_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceFactory]:
    """Start Sisyphus on a free port with the broker under test; stop it after the test."""
    started: list[Service] = []
    redis_url = None
    if broker_kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis.Redis.from_url(server.url).flushall()
        redis_url = server.url
    elif broker_kind == "cluster":  # only where a test asks for it (parametrize broker_kind)
        cluster: ClusterTopology = request.getfixturevalue("redis_cluster")
        for port in cluster.primary_ports():
            cluster.command(port, "FLUSHALL")
        redis_url = cluster.url

    async def make(**overrides: Any) -> Service:
        extra = {"wall_clock": overrides.pop("wall_clock")} if "wall_clock" in overrides else {}
        settings = Settings(port=0, keepalive=0.3, redis_url=redis_url).replace(**overrides)
        service = Service(settings, **extra)
        await service.start()
        started.append(service)
        return service

    yield make
    await close_clients()
    for service in started:
        await service.stop()


@pytest.fixture
async def service(make_service: ServiceFactory) -> Service:
    """A running Sisyphus with default settings (short keep-alive) on the broker under test."""
    return await make_service()


def api_call(
    port: int, route: str, body: dict[str, Any], api_key: str | None = None
) -> tuple[int, dict[str, Any]]:
    """POST a JSON body to the API over a real socket; (status, decoded JSON body)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    if api_key is not None:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


async def api(
    port: int, route: str, body: dict[str, Any], api_key: str | None = None
) -> tuple[int, dict[str, Any]]:
    """:func:`api_call` from a thread, so the service in this event loop can answer it."""
    return await asyncio.to_thread(api_call, port, route, body, api_key)


async def grant(port: int, user: str, *channels: str) -> None:
    status, body = await api(port, "/api/grant", {"user": user, "channels": list(channels)})
    assert status == 200, body


async def revoke(port: int, user: str, *channels: str) -> None:
    status, body = await api(port, "/api/revoke", {"user": user, "channels": list(channels)})
    assert status == 200, body


async def publish(port: int, channel: str, data: Any) -> None:
    status, body = await api(port, "/api/publish", {"channel": channel, "data": data})
    assert status == 200, body
