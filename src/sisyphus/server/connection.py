"""One client socket: bytes in -> requests -> a route; responses and events out.

An ``asyncio.Protocol`` on httptools, no framework. Once a request becomes an
event stream the parser is dropped (an idle stream keeps only a few small
objects) and further input is ignored.

Flow control, both ways (uvicorn's ``FlowControl``): input is parsed at most
:data:`FEED_BYTES` at a time, and only while fewer than :data:`PAUSE_READING_AT`
requests wait for answers; the rest of a read waits unparsed, with reading paused.
Reading and serving also pause while the socket's write buffer is past its
high-water mark (``pause_writing``), and resume when it drains (``resume_writing``).
So a connection holds at most one read of input, a few hundred parsed requests and
about two high-water marks of answers; a peer that leaves its answers unread gets
the header timeout's clock and is then aborted. Streams don't use any of this: the
hub bounds their unsent bytes (``--max-unsent-bytes``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from sisyphus.errors import PeerError
from sisyphus.hub.subscriber import Subscriber
from sisyphus.protocol import http
from sisyphus.server import api, ops, static

if TYPE_CHECKING:
    from sisyphus.server.app import Service

log = logging.getLogger("sisyphus.http")

STREAM_PATH = "/"

# Requests waiting for their answers at which parsing stops and reading pauses.
PAUSE_READING_AT = 32
# Input is parsed this much at a time: what bounds the requests one parse adds.
FEED_BYTES = 16 * 1024
# The socket's write buffer: past HIGH, serving and reading pause until it is under LOW.
# Answers also leave in one write at the latest when they add up to HIGH.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_got_bytes",
        "_peer",
        "_queue",
        "_reader",
        "_reading_paused",
        "_service",
        "_task",
        "_unread",
        "_unread_at",
        "_writing_paused",
        "subscriber",
        "transport",
    )

    def __init__(self, service: Service) -> None:
        self._service = service
        self.transport: asyncio.Transport | None = None
        self._reader: http.RequestReader | None = None
        self._queue: collections.deque[http.Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._peer: str | None = None
        self._got_bytes = False
        self._reading_paused = False
        self._writing_paused = False
        # Input read but not parsed yet, from this offset on (reading is paused meanwhile).
        self._unread = b""
        self._unread_at = 0
        self.subscriber: Subscriber | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._service.open_connections += 1
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        settings = self._service.settings
        self._reader = http.RequestReader(settings.max_head_bytes, settings.max_message_bytes)
        peer = self.transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        self._await_request()

    def _await_request(self) -> None:
        """Start the clock on the next request head (the periodic sweep enforces it)."""
        self._got_bytes = False
        self._service.handshakes[self] = self._service.loop.time()

    def time_out(self) -> None:
        """The request head didn't arrive in time: answer 408 if it began, then close.

        A peer that left answers unread is aborted instead: a close would wait for it
        to read them, maybe forever.
        """
        self._service.handshakes.pop(self, None)
        self._drop_reader()
        self._queue.clear()
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        elif not transport.is_closing():
            if self._got_bytes:
                transport.write(
                    http.response(
                        HTTPStatus.REQUEST_TIMEOUT,
                        http.error_body("request head too slow"),
                        headers=self._service.cors.vary,
                    )
                )
            transport.close()

    def _close(self, transport: asyncio.Transport, answers: list[bytes]) -> None:
        """Send ``answers`` and close; a peer that doesn't read them has the header timeout."""
        _write(transport, answers)
        transport.close()
        if transport.get_write_buffer_size():
            self._service.handshakes[self] = self._service.loop.time()

    # Flow control ---------------------------------------------------------
    def pause_writing(self) -> None:
        """The peer reads answers slower than they come: stop serving and reading."""
        if self._reader is None:
            return  # a stream (the hub bounds its unsent bytes) or an ending connection
        self._writing_paused = True
        self._pause_reading()
        # The peer has the header timeout to read its answers, or it is aborted.
        self._service.handshakes[self] = self._service.loop.time()

    def resume_writing(self) -> None:
        if not self._writing_paused:
            return
        self._writing_paused = False
        if self._reader is None:
            return
        if self._queue:
            self._service.handshakes.pop(self, None)
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._serve())
        elif not self._unread:
            self._resume_reading()

    def _pause_reading(self) -> None:
        transport = self.transport
        if not self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = True
            transport.pause_reading()

    def _resume_reading(self) -> None:
        transport = self.transport
        if (
            self._reading_paused
            and not self._writing_paused
            and not self._unread
            and transport is not None
        ):
            self._reading_paused = False
            if not transport.is_closing():
                transport.resume_reading()

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()  # frees it now: its parser refers back to it

    def _send_continue(self, reader: http.RequestReader) -> None:
        """Ask for the body of a request that expects ``100 Continue``, once it is next."""
        if reader.awaiting_continue and self.transport is not None:
            reader.awaiting_continue = False
            self.transport.write(http.CONTINUE)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None or reader.failure is not None:
            # A stream is open, the connection is ending, or its last read broke HTTP
            # (answered once the requests before the break are): input is ignored.
            return
        self._got_bytes = True
        if len(data) <= FEED_BYTES and not self._unread and len(self._queue) < PAUSE_READING_AT:
            self._parse(reader, data)  # the usual read: one request, or a short pipeline
        else:
            self._unread = self._unread[self._unread_at :] + data if self._unread else data
            self._unread_at = 0
            self._parse_unread()

    def _parse_unread(self) -> None:
        """Parse held-back input a slice at a time while few requests wait for answers."""
        unread = self._unread
        at = self._unread_at
        while at < len(unread) and len(self._queue) < PAUSE_READING_AT:
            reader = self._reader
            if reader is None or reader.failure is not None:
                at = len(unread)  # rejected, or broke HTTP: the rest is ignored
                break
            self._parse(reader, unread[at : at + FEED_BYTES])
            at += FEED_BYTES
        if at < len(unread):
            self._unread_at = at
            self._pause_reading()
        else:
            self._unread = b""
            self._unread_at = 0
            self._resume_reading()

    def _parse(self, reader: http.RequestReader, data: bytes) -> None:
        try:
            requests = reader.feed(data)
        except PeerError as exc:
            self._reject(exc.status, str(exc))
            return
        if not requests:
            if reader.awaiting_continue and self._task is None and not self._queue:
                self._send_continue(reader)
            return
        self._service.handshakes.pop(self, None)
        self._queue.extend(requests)
        if self._task is None:
            if len(requests) == 1 and len(self._queue) == 1 and self._stream_now(requests[0]):
                return
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def _stream_now(self, request: http.Request) -> bool:
        """A lone ``GET /``: the stream's handshake runs in this step as far as it can (a
        reconnect served from what the process holds needs no task at all). False if
        the request is anything else, for ``_serve``."""
        transport = self.transport
        if (
            request.path != STREAM_PATH
            or request.method != "GET"
            or transport is None
            or transport.is_closing()
            or self._writing_paused
        ):
            return False
        self._become_stream()
        try:
            rest = self._service.streams.open_now(self, transport, request)
        except Exception:
            self._failed(transport, [])
            return True
        if rest is not None:
            self._task = asyncio.get_running_loop().create_task(self._finish_stream(rest))
        return True

    def _become_stream(self) -> None:
        self._drop_reader()  # the connection is a stream from now on
        self._queue.clear()
        self._unread = b""
        self._resume_reading()  # a stream notices its peer's close by reading

    async def _finish_stream(self, rest: Coroutine[Any, Any, None]) -> None:
        transport = self.transport
        try:
            await rest
        except Exception:
            if transport is not None:
                self._failed(transport, [])
        finally:
            self._task = None

    def _reject(self, status: HTTPStatus, message: str) -> None:
        self._service.metrics.bad_requests += 1
        self._service.handshakes.pop(self, None)
        self._drop_reader()
        self._queue.clear()
        log.info(
            "bad request from %s: %s",
            self._peer,
            message,
            extra={"event": "bad request", "peer": self._peer, "reason": message},
        )
        if self.transport is not None and not self.transport.is_closing():
            vary = self._service.cors.vary
            self._close(
                self.transport, [http.response(status, http.error_body(message), headers=vary)]
            )

    async def _serve(self) -> None:
        """Answer queued requests in order (HTTP/1.1 pipelining keeps responses ordered).

        Answers to pipelined requests go out in one write once the queue is empty
        (or they add up to the write buffer's high-water mark): a publisher that
        pipelines pays one system call per batch, not per message. While the peer
        leaves answers unread (``pause_writing``), the rest waits for ``resume_writing``.
        """
        transport = self.transport
        if transport is None:
            return
        service = self._service
        vary = service.cors.vary
        answers: list[bytes] = []
        unsent = 0
        try:
            while self._queue and not transport.is_closing():
                if self._writing_paused:
                    _write(transport, answers)
                    return  # resume_writing() serves the rest
                request = self._queue.popleft()
                if self._unread and len(self._queue) < PAUSE_READING_AT:
                    self._parse_unread()  # the pipeline's next requests
                if request.method == "OPTIONS" and (
                    request.path == STREAM_PATH or request.path in api.ROUTES
                ):
                    answer = service.cors.preflight(request, api=request.path != STREAM_PATH)
                elif request.path == STREAM_PATH:
                    if request.method != "GET":
                        answer = http.response(
                            HTTPStatus.METHOD_NOT_ALLOWED,
                            b'{"error": "use GET"}',
                            headers=(("Allow", "GET"), *vary),
                        )
                        answers.append(_bodiless(request, answer))
                        self._close(transport, answers)
                        return
                    _write(transport, answers)
                    self._become_stream()
                    await service.streams.open(self, transport, request)
                    return
                elif request.path in ops.ROUTES:
                    answer = service.ops.handle(request)
                elif request.path in api.ROUTES:
                    answer = await service.api.handle(request, self._peer)
                elif request.path in static.ROUTES:
                    dev = service.settings.development_mode
                    answer = static.answer(request, service.cors, dev)
                else:
                    service.metrics.bad_requests += 1
                    answer = http.response(
                        HTTPStatus.NOT_FOUND,
                        b'{"error": "not found"}',
                        keep_alive=request.keep_alive,
                        headers=vary,
                    )
                answers.append(_bodiless(request, answer))
                if not request.keep_alive:
                    self._close(transport, answers)
                    return
                unsent += len(answer)
                if unsent >= WRITE_HIGH_WATER:
                    _write(transport, answers)  # may pause writing: checked above
                    unsent = 0
                    await asyncio.sleep(0)  # a long pipeline lets other connections in
            reader = self._reader
            if reader is not None and reader.failure is not None:
                # Garbage after valid requests in one read: they were answered above,
                # the garbage gets its error and the connection ends.
                service.metrics.bad_requests += 1
                log.info(
                    "bad request from %s: %s",
                    self._peer,
                    reader.failure,
                    extra={"event": "bad request", "peer": self._peer, "reason": reader.failure},
                )
                failure = reader.failure
                answers.append(
                    http.response(failure.status, http.error_body(str(failure)), headers=vary)
                )
                self._close(transport, answers)
                return
            _write(transport, answers)
            if reader is not None and not transport.is_closing():
                self._resume_reading()
                self._send_continue(reader)
                self._await_request()  # keep-alive: the next request has the same time bound
        except Exception:
            self._failed(transport, answers)
        finally:
            self._task = None

    def _failed(self, transport: asyncio.Transport, answers: list[bytes]) -> None:
        """The process never dies of a request: log it, answer 500 if nothing was sent."""
        log.exception(
            "request from %s failed",
            self._peer,
            extra={"event": "request failed", "peer": self._peer},
        )
        if self.subscriber is None and not transport.is_closing():
            vary = self._service.cors.vary
            answers.append(http.response(HTTPStatus.INTERNAL_SERVER_ERROR, b"{}", headers=vary))
        self._close(transport, answers)

    def connection_lost(self, exc: Exception | None) -> None:
        self._service.open_connections -= 1
        if not self._service.open_connections:
            self._service.no_connections.set()
        self._service.handshakes.pop(self, None)
        self._drop_reader()
        self._queue.clear()
        if self.subscriber is not None:
            self._service.streams.detach(self.subscriber)
            self.subscriber = None
        if self._task is not None:
            self._task.cancel()
            self._task = None


def _bodiless(request: http.Request, answer: bytes) -> bytes:
    """The answer as sent: without its body when the request was ``HEAD``."""
    return http.head_only(answer) if request.method == "HEAD" else answer


def _write(transport: asyncio.Transport, answers: list[bytes]) -> None:
    if answers and not transport.is_closing():
        transport.write(answers[0] if len(answers) == 1 else b"".join(answers))
    answers.clear()
