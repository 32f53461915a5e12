"""The publish-and-rights API and the HTTP edges: keys, bad bodies, 404, 405."""

from __future__ import annotations

import asyncio
import json
import re
from http import HTTPStatus

import pytest

from sisyphus.brokers.memory import MemoryBroker
from sisyphus.metrics import Metrics
from sisyphus.protocol.cors import CorsPolicy
from sisyphus.protocol.http import Request
from sisyphus.server.api import MAX_DATA_DEPTH, Api
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory, api, grant
from tests.support.sse_client import SseClient, status


async def raw_request(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_api_key_is_required_when_configured(make_service: ServiceFactory) -> None:
    """With an API key set, calls without it or with a wrong one get 401 and change nothing."""
    service = await make_service(api_key="s3cret")
    body = {"user": "1", "channels": ["room:5"]}
    assert (await api(service.port, "/api/grant", body))[0] == 401
    assert (await api(service.port, "/api/grant", body, api_key="wrong"))[0] == 401
    assert (await api(service.port, "/api/grant", body, api_key="s3cre"))[0] == 401
    client = await SseClient.open(service.port, "user=1")
    assert [e.data for e in await client.until_closed()] == [status("failure")]
    status_code, answer = await api(service.port, "/api/grant", body, api_key="s3cret")
    assert status_code == 200
    assert answer["user"] == "1"
    assert answer["granted"] == ["room:5"]
    assert re.fullmatch(r"[0-9a-f]+-\d+-\d+", answer["id"])
    client = await SseClient.open(service.port, "user=1")
    assert (await client.expect()).data == status("ok")
    publish = {"channel": "room:5", "data": "x"}
    assert (await api(service.port, "/api/publish", publish))[0] == 401
    assert (await api(service.port, "/api/publish", publish, api_key="s3cret"))[0] == 200
    assert (await client.next_message()).data == "x"


async def test_without_key_only_loopback_may_call() -> None:
    """Without a key, a non-loopback peer gets 403 and nothing is published."""
    received: list[tuple[str, bytes]] = []
    broker = MemoryBroker()
    broker.bind(
        lambda channel, payload, *position: received.append((channel, payload)), lambda: None
    )
    broker.subscribe(["room:5"])
    handler = Api(broker, None, Metrics(), CorsPolicy(()))
    request = Request(
        method="POST",
        path="/api/publish",
        query={},
        headers={"host": "127.0.0.1:3001", "content-type": "application/json"},
        body=b'{"channel": "room:5", "data": "x"}',
        keep_alive=False,
        http_version="1.1",
    )
    answer = await handler.handle(request, "203.0.113.9")
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert received == []
    answer = await handler.handle(request, "127.0.0.1")
    assert answer.startswith(b"HTTP/1.1 200 ")
    answer = await handler.handle(request, "::1")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert received == [("room:5", b"x"), ("room:5", b"x")]


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/api/publish", {"data": "x"}, "channel"),
        ("/api/publish", {"channel": "room:5"}, "data"),
        ("/api/publish", {"channel": "room 5", "data": "x"}, "invalid channel"),
        ("/api/publish", {"channel": "room\t5", "data": "x"}, "invalid channel"),
        ("/api/grant", {"user": "1:channels", "channels": ["room:5"]}, "invalid user id"),
        ("/api/grant", {"user": "../2", "channels": ["room:5"]}, "invalid user id"),
        ("/api/grant", {"user": "1", "channels": []}, "non-empty list"),
        ("/api/grant", {"user": "1", "channels": "room:5"}, "non-empty list"),
        ("/api/revoke", {"user": 1, "channels": ["room:5"]}, "user"),
        ("/api/revoke", {"user": "1", "channels": ["room:5", 7]}, "non-empty list"),
    ],
)
async def test_invalid_api_bodies_get_400_naming_the_problem(
    service: Service, route: str, body: dict[str, object], message: str
) -> None:
    """A malformed call gets 400 with an error that says what is wrong."""
    status_code, answer = await api(service.port, route, body)
    assert status_code == 400
    assert message in answer["error"]


async def test_non_json_body_gets_400(service: Service) -> None:
    """A body that isn't JSON gets 400, and the service keeps serving."""
    data = (
        b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: close\r\n\r\nabc"
    )
    answer = await raw_request(service.port, data)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"not valid JSON" in answer
    await grant(service.port, "1", "room:5")


@pytest.mark.parametrize(
    "body",
    [
        b'{"channel": "room:5", "data": "\\ud800"}',  # a lone surrogate: not Unicode text
        b'{"channel": "room:5", "data": "\xff\xfe"}',  # not UTF-8
    ],
)
async def test_body_that_is_not_unicode_text_gets_400_and_publishes_nothing(
    service: Service, body: bytes
) -> None:
    """Text that could not reach a browser as UTF-8 is refused, not sent mangled."""
    await grant(service.port, "1", "room:5")
    client = await SseClient.open(service.port, "user=1")
    assert (await client.expect()).data == status("ok")
    head = (
        "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    answer = await raw_request(service.port, head.encode() + body)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"not valid JSON" in answer
    await api(service.port, "/api/publish", {"channel": "room:5", "data": "after"})
    assert (await client.next_message()).data == "after"  # nothing was published before it


async def test_oversized_body_gets_413(make_service: ServiceFactory) -> None:
    """A body over the message size limit gets 413 and is not published."""
    service = await make_service(max_message_bytes=100)
    body = json.dumps({"channel": "room:5", "data": "x" * 200}).encode()
    head = f"POST /api/publish HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
    answer = await raw_request(service.port, head.encode() + body)
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_json_values_are_published_as_json_text(service: Service) -> None:
    """Publishing a JSON object sends its compact JSON text to the browser."""
    await grant(service.port, "1", "room:5")
    client = await SseClient.open(service.port, "user=1")
    assert (await client.expect()).data == status("ok")
    status_code, _ = await api(
        service.port, "/api/publish", {"channel": "room:5", "data": {"a": [1, 2]}}
    )
    assert status_code == 200
    assert (await client.next_message()).data == '{"a":[1,2]}'


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", HTTPStatus.NOT_FOUND),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", HTTPStatus.METHOD_NOT_ALLOWED),
        (b"DELETE /?user=1 HTTP/1.1\r\nHost: x\r\n\r\n", HTTPStatus.METHOD_NOT_ALLOWED),
        (
            b"GET /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            HTTPStatus.METHOD_NOT_ALLOWED,
        ),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", HTTPStatus.BAD_REQUEST),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", HTTPStatus.REQUEST_URI_TOO_LONG),
        (
            b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
    ],
)
async def test_wrong_paths_methods_and_garbage_get_clear_http_errors(
    service: Service, request_bytes: bytes, expected: HTTPStatus
) -> None:
    """Unknown paths get 404, wrong methods 405, garbage 400; the service stays up."""
    answer = await raw_request(service.port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {expected.value} ".encode())
    await grant(service.port, "1", "room:5")  # still serving


async def test_keep_alive_api_requests_are_answered_in_order(service: Service) -> None:
    """Pipelined API requests on one connection get their answers in order."""
    one = json.dumps({"user": "1", "channels": ["room:5"]}).encode()
    two = json.dumps({"user": "1", "channels": ["room:6"]}).encode()
    data = (
        b"POST /api/grant HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
        b"POST /api/revoke HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    ) % (len(one), one, len(two), two)
    answer = await raw_request(service.port, data)
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.index(b'"granted"') < answer.index(b'"revoked"')


def nested(depth: int) -> bytes:
    """``depth`` JSON arrays inside each other, around one string (built as text: a JSON
    encoder would hit Python's recursion limit)."""
    return b"[" * depth + b'"core"' + b"]" * depth


async def test_deeply_nested_data_gets_400_and_the_limit_passes(service: Service) -> None:
    """Data nested 1,000 arrays deep gets 400 saying so; 100 levels are published as JSON text."""
    await grant(service.port, "1", "room:5")
    client = await SseClient.open(service.port, "user=1")
    assert (await client.expect()).data == status("ok")
    body = b'{"channel": "room:5", "data": %s}' % nested(1000)
    answer = await raw_request(service.port, api_request(body, "Content-Type: application/json"))
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.endswith(b'{"error": "\\"data\\" nests deeper than %d levels"}' % MAX_DATA_DEPTH)
    body = b'{"channel": "room:5", "data": %s}' % nested(MAX_DATA_DEPTH)
    answer = await raw_request(service.port, api_request(body, "Content-Type: application/json"))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert (await client.next_message()).data == nested(MAX_DATA_DEPTH).decode()


def api_request(body: bytes, *headers: str, route: str = "/api/publish") -> bytes:
    """A raw API request with these header lines (Host and Content-Length are added)."""
    lines = [f"POST {route} HTTP/1.1", f"Content-Length: {len(body)}", "Connection: close"]
    if not any(line.lower().startswith("host:") for line in headers):
        lines.append("Host: 127.0.0.1")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode() + body


PUBLISH = b'{"channel": "room:5", "data": "x"}'


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
    ],
)
async def test_api_body_without_the_json_type_gets_415(
    service: Service, content_type: str | None
) -> None:
    """A body that isn't labelled application/json (what a web form can send) gets 415."""
    headers = [] if content_type is None else [f"Content-Type: {content_type}"]
    answer = await raw_request(service.port, api_request(PUBLISH, *headers))
    assert answer.startswith(b"HTTP/1.1 415 ")
    assert b"application/json" in answer


@pytest.mark.parametrize(
    "content_type", ["application/json", "Application/JSON", "application/json; charset=utf-8"]
)
async def test_api_accepts_the_json_type_with_parameters_in_any_case(
    service: Service, content_type: str
) -> None:
    """`application/json`, in any case and with a charset, is accepted."""
    answer = await raw_request(service.port, api_request(PUBLISH, f"Content-Type: {content_type}"))
    assert answer.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("origin", ["https://evil.test", "null", "http://127.0.0.1:8080"])
async def test_api_refuses_requests_from_web_pages_of_unlisted_origins(
    make_service: ServiceFactory, origin: str
) -> None:
    """An API request with an Origin outside the allow-list gets 403 and changes nothing."""
    service = await make_service(cors_origins=("https://app.test",))
    body = b'{"user": "1", "channels": ["room:5"]}'
    answer = await raw_request(
        service.port,
        api_request(
            body, "Content-Type: application/json", f"Origin: {origin}", route="/api/grant"
        ),
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"origin not allowed" in answer
    client = await SseClient.open(service.port, "user=1")
    assert [e.data for e in await client.until_closed()] == [status("failure")]
    answer = await raw_request(
        service.port,
        api_request(
            body, "Content-Type: application/json", "Origin: https://app.test", route="/api/grant"
        ),
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"Access-Control-Allow-Origin: https://app.test\r\n" in answer


async def test_a_wildcard_origin_list_opens_streams_never_the_api(
    make_service: ServiceFactory,
) -> None:
    """With `--cors-origins '*'` and no key, any site's page may read streams, but its
    API requests (and their preflights) get 403 and change nothing."""
    service = await make_service(cors_origins=("*",))
    body = b'{"user": "1", "channels": ["room:5"]}'
    origin = "Origin: https://evil.test"
    answer = await raw_request(
        service.port,
        api_request(body, "Content-Type: application/json", origin, route="/api/grant"),
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"origin not allowed" in answer
    preflight = b"OPTIONS %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s\r\n"
    preflight += b"Access-Control-Request-Method: POST\r\n\r\n"
    answer = await raw_request(service.port, preflight % (b"/api/grant", origin.encode()))
    assert answer.startswith(b"HTTP/1.1 403 ")
    answer = await raw_request(service.port, preflight % (b"/", origin.encode()))
    assert answer.startswith(b"HTTP/1.1 204 ")
    client = await SseClient.open(service.port, "user=1", headers={"Origin": "https://evil.test"})
    assert [e.data for e in await client.until_closed()] == [status("failure")]
    assert client.headers["access-control-allow-origin"] == "*"


async def test_api_refuses_any_origin_when_none_is_configured(service: Service) -> None:
    """Without an allow-list, every request carrying an Origin (a web page's) gets 403."""
    answer = await raw_request(
        service.port,
        api_request(PUBLISH, "Content-Type: application/json", "Origin: http://localhost:3000"),
    )
    assert answer.startswith(b"HTTP/1.1 403 ")


@pytest.mark.parametrize(
    "host", ["evil.test", "evil.test:3001", "127.0.0.1.nip.io", "localhost.evil.test", "0.0.0.0"]
)
async def test_without_key_a_non_loopback_host_gets_403(service: Service, host: str) -> None:
    """Without a key, a Host naming another site (DNS rebinding) gets 403 even from loopback."""
    answer = await raw_request(
        service.port, api_request(PUBLISH, "Content-Type: application/json", f"Host: {host}")
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"Host" in answer


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:3001", "127.0.0.1:3001", "127.8.9.10", "[::1]", "[::1]:3001"]
)
async def test_without_key_loopback_hosts_are_accepted(service: Service, host: str) -> None:
    """Without a key, a loopback Host (any port) is accepted from a loopback peer."""
    answer = await raw_request(
        service.port, api_request(PUBLISH, "Content-Type: application/json", f"Host: {host}")
    )
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_with_a_key_any_host_is_accepted(make_service: ServiceFactory) -> None:
    """With an API key, the Host is the proxy's business: a public name is accepted."""
    service = await make_service(api_key="s3cret")
    answer = await raw_request(
        service.port,
        api_request(
            PUBLISH,
            "Content-Type: application/json",
            "Host: push.example.com",
            "Authorization: Bearer s3cret",
        ),
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
