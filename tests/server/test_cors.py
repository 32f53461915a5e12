"""Browser clients on other origins (CORS)."""

from __future__ import annotations

import pytest

from tests.conftest import ServiceFactory, grant
from tests.server.test_api import raw_request
from tests.support.sse_client import SseClient, status


@pytest.fixture
def broker_kind() -> str:
    """CORS is above the broker: these run on the embedded one."""
    return "embedded"


async def test_no_origin_is_allowed_by_default(make_service: ServiceFactory) -> None:
    """Without configured origins, no Access-Control-Allow-Origin is ever sent."""
    service = await make_service()
    await grant(service.port, "1", "room:1")
    client = await SseClient.open(service.port, "user=1", headers={"Origin": "https://evil.test"})
    assert "access-control-allow-origin" not in client.headers
    assert (await client.expect()).data == status("ok")


async def test_listed_origin_gets_credentials_and_others_nothing(
    make_service: ServiceFactory,
) -> None:
    """A configured origin is echoed with credentials allowed; another origin isn't."""
    service = await make_service(cors_origins=("https://app.test",))
    await grant(service.port, "1", "room:1")
    client = await SseClient.open(service.port, "user=1", headers={"Origin": "https://app.test"})
    assert client.headers["access-control-allow-origin"] == "https://app.test"
    assert client.headers["access-control-allow-credentials"] == "true"
    assert client.headers["vary"] == "Origin"
    assert client.headers["content-type"] == "text/event-stream"
    assert (await client.expect()).data == status("ok")
    other = await SseClient.open(service.port, "user=1", headers={"Origin": "https://evil.test"})
    assert "access-control-allow-origin" not in other.headers


async def test_wildcard_never_comes_with_credentials(make_service: ServiceFactory) -> None:
    """With `*`, any origin may read, but Access-Control-Allow-Credentials is never sent."""
    service = await make_service(cors_origins=("*",))
    await grant(service.port, "1", "room:1")
    client = await SseClient.open(service.port, "user=1", headers={"Origin": "https://any.test"})
    assert client.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in client.headers


async def test_preflight_allows_the_headers_event_source_clients_send(
    make_service: ServiceFactory,
) -> None:
    """Preflights from allowed origins get 204 allowing last-event-id, cache-control, auth."""
    service = await make_service(cors_origins=("https://app.test",))
    answer = await raw_request(
        service.port,
        b"OPTIONS / HTTP/1.1\r\nHost: x\r\nOrigin: https://app.test\r\n"
        b"Access-Control-Request-Method: GET\r\n"
        b"Access-Control-Request-Headers: last-event-id, authorization\r\n"
        b"Connection: close\r\n\r\n",
    )
    head = answer.decode().lower()
    assert head.startswith("http/1.1 204 ")
    assert "access-control-allow-origin: https://app.test" in head
    allowed = head.split("access-control-allow-headers:")[1].split("\r\n")[0]
    for name in ("last-event-id", "cache-control", "authorization"):
        assert name in allowed
    answer = await raw_request(
        service.port,
        b"OPTIONS /api/publish HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.test\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"access-control-allow-origin" not in answer.lower()
