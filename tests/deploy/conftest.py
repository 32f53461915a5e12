"""Fixtures for the deployment tests: nginx from the project's own configuration."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis

from sisyphus.client import RedisPublisher, mint_token
from tests.support.nginx import Nginx, nginx_binary
from tests.support.redis_server import RedisServer
from tests.test_cli import Served, start_serve, stop_serve

SECRET = "deploy-tests-secret-of-at-least-32-bytes!"


@pytest.fixture
def nginx_installed() -> None:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl; .ci/run installs it)")


def token(user: str) -> str:
    return mint_token(SECRET, user, ttl=600)


@pytest.fixture
def publisher(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[RedisPublisher]:
    """The main application's publisher, on the test Redis (wiped by ``redis_client``)."""
    pub = RedisPublisher(redis_server.url)
    yield pub
    pub.close()


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(redis_server: RedisServer) -> AsyncIterator[ServeFactory]:
    """Start `sisyphus serve` processes on Redis with a secret; stop them after the test."""
    started: list[Served] = []

    async def start(*args: str, port: int | None = None) -> Served:
        served = await start_serve(
            "--redis", redis_server.url, *args, port=port, env={"SISYPHUS_SECRET": SECRET}
        )
        started.append(served)
        return served

    yield start
    await asyncio.gather(*(stop_serve(served) for served in started))


NginxFactory = Callable[[list[int]], Nginx]


@pytest.fixture
def make_nginx(nginx_installed: None) -> Iterator[NginxFactory]:
    """Start nginx from deploy/nginx/sisyphus.conf in front of the given ports."""
    started: list[Nginx] = []

    def make(upstream_ports: list[int]) -> Nginx:
        nginx = Nginx(upstream_ports)
        started.append(nginx)
        nginx.start()
        return nginx

    yield make
    for nginx in started:
        nginx.close()
