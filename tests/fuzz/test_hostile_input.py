"""Hostile input against a running service: it answers clearly and keeps serving.

The service runs on its own loop in a thread; these tests use blocking sockets,
so hypothesis can drive them.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sisyphus.config import Settings
from tests.support.threaded import ServiceThread


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """One service for the module, with user 1 on room:1 and user 2 on room:2."""
    thread = ServiceThread(Settings(port=0, keepalive=0.5, header_timeout=0.5))
    service = thread.start()
    for user, channel in (("1", "room:1"), ("2", "room:2")):
        request = urllib.request.Request(
            f"http://127.0.0.1:{service.port}/api/grant",
            data=json.dumps({"user": user, "channels": [channel]}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200
    yield service.port
    thread.stop()


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, close our sending side, return all the service answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the service may already have answered and closed
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def still_serves(port: int) -> None:
    """A normal client still gets its `ok` status and a message."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /?user=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"<status>ok</status>" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")


HOSTILE = [
    (b"\x00\xff\xfe garbage \r\n\r\n", b"HTTP/1.1 400 "),
    (b"GET /?user=%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n", b"<status>failure</status>"),
    (b"GET /?user=1%3Achannels HTTP/1.1\r\nHost: x\r\n\r\n", b"<status>failure</status>"),
    (b"GET /?user=* HTTP/1.1\r\nHost: x\r\n\r\n", b"<status>failure</status>"),
    (b"GET /?user=..%2F2 HTTP/1.1\r\nHost: x\r\n\r\n", b"<status>failure</status>"),
    (b"GET /?user=1%0D%0AX-Injected:%201 HTTP/1.1\r\nHost: x\r\n\r\n", b"<status>failure</status>"),
    (b"GET /?user=1\r\nX: y HTTP/1.1\r\n\r\n", b"HTTP/1.1 505 "),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", b"HTTP/1.1 400 "),
    (b"POST /api/publish HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"HTTP/1.1 400 "),
    (
        b"POST /api/publish HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"HTTP/1.1 4",
    ),
    (
        b"POST /api/publish HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 4",
    ),
    (b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"HTTP/1.1 400 "),
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 4"),
    (b"GET /?user=1 HTTP/9.9\r\nHost: x\r\n\r\n", b"HTTP/1.1 4"),
    (b"GET /?user=1 HTTP/1.0\r\n\r\n", b"<status>ok</status>"),
    (b"GET /?user=" + b"9" * 100_000 + b" HTTP/1.1\r\n\r\n", b"HTTP/1.1 414 "),
    (b"GET /?user=1 HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n", b"HTTP/1.1 431 "),
    (
        b"GET /?user=1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 400",
    ),
    (
        b"GET /?user=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /?user=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"<status>ok</status>",
    ),
]


@pytest.mark.parametrize(("data", "expected"), HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_requests_get_clear_answers(port: int, data: bytes, expected: bytes) -> None:
    """Each hostile request gets a clear answer, and the service keeps serving others."""
    answer = exchange(port, data)
    assert expected in answer
    assert answer.startswith(b"HTTP/1.1 ")
    still_serves(port)


def test_pipelined_second_stream_never_leaks_another_user(port: int) -> None:
    """A stream request followed by one for user 2 on the same socket serves user 1 only."""
    answer = exchange(
        port,
        b"GET /?user=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /?user=2 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 ") == 1
    assert answer.count(b"<status>ok</status>") == 1


def test_valid_requests_before_garbage_in_one_read_are_answered_first(port: int) -> None:
    """Pipelined requests that precede a malformed one get their answers, then the 400."""
    answer = exchange(
        port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"\x16\x03\x01 garbage\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.index(b"HTTP/1.1 200 OK") < answer.index(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1 ") == 3
    still_serves(port)


TOKEN = st.binary(min_size=0, max_size=40)
LINE_PART = st.one_of(
    st.sampled_from(
        [b"GET", b"POST", b"OPTIONS", b"/", b"/?user=1", b"/api/publish", b" ", b"\r\n"]
    ),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"Content-Length: ", b"Host: x", b":", b"%", b"?"]),
    TOKEN,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(request_line=st.lists(LINE_PART, max_size=8), headers=st.lists(LINE_PART, max_size=12))
def test_fuzzed_request_lines_and_headers_never_break_the_service(
    port: int, request_line: list[bytes], headers: list[bytes]
) -> None:
    """Whatever bytes arrive, any answer is well-formed HTTP and the service stays up."""
    data = b"".join(request_line) + b"\r\n" + b"".join(headers) + b"\r\n\r\n"
    answer = exchange(port, data)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")


def test_service_still_serves_after_the_fuzzing(port: int) -> None:
    """After every hostile and fuzzed input above, a normal client is served as usual."""
    still_serves(port)
