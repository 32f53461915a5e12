"""HTTP/1.1 request parsing (httptools) and response heads, without I/O.

Owns: turning bytes from a socket into :class:`Request` values, the limits on
what a peer may send, and the bytes of every response head. Must not know about
sockets, routes or brokers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs

import httptools

from sisyphus.errors import PeerError

Headers = tuple[tuple[str, str], ...]


# "OPTIONS " + " HTTP/1.1\r\n" and a little slack: what a request line holds beside its URL.
_REQUEST_LINE_OVERHEAD = 32

# The interim answer to ``Expect: 100-continue``: "send the body".
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class Request:
    """One parsed request; header names are lower-cased."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    http_version: str

    def query_value(self, name: str) -> str | None:
        """The first value of a query parameter, or ``None`` if absent."""
        values = self.query.get(name)
        return values[0] if values else None


def parse_query(text: str) -> dict[str, list[str]]:
    """``parse_qs(text, keep_blank_values=True)``, with a fast path for the usual query.

    Every stream request carries one (``?user=42``); without ``%`` or ``+`` nothing
    needs unquoting and a split gives the same result as parse_qs at a fifth of the cost.
    """
    if "%" in text or "+" in text:
        return parse_qs(text, keep_blank_values=True)
    query: dict[str, list[str]] = {}
    for field in text.split("&"):
        if field:
            name, _, value = field.partition("=")
            query.setdefault(name, []).append(value)
    return query


class RequestReader:
    """Feeds bytes to httptools and yields complete requests, enforcing size limits.

    Raises :class:`PeerError` (with the HTTP status to answer) when the peer
    breaks HTTP or a limit; after that the reader is unusable and the
    connection should be answered and closed.
    """

    def __init__(self, max_head_bytes: int, max_body_bytes: int) -> None:
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        # The parser holds this reader's callbacks, a reference cycle (as does a failure's
        # traceback): close() breaks them, so that a connection's reader is freed when the
        # connection lets go of it, not by a later pass of the cyclic collector.
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        # The request being parsed: its fields live here, not in an object per request
        # (a publisher sends tens of thousands a second).
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._done: list[Request] = []
        # Bytes fed while a request head is incomplete: httptools buffers a header
        # internally until its line ends, so this is what bounds that buffer. A chunk
        # in which a request began is not counted (where it began is unknown), so the
        # buffer stays under the limit plus one read.
        self._unfinished_head = 0
        self._in_head = False
        self._in_message = False
        self._began = False
        self._completed = 0
        # The request's Transfer-Encoding and Expect values (None when absent).
        self._codings: bytes | None = None
        self._expect: bytes | None = None
        # Set when the peer broke HTTP after some complete requests; see feed().
        self.failure: PeerError | None = None
        # True while a request that sent ``Expect: 100-continue`` waits for its body and
        # no ``100 Continue`` was sent yet: the connection sends :data:`CONTINUE` once the
        # answers before it are out, and clears this.
        self.awaiting_continue = False

    def feed(self, data: bytes) -> list[Request]:
        """Parse ``data``; return the requests it completed (pipelining yields several).

        If ``data`` breaks HTTP after completing requests, those are returned and the
        error is kept in :attr:`failure` (and raised by any later call): the peer gets
        its answers, then the error. Without completed requests the error is raised.
        """
        if self.failure is not None:
            raise self.failure
        parser = self._current_parser()
        was_in_head = self._in_head
        idle_before = not self._in_message
        self._began = False
        self._completed = 0
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._completed:
                self._done.pop()  # the request asking for the upgrade: it isn't served
            self._fail(PeerError(HTTPStatus.BAD_REQUEST, "protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, PeerError):
                self._fail(exc.__context__)
            else:
                self._fail(PeerError(HTTPStatus.BAD_REQUEST, f"malformed HTTP request: {exc}"))
        if self.failure is not None:
            done, self._done = self._done, []
            return done
        # All of ``data`` belongs to the unfinished head if it was already under way, or
        # if it began with this chunk and no earlier request shared the chunk.
        whole_chunk = (was_in_head and not self._began) or (idle_before and not self._completed)
        if self._in_head and whole_chunk:
            self._unfinished_head += len(data)
            if self._unfinished_head > self._max_head:
                # Mostly URL bytes (beside the method and version) means the request line.
                url = self._unfinished_head - len(self._url) <= _REQUEST_LINE_OVERHEAD
                self._too_large(url)
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Let go of the parser and of the failure (its traceback holds feed()'s frame,
        which holds the reader); the reader can't be fed again."""
        self._parser = None
        self.failure = None

    def _current_parser(self) -> httptools.HttpRequestParser:
        parser = self._parser
        if parser is None:
            raise RuntimeError("the request reader is closed")
        return parser

    def _fail(self, error: PeerError) -> None:
        self.failure = error
        if not self._done:
            try:
                raise error from None
            finally:
                del error  # the traceback keeps this frame: no cycle through its local

    # httptools callbacks -------------------------------------------------
    def _too_large(self, url: bool) -> None:
        status = (
            HTTPStatus.REQUEST_URI_TOO_LONG if url else HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
        )
        what = "request line" if url else "request head"
        raise PeerError(status, f"{what} larger than {self._max_head} bytes")

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._began = True
        self._unfinished_head = 0
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._body = []
        self._body_size = 0
        self._codings = None
        self._expect = None

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self._max_head:
            self._too_large(url=True)
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._max_head:
            self._too_large(url=False)
        self._headers.append((name, value))
        # The two headers that change how the request is read: matched by length first,
        # so other headers cost one comparison.
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            self._codings = value if self._codings is None else self._codings + b"," + value
        elif len(name) == 6 and name.lower() == b"expect":
            self._expect = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._unfinished_head = 0
        if self._codings is not None and self._codings.strip(b" \t").lower() != b"chunked":
            # llhttp reads "identity, chunked" as chunked; a proxy in front may read it
            # otherwise (request smuggling). Only the one coding we decode is accepted.
            raise PeerError(
                HTTPStatus.BAD_REQUEST, "Transfer-Encoding must be exactly chunked, or absent"
            )
        if self._expect is not None:
            if self._expect.strip(b" \t").lower() != b"100-continue":
                raise PeerError(
                    HTTPStatus.EXPECTATION_FAILED, "the only supported expectation is 100-continue"
                )
            # HTTP/1.0 clients don't know 100 Continue (RFC 9110 §10.1.1): they get none.
            self.awaiting_continue = self._current_parser().get_http_version() == "1.1"

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            raise PeerError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body larger than {self._max_body} bytes",
            )
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self.awaiting_continue = False  # the body is here: no 100 Continue needed any more
        self._completed += 1
        parser = self._current_parser()
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            # llhttp reads a request line without a version as HTTP/0.9; we speak 1.x only.
            raise PeerError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"HTTP/{version} not supported")
        try:
            url = httptools.parse_url(self._url)
            path = url.path.decode("ascii")
            query = parse_query(url.query.decode("ascii")) if url.query else {}
            # RFC 9112 §5: whitespace around a field value is not part of it.
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1").strip(" \t")
                for name, value in self._headers
            }
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError, ValueError):
            raise PeerError(HTTPStatus.BAD_REQUEST, "malformed request target") from None
        body, self._body, self._headers = self._body, [], []  # not kept until the next request
        self._done.append(
            Request(
                method=parser.get_method().decode("ascii"),
                path=path,
                query=query,
                headers=headers,
                body=b"".join(body),
                keep_alive=parser.should_keep_alive(),
                http_version=version,
            )
        )


# Response heads ------------------------------------------------------------

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: keep-alive\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"\r\n"
)


def error_body(message: str) -> bytes:
    """The JSON body of every error answer: ``{"error": "..."}``."""
    return json.dumps({"error": message}).encode()


def head_only(answer: bytes) -> bytes:
    """``answer`` without its body, as a ``HEAD`` request gets it (``Content-Length`` kept)."""
    return answer[: answer.index(b"\r\n\r\n") + 4]


def sse_head(extra: Headers = ()) -> bytes:
    """The stream's response head, plus ``extra`` headers (CORS) when there are any."""
    if not extra:
        return SSE_HEAD
    lines = "".join(f"{name}: {value}\r\n" for name, value in extra)
    return SSE_HEAD[:-2] + lines.encode("latin-1") + b"\r\n"


_OK_JSON_KEEP = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
_OK_JSON_CLOSE = _OK_JSON_KEEP.replace(b"keep-alive", b"close")


def response(
    status: HTTPStatus,
    body: bytes = b"",
    content_type: str = "application/json",
    *,
    keep_alive: bool = False,
    headers: Headers = (),
) -> bytes:
    """A complete response with a ``Content-Length``; the body may be empty."""
    if status is HTTPStatus.OK and not headers and content_type == "application/json":
        # The answer to every successful API call: a constant head around the length.
        return (_OK_JSON_KEEP if keep_alive else _OK_JSON_CLOSE) % len(body) + body
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: " + ("keep-alive" if keep_alive else "close"),
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
