"""Browser clients on other origins (CORS)."""

from __future__ import annotations

import pytest

from sisyphus.server.app import Service
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


async def vary_of(port: int, request: bytes) -> list[str]:
    """The Vary values of the answer to one raw request."""
    head = (await raw_request(port, request)).split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return [
        line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.startswith("Vary:")
    ]


@pytest.mark.parametrize("origins", [("https://app.test",), ("*",)], ids=["list", "wildcard"])
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nOrigin: https://app.test\r\nConnection: close\r\n\r\n",
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01 garbage\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01 garbage\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 34\r\nConnection: close\r\n\r\n"
        b'{"channel": "room:5", "data": "x"}',
        b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
        b"Origin: https://evil.test\r\nConnection: close\r\n\r\n{}",
        b"OPTIONS /api/publish HTTP/1.1\r\nHost: x\r\nOrigin: https://app.test\r\n"
        b"Connection: close\r\n\r\n",
        b"OPTIONS / HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.test\r\nConnection: close\r\n\r\n",
    ],
    ids=[
        "ops",
        "ops-head",
        "ops-origin",
        "404",
        "405",
        "400",
        "400-after-pipelined",
        "api",
        "api-403",
        "preflight",
        "preflight-403",
    ],
)
async def test_with_origins_configured_every_answer_varies_on_origin(
    make_service: ServiceFactory, origins: tuple[str, ...], request_bytes: bytes
) -> None:
    """With CORS on, every answer says `Vary: Origin` once, so no cache mixes origins up."""
    service = await make_service(cors_origins=origins)
    vary = await vary_of(service.port, request_bytes)
    assert vary == ["Origin"]


async def test_with_origins_configured_a_refused_stream_request_varies_on_origin(
    make_service: ServiceFactory,
) -> None:
    """A stream request refused with 400 (bad Last-Event-ID) also says `Vary: Origin`."""
    service = await make_service(cors_origins=("https://app.test",))
    request = b"GET /?user=1 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: abc\r\n\r\n"
    assert await vary_of(service.port, request) == ["Origin"]


async def test_with_origins_configured_streams_vary_on_origin(
    make_service: ServiceFactory,
) -> None:
    """Streams, with or without an Origin, and their refusals carry `Vary: Origin`."""
    service = await make_service(cors_origins=("https://app.test",))
    await grant(service.port, "1", "room:1")
    for headers in ({}, {"Origin": "https://app.test"}, {"Origin": "https://evil.test"}):
        client = await SseClient.open(service.port, "user=1", headers=headers)
        assert client.headers["vary"] == "Origin"
        assert (await client.expect()).data == status("ok")
    refused = await SseClient.open(service.port, "user=unknown")
    assert refused.headers["vary"] == "Origin"


async def test_without_origins_configured_no_vary_is_sent(service: Service) -> None:
    """With CORS off (the default), answers carry no Vary header."""
    assert await vary_of(service.port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n") == []
