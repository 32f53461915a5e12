"""The Python helper a main application imports, against a running service."""

from __future__ import annotations

import asyncio

import pytest
import redis

from sisyphus import client as helper
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory
from tests.support.redis_server import RedisServer
from tests.support.sse_client import SseClient, status


def publisher_for(service: Service, broker_kind: str) -> helper.Publisher:
    """The way a main app would reach this service: HTTP, or straight Redis when it has one."""
    if broker_kind == "redis":
        assert service.settings.redis_url is not None
        return helper.connect(redis_url=service.settings.redis_url)
    return helper.connect(url=f"http://127.0.0.1:{service.port}")


async def test_helper_grants_publishes_and_revokes(service: Service, broker_kind: str) -> None:
    """grant() lets a user in, publish() reaches it, revoke() of the last channel disconnects it."""
    publisher = publisher_for(service, broker_kind)
    await asyncio.to_thread(publisher.grant, "5", ["room:1", "room:2"])
    client = await SseClient.open(service.port, "user=5")
    assert (await client.expect()).data == status("ok")
    await asyncio.to_thread(publisher.publish, "room:2", "from the app")
    assert (await client.next_message()).data == "from the app"
    await asyncio.to_thread(publisher.publish, "room:1", b"bytes too")
    assert (await client.next_message()).data == "bytes too"
    await asyncio.to_thread(publisher.revoke, "5", ["room:1", "room:2"])
    events = [e.data for e in await client.until_closed() if not e.is_noop]
    assert events[-1] == status("disconnected")


@pytest.mark.parametrize(
    ("call", "args", "message"),
    [
        ("grant", ("1:channels", ["room:1"]), "invalid user id"),
        ("grant", ("1", []), "at least one channel"),
        ("revoke", ("1", ["bad name"]), "invalid channel"),
    ],
)
async def test_helper_refuses_invalid_names(
    service: Service, broker_kind: str, call: str, args: tuple[object, ...], message: str
) -> None:
    """The helper raises SisyphusClientError with a clear message before touching anything."""
    publisher = publisher_for(service, broker_kind)
    with pytest.raises(helper.SisyphusClientError, match=message):
        await asyncio.to_thread(getattr(publisher, call), *args)


async def test_http_helper_sends_the_api_key(make_service: ServiceFactory) -> None:
    """HttpPublisher with the right key is accepted; without it the error says 401."""
    service = await make_service(api_key="abc")
    url = f"http://127.0.0.1:{service.port}"
    with pytest.raises(helper.SisyphusClientError, match="401"):
        await asyncio.to_thread(helper.HttpPublisher(url).grant, "1", ["room:1"])
    await asyncio.to_thread(helper.HttpPublisher(url, api_key="abc").grant, "1", ["room:1"])


async def test_redis_helper_reports_an_unreachable_redis() -> None:
    """RedisPublisher against a dead Redis raises SisyphusClientError, not a redis exception."""
    from tests.support.redis_server import free_port

    publisher = helper.RedisPublisher(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(helper.SisyphusClientError, match="redis"):
        publisher.publish("room:1", "x")
    assert isinstance(redis.RedisError, type)


async def test_http_helper_refuses_bytes_that_are_not_utf8(service: Service) -> None:
    """HttpPublisher.publish(b"\\xff...") raises SisyphusClientError, not UnicodeDecodeError."""
    publisher = helper.HttpPublisher(f"http://127.0.0.1:{service.port}")
    with pytest.raises(helper.SisyphusClientError, match=r"not UTF-8 text \(byte 2\)"):
        await asyncio.to_thread(publisher.publish, "room:1", b"ok\xff\xfe")


@pytest.mark.parametrize(
    ("environ", "given", "ttl"),
    [
        ({}, {}, 3600),
        ({"SISYPHUS_HISTORY_MAX_AGE": "90"}, {}, 90),
        ({}, {"history_max_age": 45}, 45),
    ],
)
def test_redis_helper_retains_as_the_service_is_told(
    redis_client: redis.Redis,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str],
    given: dict[str, float],
    ttl: int,
) -> None:
    """RedisPublisher keeps history as SISYPHUS_HISTORY_MAX_AGE says, unless given its own value."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    publisher = helper.RedisPublisher(redis_server.url, **given)
    publisher.publish("news", "x")
    publisher.close()
    assert ttl - 5 < redis_client.ttl("sisyphus:history:news") <= ttl


def test_redis_helper_reports_a_bad_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad SISYPHUS_HISTORY_SIZE or Redis URL is a SisyphusClientError naming it."""
    monkeypatch.setenv("SISYPHUS_HISTORY_SIZE", "lots")
    with pytest.raises(helper.SisyphusClientError, match="SISYPHUS_HISTORY_SIZE='lots'"):
        helper.RedisPublisher("redis://127.0.0.1:1/0")
    monkeypatch.delenv("SISYPHUS_HISTORY_SIZE")
    with pytest.raises(helper.SisyphusClientError, match="invalid Redis URL"):
        helper.RedisPublisher("localhost:6379")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_http_helper_works_without_a_key_by_any_loopback_name(
    make_service: ServiceFactory, host: str
) -> None:
    """Without an API key, HttpPublisher on 127.0.0.1 or localhost passes the API's checks."""
    service = await make_service()
    publisher = helper.HttpPublisher(f"http://{host}:{service.port}")
    await asyncio.to_thread(publisher.grant, "1", ["room:1"])
    client = await SseClient.open(service.port, "user=1")
    assert (await client.expect()).data == status("ok")
    await asyncio.to_thread(publisher.publish, "room:1", "hello")
    assert (await client.next_message()).data == "hello"
    assert await asyncio.to_thread(publisher.position)
    await asyncio.to_thread(publisher.revoke, "1", ["room:1"])
