"""The asyncio helpers a main application awaits, against a running service on each broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sisyphus import client as helper
from sisyphus.protocol.resume import parse_event_id
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory
from tests.support.redis_server import free_port
from tests.support.sse_client import SseClient, status


@pytest.fixture
async def publisher(service: Service, broker_kind: str) -> AsyncIterator[helper.AsyncPublisher]:
    """The way an asyncio app reaches this service: the API over HTTP, or straight Redis."""
    chosen: helper.AsyncPublisher
    if broker_kind == "redis":
        assert service.settings.redis_url is not None
        chosen = helper.AsyncRedisPublisher(service.settings.redis_url)
    else:
        chosen = helper.AsyncHttpPublisher(f"http://127.0.0.1:{service.port}")
    yield chosen
    await chosen.aclose()


async def test_async_helper_grants_publishes_and_revokes(
    service: Service, publisher: helper.AsyncPublisher
) -> None:
    """await grant() lets a user in, publish() reaches it, revoke() of the last channel ends it."""
    granted = await publisher.grant("5", ["room:1", "room:2"])
    client = await SseClient.open(service.port, "user=5")
    assert (await client.expect()).data == status("ok")
    published = await publisher.publish("room:2", "from the async app")
    assert (await client.next_message()).data == "from the async app"
    await publisher.publish("room:1", b"bytes too")
    assert (await client.next_message()).data == "bytes too"
    now = parse_event_id(await publisher.position())
    assert parse_event_id(granted).seqs < parse_event_id(published).seqs <= now.seqs
    await publisher.revoke("5", ["room:1", "room:2"])
    events = [e.data for e in await client.until_closed() if not e.is_noop]
    assert events[-1] == status("disconnected")


async def test_a_stream_resumed_from_position_misses_nothing(
    service: Service, publisher: helper.AsyncPublisher
) -> None:
    """position() rendered into a page, then a publish, then connect with it: the message comes."""
    await publisher.grant("6", ["room:1"])
    position = await publisher.position()
    await publisher.publish("room:1", "between render and connect")
    client = await SseClient.open(service.port, f"user=6&lastEventId={position}")
    assert (await client.expect()).data == status("ok")
    assert (await client.next_message()).data == "between render and connect"


@pytest.mark.parametrize(
    ("call", "args", "message"),
    [
        ("grant", ("1:channels", ["room:1"]), "invalid user id"),
        ("grant", ("1", []), "at least one channel"),
        ("revoke", ("1", ["bad name"]), "invalid channel"),
    ],
)
async def test_async_helper_refuses_invalid_names(
    publisher: helper.AsyncPublisher, call: str, args: tuple[object, ...], message: str
) -> None:
    """The async helper raises SisyphusClientError with a clear message, as the sync one does."""
    with pytest.raises(helper.SisyphusClientError, match=message):
        await getattr(publisher, call)(*args)


async def test_async_http_helper_sends_the_api_key(make_service: ServiceFactory) -> None:
    """AsyncHttpPublisher with the right key is accepted; without it the error says 401."""
    service = await make_service(api_key="k3y-of-16-chars!")
    url = f"http://127.0.0.1:{service.port}"
    async with helper.AsyncHttpPublisher(url) as anonymous:
        with pytest.raises(helper.SisyphusClientError, match="401"):
            await anonymous.grant("1", ["room:1"])
    async with helper.AsyncHttpPublisher(url, api_key="k3y-of-16-chars!") as keyed:
        assert await keyed.grant("1", ["room:1"])


async def test_async_http_helper_refuses_bytes_that_are_not_utf8(service: Service) -> None:
    """AsyncHttpPublisher.publish(b"\\xff...") raises SisyphusClientError, not a decode error."""
    async with helper.AsyncHttpPublisher(f"http://127.0.0.1:{service.port}") as publisher:
        with pytest.raises(helper.SisyphusClientError, match=r"not UTF-8 text \(byte 2\)"):
            await publisher.publish("room:1", b"ok\xff\xfe")


async def test_async_helpers_report_an_unreachable_service_or_redis() -> None:
    """Nothing listening: both raise SisyphusClientError, never an httpx or redis exception."""
    port = free_port()
    async with helper.AsyncHttpPublisher(f"http://127.0.0.1:{port}", timeout=0.5) as http:
        with pytest.raises(helper.SisyphusClientError, match="can't reach Sisyphus"):
            await http.publish("room:1", "x")
    async with helper.AsyncRedisPublisher(f"redis://127.0.0.1:{port}/0", timeout=0.5) as direct:
        with pytest.raises(helper.SisyphusClientError, match="redis"):
            await direct.publish("room:1", "x")
        with pytest.raises(helper.SisyphusClientError, match="redis"):
            await direct.position()
    with pytest.raises(helper.SisyphusClientError, match="invalid Redis URL"):
        helper.AsyncRedisPublisher("localhost:6379")
