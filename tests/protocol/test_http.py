"""Request parsing, limits and response heads (sisyphus.protocol.http)."""

from __future__ import annotations

import contextlib
import gc
import itertools
import weakref
from collections.abc import Iterable
from http import HTTPStatus
from urllib.parse import parse_qs

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sisyphus.errors import PeerError, SisyphusError
from sisyphus.protocol import http
from sisyphus.protocol.http import Request, RequestReader

MAX_HEAD = 8192
MAX_BODY = 1024

GET = (
    b"GET /?user=42&lastEventId=ab-1-2 HTTP/1.1\r\n"
    b"Host: example.test\r\n"
    b"X-Custom-Header: Some Value\r\n"
    b"LAST-EVENT-ID: ab-3-4\r\n"
    b"\r\n"
)
GET_REQUEST = Request(
    method="GET",
    path="/",
    query={"user": ["42"], "lastEventId": ["ab-1-2"]},
    headers={
        "host": "example.test",
        "x-custom-header": "Some Value",
        "last-event-id": "ab-3-4",
    },
    body=b"",
    keep_alive=True,
    http_version="1.1",
)

POST = (
    b"POST /api/publish HTTP/1.1\r\n"
    b"Host: example.test\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 34\r\n"
    b"\r\n"
    b'{"channel":"room:1","data":"a\\nb"}'
)
POST_REQUEST = Request(
    method="POST",
    path="/api/publish",
    query={},
    headers={
        "host": "example.test",
        "content-type": "application/json",
        "content-length": "34",
    },
    body=b'{"channel":"room:1","data":"a\\nb"}',
    keep_alive=True,
    http_version="1.1",
)


def feed_all(
    chunks: Iterable[bytes], max_head: int = MAX_HEAD, max_body: int = MAX_BODY
) -> list[Request]:
    """Feed ``chunks`` in order to one reader; return every request it completed."""
    reader = RequestReader(max_head, max_body)
    requests: list[Request] = []
    for chunk in chunks:
        requests.extend(reader.feed(chunk))
    return requests


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def peer_error(
    chunks: Iterable[bytes], max_head: int = MAX_HEAD, max_body: int = MAX_BODY
) -> PeerError:
    """The PeerError feeding ``chunks`` raises."""
    with pytest.raises(PeerError) as caught:
        feed_all(chunks, max_head, max_body)
    return caught.value


# Whole, byte by byte, split, pipelined ------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [(GET, GET_REQUEST), (POST, POST_REQUEST)])
def test_request_fed_whole(data: bytes, expected: Request) -> None:
    """A request arriving in one read is parsed into one Request."""
    assert feed_all([data]) == [expected]


@pytest.mark.parametrize(("data", "expected"), [(GET, GET_REQUEST), (POST, POST_REQUEST)])
def test_request_fed_byte_by_byte(data: bytes, expected: Request) -> None:
    """A request trickling in one byte per read is parsed the same."""
    assert feed_all(byte_by_byte(data)) == [expected]


@pytest.mark.parametrize(("data", "expected"), [(GET, GET_REQUEST), (POST, POST_REQUEST)])
def test_request_split_at_every_position(data: bytes, expected: Request) -> None:
    """Wherever the network splits a request in two, it is parsed the same."""
    for cut in range(len(data) + 1):
        assert feed_all([data[:cut], data[cut:]]) == [expected], cut


@pytest.mark.parametrize(("data", "expected"), [(GET, GET_REQUEST), (POST, POST_REQUEST)])
def test_request_is_returned_only_when_complete(data: bytes, expected: Request) -> None:
    """No request comes out before its last byte, and it comes out on that byte."""
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) == []
    assert reader.feed(data[-1:]) == [expected]


def test_pipelined_requests_fed_whole() -> None:
    """Two requests sent back to back in one read both come out, in order."""
    assert feed_all([GET + POST]) == [GET_REQUEST, POST_REQUEST]
    assert feed_all([POST + GET]) == [POST_REQUEST, GET_REQUEST]


def test_pipelined_requests_fed_byte_by_byte() -> None:
    """Two pipelined requests trickling in byte by byte both come out, in order."""
    assert feed_all(byte_by_byte(GET + POST)) == [GET_REQUEST, POST_REQUEST]


def test_pipelined_requests_split_at_every_position() -> None:
    """Wherever a pipelined pair is split, both requests come out, in order."""
    data = GET + POST
    for cut in range(len(data) + 1):
        assert feed_all([data[:cut], data[cut:]]) == [GET_REQUEST, POST_REQUEST], cut


def test_pipelined_second_request_comes_out_with_its_last_byte() -> None:
    """The first request is returned as soon as it completes, the second only when done."""
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    assert reader.feed(GET + POST[:10]) == [GET_REQUEST]
    assert reader.feed(POST[10:-1]) == []
    assert reader.feed(POST[-1:]) == [POST_REQUEST]


def test_many_requests_on_one_connection() -> None:
    """A keep-alive connection may send many requests, one read after the other."""
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    for _ in range(50):
        assert reader.feed(GET) == [GET_REQUEST]


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(GET + POST + GET)), max_size=12))
def test_any_chunking_of_a_pipeline(cuts: list[int]) -> None:
    """However the bytes of a pipeline are chunked, the same requests come out."""
    data = GET + POST + GET
    bounds = [0, *sorted(cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert feed_all(chunks) == [GET_REQUEST, POST_REQUEST, GET_REQUEST]


def test_chunked_body() -> None:
    """A body sent with chunked transfer encoding is joined into one body."""
    data = (
        b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    for chunks in ([data], byte_by_byte(data)):
        (request,) = feed_all(chunks)
        assert request.body == b"abcde"
        assert request.method == "POST"


CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED", b" chunked "])
def test_chunked_is_accepted_in_any_case(coding: bytes) -> None:
    """`Transfer-Encoding: chunked`, in any letter case, gives the decoded body."""
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: " + coding + b"\r\n\r\n" + CHUNKED_BODY
    for chunks in ([data], byte_by_byte(data)):
        (request,) = feed_all(chunks)
        assert request.body == b"abc"


@pytest.mark.parametrize(
    "codings",
    [
        b"Transfer-Encoding: identity, chunked\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: chunked, identity\r\n",
        b"Transfer-Encoding: identity\r\n",
        b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ],
)
def test_transfer_codings_other_than_exactly_chunked_are_400(codings: bytes) -> None:
    """Any Transfer-Encoding but exactly `chunked` is refused (a proxy may read it otherwise)."""
    data = b"POST / HTTP/1.1\r\nHost: a\r\n" + codings + b"\r\n" + CHUNKED_BODY
    for chunks in ([data], byte_by_byte(data)):
        assert peer_error(chunks).status == HTTPStatus.BAD_REQUEST


EXPECTING = b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n"


def test_expect_100_continue_is_awaited_until_the_body_comes() -> None:
    """After a head with `Expect: 100-continue`, the reader says the client awaits a 100."""
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    assert reader.feed(EXPECTING) == []
    assert reader.awaiting_continue
    (request,) = reader.feed(b"abc")
    assert request.body == b"abc"
    assert not reader.awaiting_continue


def test_expect_100_continue_with_its_body_in_the_same_read_needs_no_100() -> None:
    """A body that came with its head is read at once: no 100 Continue is due."""
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    assert len(reader.feed(EXPECTING + b"abc")) == 1
    assert not reader.awaiting_continue


def test_expect_100_continue_from_http_1_0_gets_no_100() -> None:
    """HTTP/1.0 has no interim answers: the body is just awaited."""
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    assert reader.feed(EXPECTING.replace(b"HTTP/1.1", b"HTTP/1.0")) == []
    assert not reader.awaiting_continue


def test_other_expectations_are_417() -> None:
    """An expectation other than 100-continue gets 417 Expectation Failed."""
    data = b"POST / HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 3\r\n\r\nabc"
    for chunks in ([data], byte_by_byte(data)):
        assert peer_error(chunks).status == HTTPStatus.EXPECTATION_FAILED


def test_leading_empty_lines_are_ignored() -> None:
    """Stray CRLFs between requests (allowed by RFC 9112) are skipped."""
    (request,) = feed_all([b"\r\n\r\n" + GET])
    assert request == GET_REQUEST


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_method(method: str) -> None:
    """The request's method comes out as the client wrote it."""
    (request,) = feed_all([method.encode() + b" /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n"])
    assert request.method == method
    assert request.path == "/x"


# Targets and query strings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/", "/", {}),
        ("/?user=42", "/", {"user": ["42"]}),
        ("/?token=a.b.c", "/", {"token": ["a.b.c"]}),
        ("/?user=1&user=2", "/", {"user": ["1", "2"]}),
        ("/?user=", "/", {"user": [""]}),
        ("/?user", "/", {"user": [""]}),
        ("/?a=1&b=&c", "/", {"a": ["1"], "b": [""], "c": [""]}),
        ("/?a=%41%20b+c", "/", {"a": ["A b c"]}),
        ("/?a=x%26y%3Dz", "/", {"a": ["x&y=z"]}),
        ("/?a=caf%C3%A9", "/", {"a": ["caf\u00e9"]}),
        ("/?", "/", {}),
        ("/api/publish", "/api/publish", {}),
        ("/api/publish?x=1", "/api/publish", {"x": ["1"]}),
        ("/p?x=1#fragment", "/p", {"x": ["1"]}),
        ("/a%20b", "/a%20b", {}),
        ("http://example.test/y?q=1", "/y", {"q": ["1"]}),
    ],
)
def test_target(target: str, path: str, query: dict[str, list[str]]) -> None:
    """The path and the decoded query parameters, every value of a repeated name kept."""
    (request,) = feed_all([b"GET " + target.encode() + b" HTTP/1.1\r\n\r\n"])
    assert request.path == path
    assert request.query == query


@pytest.mark.parametrize(
    ("target", "name", "value"),
    [
        ("/?user=42", "user", "42"),
        ("/?user=1&user=2", "user", "1"),
        ("/?user=", "user", ""),
        ("/", "user", None),
        ("/?token=x", "user", None),
    ],
)
def test_query_value(target: str, name: str, value: str | None) -> None:
    """`query_value` gives the first value of a parameter, or None when it is absent."""
    (request,) = feed_all([b"GET " + target.encode() + b" HTTP/1.1\r\n\r\n"])
    assert request.query_value(name) == value


# Headers and keep-alive -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        (b"Host: a", "host", "a"),
        (b"HOST: a", "host", "a"),
        (b"Last-Event-ID: ab-1-2", "last-event-id", "ab-1-2"),
        (b"Authorization: Bearer Abc.DEF", "authorization", "Bearer Abc.DEF"),
        (b"Cookie: sisyphus_token=X; other=Y", "cookie", "sisyphus_token=X; other=Y"),
        (b"X-Empty:", "x-empty", ""),
        (b"X-Spaces:   padded", "x-spaces", "padded"),
        (b"X-Latin: caf\xe9", "x-latin", "caf\u00e9"),
    ],
)
def test_header_names_are_lower_cased(line: bytes, name: str, value: str) -> None:
    """Header names come out lower-cased; values keep their case."""
    (request,) = feed_all([b"GET / HTTP/1.1\r\n" + line + b"\r\n\r\n"])
    assert request.headers == {name: value}


def test_repeated_header_keeps_the_last_value() -> None:
    """A header sent twice (in any case) is one entry holding the last value."""
    (request,) = feed_all([b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n\r\n"])
    assert request.headers == {"x-a": "2"}


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"1.1", None, True),
        (b"1.1", b"keep-alive", True),
        (b"1.1", b"close", False),
        (b"1.1", b"Close", False),
        (b"1.0", None, False),
        (b"1.0", b"keep-alive", True),
        (b"1.0", b"Keep-Alive", True),
        (b"1.0", b"close", False),
    ],
)
def test_keep_alive(version: bytes, connection: bytes | None, keep_alive: bool) -> None:
    """HTTP/1.1 keeps the connection unless `close`; HTTP/1.0 only with `keep-alive`."""
    head = b"GET / HTTP/" + version + b"\r\n"
    if connection is not None:
        head += b"Connection: " + connection + b"\r\n"
    (request,) = feed_all([head + b"\r\n"])
    assert request.keep_alive is keep_alive
    assert request.http_version == version.decode()


# Errors -------------------------------------------------------------------------------

GARBAGE = [
    b"\x00\x01\x02\x03\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
    b"HELLO\r\n\r\n",
    b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    b"GET / HTTP/1.1\r\n: no name\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/9.9.9\r\n\r\n",
    b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n",
    b"GET /a b HTTP/1.1\r\n\r\n",
    b"CONNECT example.test:443 HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_a_bad_request(data: bytes) -> None:
    """Bytes that aren't HTTP/1.x get a 400, whole or byte by byte."""
    assert peer_error([data]).status == HTTPStatus.BAD_REQUEST
    assert peer_error(byte_by_byte(data)).status == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize(
    "data", [b"GET /\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/0.9\r\n\r\n"]
)
def test_other_http_versions_are_refused(data: bytes) -> None:
    """HTTP/0.9 and 2.0 over this port get 505: the service speaks HTTP/1.x."""
    assert peer_error([data]).status == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED


UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


def test_upgrade_is_refused() -> None:
    """A protocol upgrade (WebSocket, h2c) gets 400 saying upgrades aren't supported."""
    for chunks in ([UPGRADE], byte_by_byte(UPGRADE)):
        error = peer_error(chunks)
        assert error.status == HTTPStatus.BAD_REQUEST
        assert "upgrade" in str(error)


def test_h2c_upgrade_is_refused() -> None:
    """An HTTP/2 cleartext upgrade is refused like any upgrade."""
    data = b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
    assert peer_error([data]).status == HTTPStatus.BAD_REQUEST


def test_peer_error_is_a_sisyphus_error() -> None:
    """Callers catching the package's base error also catch a peer's mistake."""
    error = peer_error([b"HELLO\r\n\r\n"])
    assert isinstance(error, SisyphusError)
    assert str(error).startswith("malformed HTTP request")


LONG_LINE = b"GET /?user=" + b"1" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    "chunks",
    [[LONG_LINE], byte_by_byte(LONG_LINE), [LONG_LINE[:50], LONG_LINE[50:]], [LONG_LINE[:150]]],
    ids=["whole", "byte-by-byte", "split", "unfinished"],
)
def test_request_line_over_the_limit_is_414(chunks: list[bytes]) -> None:
    """A request line longer than the head limit gets 414 URI Too Long."""
    error = peer_error(chunks, max_head=100)
    assert error.status == HTTPStatus.REQUEST_URI_TOO_LONG
    assert str(error) == "request line larger than 100 bytes"


BIG_HEADER = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 300 + b"\r\n\r\n"
MANY_HEADERS = b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(30)) + b"\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        [BIG_HEADER],
        byte_by_byte(BIG_HEADER),
        [BIG_HEADER[:40], BIG_HEADER[40:]],
        [BIG_HEADER[:150]],
        [MANY_HEADERS],
        byte_by_byte(MANY_HEADERS),
    ],
    ids=["whole", "byte-by-byte", "split", "unfinished", "many", "many-byte-by-byte"],
)
def test_headers_over_the_limit_are_431(chunks: list[bytes]) -> None:
    """A short request line with too many header bytes gets 431 Header Fields Too Large."""
    error = peer_error(chunks, max_head=100)
    assert error.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    assert str(error) == "request head larger than 100 bytes"


def test_head_within_the_limit_passes() -> None:
    """A request head well under the limit is accepted, whole or byte by byte."""
    head = b"GET /?user=42 HTTP/1.1\r\nHost: a\r\n\r\n"
    assert len(feed_all([head], max_head=100)) == 1
    assert len(feed_all(byte_by_byte(head), max_head=100)) == 1


def test_endless_header_line_is_cut() -> None:
    """A header line that never ends can't grow the parser's buffer past the limit."""
    reader = RequestReader(100, MAX_BODY)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")

    def trickle() -> None:
        for _ in range(200):
            reader.feed(b"x")

    with pytest.raises(PeerError) as caught:
        trickle()
    assert caught.value.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def _post(body: bytes) -> bytes:
    return b"POST /api/publish HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def _chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return (
        b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
        + b"0\r\n\r\n"
    )


@pytest.mark.parametrize(
    "data",
    [_post(b"x" * 51), _post(b"x" * 500), _chunked(b"x" * 60, 20), _chunked(b"x" * 51, 51)],
    ids=["length-51", "length-500", "chunked-60", "chunked-51"],
)
def test_body_over_the_limit_is_413(data: bytes) -> None:
    """A body larger than the limit gets 413, whole or byte by byte."""
    for chunks in ([data], byte_by_byte(data)):
        error = peer_error(chunks, max_body=50)
        assert error.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        assert str(error) == "request body larger than 50 bytes"


def test_body_over_the_limit_is_refused_before_it_all_arrives() -> None:
    """The 413 comes as soon as the limit is passed, not after the whole body is read."""
    reader = RequestReader(MAX_HEAD, 50)
    reader.feed(b"POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 50)
    with pytest.raises(PeerError) as caught:
        reader.feed(b"x")
    assert caught.value.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE


@pytest.mark.parametrize(
    "data", [_post(b"x" * 50), _chunked(b"x" * 50, 7)], ids=["length", "chunked"]
)
def test_body_at_the_limit_passes(data: bytes) -> None:
    """A body of exactly the limit is accepted."""
    (request,) = feed_all(byte_by_byte(data), max_body=50)
    assert request.body == b"x" * 50


# Response heads -------------------------------------------------------------------------


def test_sse_head() -> None:
    """The stream's head is 200 with the event-stream type, no caching and no proxy buffering."""
    assert http.sse_head() == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Connection: keep-alive\r\n"
        b"X-Accel-Buffering: no\r\n"
        b"\r\n"
    )
    assert http.sse_head() is http.SSE_HEAD


def test_sse_head_with_extra_headers() -> None:
    """CORS headers go after the fixed ones, before the blank line."""
    extra = (
        ("Access-Control-Allow-Origin", "https://app.test"),
        ("Access-Control-Allow-Credentials", "true"),
    )
    assert http.sse_head(extra) == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n"
        b"Connection: keep-alive\r\n"
        b"X-Accel-Buffering: no\r\n"
        b"Access-Control-Allow-Origin: https://app.test\r\n"
        b"Access-Control-Allow-Credentials: true\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (
            (HTTPStatus.OK,),
            {},
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        ),
        (
            (HTTPStatus.NOT_FOUND, b'{"error": "not found"}'),
            {},
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
            b'Content-Length: 22\r\nConnection: close\r\n\r\n{"error": "not found"}',
        ),
        (
            (HTTPStatus.OK, b"ok", "text/plain"),
            {"keep_alive": True},
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
        ),
        (
            (HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,),
            {},
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        ),
        (
            (HTTPStatus.NO_CONTENT,),
            {"headers": (("Access-Control-Allow-Origin", "*"), ("Vary", "Origin"))},
            b"HTTP/1.1 204 No Content\r\nContent-Type: application/json\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n"
            b"Access-Control-Allow-Origin: *\r\nVary: Origin\r\n\r\n",
        ),
        (
            (HTTPStatus.OK, "caf\u00e9".encode()),
            {},
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\ncaf\xc3\xa9",
        ),
    ],
)
def test_response(args: tuple[object, ...], kwargs: dict[str, object], expected: bytes) -> None:
    """A plain answer has status, type, a byte-exact Content-Length and a Connection header."""
    assert http.response(*args, **kwargs) == expected  # type: ignore[arg-type]


def test_head_only_keeps_the_head_and_its_content_length() -> None:
    """The answer to HEAD is the GET answer's head, Content-Length included, without a body."""
    answer = http.response(HTTPStatus.OK, b'{"status": "alive"}', keep_alive=True)
    head = http.head_only(answer)
    assert answer == head + b'{"status": "alive"}'
    assert b"Content-Length: 19\r\n" in head
    assert head.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("message", "body"),
    [
        ("not found", b'{"error": "not found"}'),
        ('say "hi"\n', b'{"error": "say \\"hi\\"\\n"}'),
        ("caf\u00e9", b'{"error": "caf\\u00e9"}'),
    ],
)
def test_error_body(message: str, body: bytes) -> None:
    """Every error answer is a JSON object with one `error` string."""
    assert http.error_body(message) == body


def test_body_larger_than_the_head_limit_is_accepted() -> None:
    """A 10 KB API body under the body limit passes, whole or with the body in its own read."""
    head = b"POST /api/publish HTTP/1.1\r\nHost: a\r\nContent-Length: 10000\r\n\r\n"
    body = b"x" * 10000
    for chunks in ([head + body], [head, body], [head + body[:10], body[10:]]):
        (request,) = feed_all(chunks, max_head=8192, max_body=20000)
        assert request.body == body


def test_pipelined_small_requests_in_one_read_stay_under_the_head_limit() -> None:
    """Five short GETs arriving in one read aren't mistaken for one oversized head."""
    one = b"GET /?user=1 HTTP/1.1\r\nHost: a\r\n\r\n"
    assert len(feed_all([one * 5], max_head=100)) == 5


def test_long_first_header_after_a_short_request_line_is_431_however_it_arrives() -> None:
    """A short request line followed by a huge header is 431 whole, split or byte by byte."""
    data = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 200 + b"\r\n\r\n"
    for chunks in (
        [data],
        byte_by_byte(data),
        [data[i : i + 150] for i in range(0, len(data), 150)],
    ):
        assert peer_error(chunks, max_head=100).status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def test_header_values_lose_surrounding_whitespace() -> None:
    """RFC 9112: `Authorization: Bearer abc ` reads as `Bearer abc`."""
    (request,) = feed_all([b"GET / HTTP/1.1\r\nAuthorization:   Bearer abc \t\r\n\r\n"])
    assert request.headers["authorization"] == "Bearer abc"


@given(st.text(alphabet="ab=&;%+2F0 é", max_size=24))
def test_query_parsing_matches_the_standard_library(text: str) -> None:
    """The fast path for plain queries gives exactly what parse_qs gives."""
    assert http.parse_query(text) == parse_qs(text, keep_blank_values=True)


def test_query_values_are_unquoted() -> None:
    assert http.parse_query("user=a%2Fb&x=1+2&user=c") == {"user": ["a/b", "c"], "x": ["1 2"]}


def test_requests_before_a_break_are_returned_and_the_break_kept() -> None:
    """A read with complete requests, then garbage: the requests first, the error after."""
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    requests = reader.feed(GET + GET + b"\x16\x03\x01 garbage\r\n\r\n")
    assert [r.path for r in requests] == ["/", "/"]
    assert reader.failure is not None and reader.failure.status == HTTPStatus.BAD_REQUEST
    with pytest.raises(PeerError):
        reader.feed(GET)


def test_a_break_with_no_complete_request_is_raised_at_once() -> None:
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    with pytest.raises(PeerError) as caught:
        reader.feed(b"\x16\x03\x01 garbage\r\n\r\n")
    assert caught.value.status == HTTPStatus.BAD_REQUEST


def test_an_upgrade_request_is_not_served_but_the_ones_before_it_are() -> None:
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    assert [r.path for r in reader.feed(GET + upgrade)] == ["/"]
    assert reader.failure is not None and "upgrade" in str(reader.failure)
    with pytest.raises(PeerError):
        RequestReader(MAX_HEAD, MAX_BODY).feed(upgrade)


def test_a_closed_reader_refuses_more_bytes() -> None:
    """close() lets go of the parser (it refers back to the reader); a late feed is a clear
    error, not a parse on a dead connection."""
    reader = RequestReader(MAX_HEAD, MAX_BODY)
    assert reader.feed(GET) == [GET_REQUEST]
    reader.close()
    with pytest.raises(RuntimeError, match="closed"):
        reader.feed(GET)


@pytest.mark.parametrize("data", [GET, b"NOT HTTP AT ALL\r\n\r\n", GET + b"\x00garbage\r\n\r\n"])
def test_a_closed_reader_is_freed_without_the_cyclic_collector(data: bytes) -> None:
    """After a request, a malformed one, or garbage behind a good one, a closed reader is
    freed as soon as nothing refers to it: its parser and its failure's traceback hold
    no cycle through it."""
    gc.collect()
    gc.disable()
    try:
        reader = RequestReader(MAX_HEAD, MAX_BODY)
        with contextlib.suppress(PeerError):
            reader.feed(data)
        reader.close()
        freed = weakref.ref(reader)
        del reader
        assert freed() is None
    finally:
        gc.enable()
