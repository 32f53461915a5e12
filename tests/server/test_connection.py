"""The HTTP connection over real sockets: HEAD, 100-continue, framing, flow control."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import socket

import pytest

from sisyphus.protocol.http import RequestReader
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory, grant, publish
from tests.server.test_api import raw_request
from tests.support.sse_client import SseClient, status


@pytest.fixture
def broker_kind() -> str:
    """The connection is above the broker: these run on the embedded one."""
    return "embedded"


async def read_answer(reader: asyncio.StreamReader, body: bool = True) -> tuple[bytes, bytes]:
    """One answer from a keep-alive connection: (head, body); no body read if ``body`` is off."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    if not body:
        return head, b""
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def content_length(head: bytes) -> int:
    return int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/nope"])
async def test_head_gets_the_get_head_without_a_body(service: Service, path: str) -> None:
    """HEAD answers carry the GET answer's headers and length, no body: keep-alive stays in sync."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got_head, got_body = await read_answer(reader)
        writer.write(
            f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        head, _ = await read_answer(reader, body=False)
        assert head.split(b"\r\n")[0] == got_head.split(b"\r\n")[0]
        assert b"Content-Type: " in head
        if path != "/metrics":  # the metrics change between the two calls
            assert content_length(head) == len(got_body)
        else:
            assert content_length(head) > 0
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # the next answer, not a stray body
        assert rest.endswith(b'{"status": "alive"}')
    finally:
        writer.close()
        await writer.wait_closed()


async def test_expect_100_continue_is_answered_before_the_body_is_sent(service: Service) -> None:
    """A client sending `Expect: 100-continue` gets `100 Continue`, sends its body, gets 200."""
    body = json.dumps({"user": "1", "channels": ["room:5"]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        writer.write(
            b"POST /api/grant HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head, answer = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert json.loads(answer)["granted"] == ["room:5"]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_expect_100_continue_behind_a_pipelined_request_waits_its_turn(
    service: Service,
) -> None:
    """With an answer still due before it, the 100 Continue comes after that answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 32\r\n\r\n"
        )
        head, body = await read_answer(reader)
        assert body == b'{"status": "alive"}'
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b'{"channel": "room:5", "data": 1}')
        head, _ = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_unsupported_expectation_gets_417(service: Service) -> None:
    """An `Expect` other than 100-continue gets 417 Expectation Failed."""
    answer = await raw_request(
        service.port,
        b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 200-ok\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 417 ")


async def test_identity_then_chunked_is_refused_and_nothing_is_published(
    service: Service,
) -> None:
    """`Transfer-Encoding: identity, chunked` gets 400; the body is not read as chunked."""
    await grant(service.port, "1", "room:5")
    client = await SseClient.open(service.port, "user=1")
    assert (await client.expect()).data == status("ok")
    body = b'{"channel": "room:5", "data": "smuggled"}'
    answer = await raw_request(
        service.port,
        b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: identity, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Transfer-Encoding" in answer
    await publish(service.port, "room:5", "after")
    assert (await client.next_message()).data == "after"  # nothing was published before it


async def test_thousands_of_pipelined_requests_in_one_write_are_all_answered(
    service: Service,
) -> None:
    """A client may pipeline far more requests than are parsed at once: each gets its answer."""
    requests = b"".join(
        b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % (b"healthz" if i % 2 else b"nope")
        for i in range(5000)
    )
    answer = await raw_request(
        service.port, requests + b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"404", b"200"] * 2500 + [b"200"]
    assert answer.endswith(b'{"status": "ready"}')


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_pipelining_client_that_never_reads_is_aborted_at_the_header_timeout(
    make_service: ServiceFactory,
) -> None:
    """A client that pipelines requests and never reads its answers is cut, not kept forever."""
    service = await make_service(header_timeout=0.3)
    await asyncio.sleep(0.05)
    baseline = open_fds()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    batch = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20

    async def flood() -> None:
        """Send until the service stops reading (sends block) and then resets us."""
        while True:
            await loop.sock_sendall(sock, batch)

    try:
        await loop.sock_connect(sock, ("127.0.0.1", service.port))
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            await asyncio.wait_for(flood(), 5)
        for _ in range(100):
            if open_fds() <= baseline + 1:
                break
            await asyncio.sleep(0.05)
        assert open_fds() == baseline + 1  # our socket only: the service let go of its end
        assert service.metrics.header_timeouts >= 1
        assert service.handshakes == {}
    finally:
        sock.close()


async def test_a_closed_connection_leaves_no_garbage_for_the_cyclic_collector(
    service: Service,
) -> None:
    """Streams, API calls and bad requests that came and went are freed as they end: a
    reconnect storm leaves no pile of dead parsers that a collection pass would have to
    walk (and pause every stream for)."""
    await grant(service.port, "1", "room:1")
    gc.collect()
    gc.disable()
    try:
        before = sum(isinstance(o, RequestReader) for o in gc.get_objects())
        for _ in range(20):
            client = await SseClient.open(service.port, "user=1")
            assert (await client.expect()).data == status("ok")
            await client.close()
            answer = await raw_request(
                service.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert answer.startswith(b"HTTP/1.1 200 OK")
            answer = await raw_request(service.port, b"NOT HTTP AT ALL\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ")  # a rejected request drops its reader too
        for _ in range(100):
            if service.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        assert service.open_connections == 0
        after = sum(isinstance(o, RequestReader) for o in gc.get_objects())
        assert after <= before, f"{after - before} request readers wait for the collector"
    finally:
        gc.enable()
