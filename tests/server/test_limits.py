"""Limits: each breach gets a deliberate answer and is counted."""

from __future__ import annotations

import asyncio
import json

import pytest

from sisyphus.server.app import Service
from tests.conftest import ServiceFactory, grant
from tests.server.test_api import raw_request
from tests.support.sse_client import SseClient, status


@pytest.fixture
def broker_kind() -> str:
    """Limits are enforced above the broker: these run on the embedded one."""
    return "embedded"


async def json_refusal(service: Service, query: str) -> tuple[dict[str, str], int | None]:
    client = await SseClient.open(service.port, query + "&format=json")
    events = await client.until_closed()
    assert len(events) == 1
    assert client.status_code == 200  # a browser never retries after a non-200 answer
    return json.loads(events[0].data), events[0].retry


async def test_process_connection_limit_answers_error_with_jittered_retry(
    make_service: ServiceFactory,
) -> None:
    """Past max_connections, a new stream gets 200 + `error` (over_capacity) + a retry hint."""
    service = await make_service(max_connections=2)
    for user in ("1", "2", "3"):
        await grant(service.port, user, "room:1")
    held = [await SseClient.open(service.port, f"user={u}") for u in ("1", "2")]
    for client in held:
        assert (await client.expect()).data == status("ok")
    body, retry = await json_refusal(service, "user=3")
    assert body == {"status": "error", "reason": "over_capacity"}
    settings = service.settings
    assert retry is not None
    assert settings.retry_ms <= retry <= settings.retry_ms * 1.5
    assert service.metrics.limit_connections == 1
    await held[0].close()
    for _ in range(100):
        if service.hub.stream_count() < 2:
            break
        await asyncio.sleep(0.01)
    client = await SseClient.open(service.port, "user=3")
    assert (await client.expect()).data == status("ok")


async def test_per_user_connection_limit(make_service: ServiceFactory) -> None:
    """A user past max_connections_per_user gets `error` (too_many_connections); others don't."""
    service = await make_service(max_connections_per_user=2)
    await grant(service.port, "1", "room:1")
    await grant(service.port, "2", "room:1")
    for _ in range(2):
        client = await SseClient.open(service.port, "user=1")
        assert (await client.expect()).data == status("ok")
    body, _ = await json_refusal(service, "user=1")
    assert body == {"status": "error", "reason": "too_many_connections"}
    other = await SseClient.open(service.port, "user=2")
    assert (await other.expect()).data == status("ok")
    assert service.metrics.limit_user_connections == 1


async def test_channel_limit_refuses_oversized_sets(make_service: ServiceFactory) -> None:
    """A user whose set holds more than max_channels_per_user channels gets `failure`."""
    service = await make_service(max_channels_per_user=2)
    await grant(service.port, "1", "room:1", "room:2")
    client = await SseClient.open(service.port, "user=1")
    assert (await client.expect()).data == status("ok")
    await grant(service.port, "2", "room:1", "room:2", "room:3")
    body, _ = await json_refusal(service, "user=2")
    assert body == {"status": "failure", "reason": "too_many_channels"}
    await grant(service.port, "1", "room:3")  # the live stream of user 1 goes over the limit
    events = [e.data for e in await client.until_closed() if not e.is_noop]
    assert events[-1] == status("failure")
    assert service.metrics.limit_channels == 2


async def test_slow_request_head_is_cut(make_service: ServiceFactory) -> None:
    """A client that starts a request and stalls gets 408; one that sends nothing is closed."""
    service = await make_service(header_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(b"GET /?user=1 HTTP/1.1\r\nHost: x\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert service.metrics.header_timeouts == 2
    assert service.handshakes == {}


@pytest.mark.parametrize(
    "last_id",
    ["1" * 600, "abc", "12 3", "-5"],
    ids=["too long", "letters", "space", "negative"],
)
async def test_bad_last_event_id_gets_400(service: Service, last_id: str) -> None:
    """A Last-Event-ID that is too long or not an id we send is refused with 400."""
    await grant(service.port, "1", "room:1")
    request = f"GET /?user=1 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {last_id}\r\n\r\n".encode()
    answer = await raw_request(service.port, request)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Last-Event-ID" in answer
    answer = await raw_request(
        service.port, f"GET /?user=1&lastEventId={last_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
