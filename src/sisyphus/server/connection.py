"""One client socket: bytes in -> requests -> a route; responses and events out.

An ``asyncio.Protocol`` on httptools, no framework. Once a request becomes an
event stream the parser is dropped (an idle stream keeps only a few small
objects) and further input is ignored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from sisyphus.errors import PeerError
from sisyphus.hub.subscriber import Subscriber
from sisyphus.protocol import http
from sisyphus.server import api, ops

if TYPE_CHECKING:
    from sisyphus.server.app import Service

log = logging.getLogger("sisyphus.http")

STREAM_PATH = "/"


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_got_bytes",
        "_peer",
        "_queue",
        "_reader",
        "_service",
        "_task",
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
        self.subscriber: Subscriber | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
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
        """The request head didn't arrive in time: answer 408 if it began, then close."""
        self._service.handshakes.pop(self, None)
        self._reader = None
        self._queue.clear()
        if self.transport is not None and not self.transport.is_closing():
            if self._got_bytes:
                self.transport.write(
                    http.response(
                        HTTPStatus.REQUEST_TIMEOUT,
                        http.error_body("request head too slow"),
                        headers=self._service.cors.vary,
                    )
                )
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None or reader.failure is not None:
            # A stream is open, the connection is ending, or its last read broke HTTP
            # (answered once the requests before the break are): input is ignored.
            return
        self._got_bytes = True
        try:
            requests = reader.feed(data)
        except PeerError as exc:
            self._reject(exc.status, str(exc))
            return
        if not requests:
            return
        self._service.handshakes.pop(self, None)
        self._queue.extend(requests)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())

    def _reject(self, status: HTTPStatus, message: str) -> None:
        self._service.metrics.bad_requests += 1
        self._service.handshakes.pop(self, None)
        self._reader = None
        self._queue.clear()
        log.info("bad request from %s: %s", self._peer, message)
        if self.transport is not None and not self.transport.is_closing():
            vary = self._service.cors.vary
            self.transport.write(http.response(status, http.error_body(message), headers=vary))
            self.transport.close()

    async def _serve(self) -> None:
        """Answer queued requests in order (HTTP/1.1 pipelining keeps responses ordered).

        Answers to pipelined requests go out in one write once the queue is empty:
        a publisher that pipelines pays one system call per batch, not per message.
        """
        transport = self.transport
        if transport is None:
            return
        vary = self._service.cors.vary
        answers: list[bytes] = []
        try:
            while self._queue and not transport.is_closing():
                request = self._queue.popleft()
                if request.method == "OPTIONS" and (
                    request.path == STREAM_PATH or request.path in api.ROUTES
                ):
                    answers.append(self._service.cors.preflight(request))
                elif request.path == STREAM_PATH:
                    if request.method != "GET":
                        answers.append(
                            http.response(
                                HTTPStatus.METHOD_NOT_ALLOWED,
                                b'{"error": "use GET"}',
                                headers=(("Allow", "GET"), *vary),
                            )
                        )
                        _close(transport, answers)
                        return
                    _write(transport, answers)
                    self._reader = None  # the connection is a stream from now on
                    self._queue.clear()
                    await self._service.streams.open(self, transport, request)
                    return
                elif request.path in ops.ROUTES:
                    answers.append(self._service.ops.handle(request))
                elif request.path in api.ROUTES:
                    answers.append(await self._service.api.handle(request, self._peer))
                else:
                    self._service.metrics.bad_requests += 1
                    answers.append(
                        http.response(
                            HTTPStatus.NOT_FOUND,
                            b'{"error": "not found"}',
                            keep_alive=request.keep_alive,
                            headers=vary,
                        )
                    )
                if not request.keep_alive:
                    _close(transport, answers)
                    return
            reader = self._reader
            if reader is not None and reader.failure is not None:
                # Garbage after valid requests in one read: they were answered above,
                # the garbage gets its error and the connection ends.
                self._service.metrics.bad_requests += 1
                log.info("bad request from %s: %s", self._peer, reader.failure)
                failure = reader.failure
                answers.append(
                    http.response(failure.status, http.error_body(str(failure)), headers=vary)
                )
                _close(transport, answers)
                return
            _write(transport, answers)
            if reader is not None and not transport.is_closing():
                self._await_request()  # keep-alive: the next request has the same time bound
        except Exception:
            # The process never dies of a request: log it, answer 500 if nothing was sent.
            log.exception("request from %s failed", self._peer)
            if self.subscriber is None and not transport.is_closing():
                answers.append(http.response(HTTPStatus.INTERNAL_SERVER_ERROR, b"{}", headers=vary))
            _close(transport, answers)
        finally:
            self._task = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._service.handshakes.pop(self, None)
        self._reader = None
        self._queue.clear()
        if self.subscriber is not None:
            self._service.streams.detach(self.subscriber)
            self.subscriber = None
        if self._task is not None:
            self._task.cancel()
            self._task = None


def _write(transport: asyncio.Transport, answers: list[bytes]) -> None:
    if answers and not transport.is_closing():
        transport.write(answers[0] if len(answers) == 1 else b"".join(answers))
    answers.clear()


def _close(transport: asyncio.Transport, answers: list[bytes]) -> None:
    _write(transport, answers)
    transport.close()
