"""Raw asyncio protocols of the load generator: an SSE subscriber, pipelined HTTP and RESP.

No HTTP client library sits on the per-event path. A subscriber parses only what it
must: the response head once, then, per read, it splits at the last complete event
(``\\n\\n``), counts the current step's messages with one ``bytes.count`` and, when it
samples latency, pulls the send timestamps out with one regex ``findall``.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Callable

import httptools
import wire

STATUS = re.compile(rb"<status>(\w+)</status>")
MAX_HEAD = 16384


class StreamRefused(Exception):
    """The server answered, but not with a live stream (status line or closing status)."""


class Shard:
    """What the streams of one worker process share: the step, counters, the histogram."""

    def __init__(self) -> None:
        self.tag = b"\x00no step yet"
        self.regex = wire.step_regex(-1)
        self.counts: list[int] = []
        self.hist = [0] * wire.HIST_SIZE
        self.last_ns = 0
        self.failed: set[int] = set()  # never opened
        self.dropped: set[int] = set()  # live, then closed by the peer

    def set_step(self, step: int) -> None:
        self.tag = wire.step_tag(step)
        self.regex = wire.step_regex(step)
        self.counts = [0] * len(self.counts)
        self.hist = [0] * wire.HIST_SIZE
        self.last_ns = 0


class SseStream(asyncio.Protocol):
    __slots__ = (
        "closing",
        "head",
        "index",
        "marker",
        "ready",
        "sampled",
        "shard",
        "tail",
        "transport",
    )

    def __init__(
        self,
        shard: Shard,
        index: int,
        marker: bytes | None,
        ready: asyncio.Future[None],
        sampled: bool,
    ) -> None:
        self.shard = shard
        self.index = index
        self.marker = marker
        self.ready: asyncio.Future[None] | None = ready
        self.sampled = sampled
        self.head = b""
        self.tail = b""
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _refuse(self, reason: str) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(StreamRefused(reason))
        self.ready = None
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self, data: bytes) -> None:
        buf = self.head + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._refuse("head too long")
            self.head = buf
            return
        status_line = buf[: buf.find(b"\r\n")]
        if status_line.split(b" ", 2)[1:2] != [b"200"]:
            self._refuse(status_line.decode(errors="replace"))
            return
        body = buf[end + 4 :]
        if self.marker is not None and self.marker not in body:
            found = STATUS.search(body)
            if found:
                self._refuse(f"status {found.group(1).decode()}")
            else:
                self.head = buf  # the status event is still on its way
            return
        self.head = b""
        ready = self.ready
        self.ready = None
        if ready is not None and not ready.done():
            ready.set_result(None)
        if body:
            self.data_received(body)

    def data_received(self, data: bytes) -> None:
        if self.ready is not None:
            self._handshake(data)
            return
        if self.tail:
            data = self.tail + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self.tail = data
            return
        end += 2
        self.tail = data[end:]
        shard = self.shard
        found = data.count(shard.tag, 0, end)
        if not found:
            return
        now = time.monotonic_ns()
        shard.counts[self.index] += found
        shard.last_ns = now
        if self.sampled:
            hist = shard.hist
            top = wire.HIST_SIZE - 1
            for sent in shard.regex.findall(data, 0, end):
                us = (now - int(sent)) // 1000
                if us < 32:
                    hist[us if us > 0 else 0] += 1
                else:
                    shift = us.bit_length() - 5
                    hist[min(top, (shift << 4) + (us >> shift))] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready is not None:
            if not self.ready.done():
                self.ready.set_exception(StreamRefused("closed before the stream was ready"))
            self.ready = None
        elif not self.closing:
            self.shard.dropped.add(self.index)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


Done = Callable[[bool], None]


class Pipe(asyncio.Protocol):
    """A pipelined request/response connection: answers come back in order."""

    def __init__(self) -> None:
        self.pending: collections.deque[Done] = collections.deque()
        self.outgoing: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def queue(self, request: bytes, done: Done) -> None:
        self.pending.append(done)
        self.outgoing.append(request)

    def flush(self) -> None:
        if self.outgoing and self.transport is not None:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def answer(self, ok: bool) -> None:
        if self.pending:
            self.pending.popleft()(ok)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.pending:
            self.pending.popleft()(False)
        if not self.lost.done():
            self.lost.set_result(None)


class HttpPipe(Pipe):
    def __init__(self) -> None:
        super().__init__()
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.abort()

    def on_message_complete(self) -> None:
        self.answer(200 <= self.parser.get_status_code() < 300)


class RespPipe(Pipe):
    """PUBLISH replies only: one line each, ``:<receivers>`` or ``-ERR ...``."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = b""
        self.zero_receivers = 0

    def data_received(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\r\n")
        self.buffer = lines.pop()
        for line in lines:
            if line == b":0":
                self.zero_receivers += 1
            self.answer(line[:1] in (b":", b"+"))


async def open_pipe(kind: type[Pipe], host: str, port: int) -> Pipe:
    _, pipe = await asyncio.get_running_loop().create_connection(kind, host, port)
    return pipe


async def request_all(
    host: str, port: int, requests: list[bytes], conns: int = 4, window: int = 100
) -> int:
    """Send every request over ``conns`` pipelined connections; return how many failed."""
    pipes = [await open_pipe(HttpPipe, host, port) for _ in range(conns)]
    failed = 0
    todo = collections.deque(requests)

    async def drive(pipe: Pipe) -> None:
        nonlocal failed
        loop = asyncio.get_running_loop()
        while todo:
            answers: list[asyncio.Future[bool]] = []
            for _ in range(min(window, len(todo))):
                answer: asyncio.Future[bool] = loop.create_future()
                answers.append(answer)
                pipe.queue(todo.popleft(), answer.set_result)
            pipe.flush()
            failed += sum(1 for ok in await asyncio.gather(*answers) if not ok)

    try:
        await asyncio.gather(*(drive(pipe) for pipe in pipes))
    finally:
        for pipe in pipes:
            if pipe.transport is not None:
                pipe.transport.close()
    return failed
