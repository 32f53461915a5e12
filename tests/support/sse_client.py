"""A real event-stream client over a raw socket, parsing as the WHATWG standard says.

It keeps every byte it received (``raw``) so tests can check the exact wire
format, and decodes events the way a browser's EventSource does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass

_LINE = re.compile(r"\r\n|\r|\n")

# Every client opened by the running test; conftest closes them afterwards.
OPEN_CLIENTS: list[SseClient] = []


@dataclass
class Event:
    id: str | None
    data: str
    event: str = "message"
    retry: int | None = None

    @property
    def is_noop(self) -> bool:
        return self.data == "noop"


def status(name: str) -> str:
    return f"<message><status>{name}</status></message>"


class SseClient:
    """One event stream; close it, or the suite closes it after the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self.head = b""
        self.raw = bytearray()
        self._text = ""
        self._events: list[Event] = []
        self._eof = False
        # Parser state (one event being built).
        self._data: list[str] = []
        self._id: str | None = None
        self._event = ""
        self._retry: int | None = None
        self.last_event_id: str | None = None

    @classmethod
    async def open(
        cls,
        port: int,
        query: str = "",
        path: str = "/",
        headers: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        timeout: float = 5.0,
    ) -> SseClient:
        reader, writer = await asyncio.open_connection(host, port)
        target = path + ("?" + query if query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        client = cls(reader, writer)
        OPEN_CLIENTS.append(client)
        client.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = client.head.decode("latin-1").split("\r\n")
        client.status_code = int(status_line.split(" ")[1])
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                client.headers[name.strip().lower()] = value.strip()
        return client

    def _feed(self, chunk: bytes) -> None:
        self.raw += chunk
        self._text += chunk.decode("utf-8")
        lines = _LINE.split(self._text)
        # A trailing lone CR may be half of CRLF: keep the last piece for later.
        self._text = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        if line == "":
            if self._data:
                self._events.append(
                    Event(self._id, "\n".join(self._data), self._event or "message", self._retry)
                )
            self._data, self._event, self._retry, self._id = [], "", None, self.last_event_id
            return
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)

    async def next_event(self, timeout: float = 5.0) -> Event | None:
        """The next event, or ``None`` once the server closed the stream."""
        while not self._events:
            if self._eof:
                return None
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                self._eof = True
            else:
                self._feed(chunk)
        return self._events.pop(0)

    async def next_message(self, timeout: float = 5.0) -> Event:
        """The next event that isn't a noop keep-alive; the stream must still be open."""
        while True:
            event = await self.next_event(timeout)
            if event is None:
                raise AssertionError(f"the stream closed; it received {bytes(self.raw)!r}")
            if not event.is_noop:
                return event

    async def messages_until(self, marker: str) -> list[str]:
        """The data of every message up to and including the one whose data is ``marker``."""
        got = []
        while True:
            data = (await self.next_message()).data
            got.append(data)
            if data == marker:
                return got

    async def expect(self, timeout: float = 5.0) -> Event:
        """The next event, keep-alives included; the stream must still be open."""
        event = await self.next_event(timeout)
        if event is None:
            raise AssertionError(f"the stream closed; it received {bytes(self.raw)!r}")
        return event

    async def until_closed(self, timeout: float = 5.0) -> list[Event]:
        """Every remaining event until the server closes the connection."""
        events = []
        while (event := await self.next_event(timeout)) is not None:
            events.append(event)
        await self.close()
        return events

    async def close(self) -> None:
        if self.writer.is_closing():
            return
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
