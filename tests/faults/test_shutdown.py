"""Graceful stop of a real `sisyphus serve` process on SIGTERM, and a forced one."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterable, Set
from pathlib import Path

import pytest

from sisyphus.brokers.base import Position
from sisyphus.brokers.memory import MemoryBroker
from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.support.sse_client import SseClient, status
from tests.test_cli import Served, run_cli, start_serve, stop_serve


async def test_sigterm_sends_reconnect_hints_and_exits_zero() -> None:
    """On SIGTERM every client gets a retry hint and a close; the process exits 0 in time."""
    served = await start_serve("--shutdown-drain", "0.5")
    try:
        await sigterm_with_clients(served)
    finally:
        await stop_serve(served)


async def sigterm_with_clients(served: Served) -> None:
    await run_cli("grant", "1", "room:1", "--url", served.url)
    clients = [await SseClient.open(served.port, "user=1") for _ in range(20)]
    for client in clients:
        assert (await client.expect()).data == status("ok")
    served.process.send_signal(signal.SIGTERM)
    for client in clients:
        events = await client.until_closed(timeout=10)
        assert [e.data for e in events if not e.is_noop] == []
        tail = bytes(client.raw).rsplit(b"\n\n", 2)[-2]
        assert tail.startswith(b": shutting down\nretry: ")
        assert 1000 <= int(tail.rsplit(b" ", 1)[1]) < 2000
    assert await asyncio.wait_for(served.process.wait(), 15) == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", served.port)


async def test_second_signal_stops_at_once() -> None:
    """With a long drain under way, a second SIGTERM ends the process right away."""
    served = await start_serve("--shutdown-drain", "60", "--shutdown-timeout", "120")
    try:
        await second_signal(served)
    finally:
        await stop_serve(served)


async def second_signal(served: Served) -> None:
    await run_cli("grant", "1", "room:1", "--url", served.url)
    clients = [await SseClient.open(served.port, "user=1") for _ in range(30)]
    for client in clients:
        assert (await client.expect()).data == status("ok")
    served.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert served.process.returncode is None  # still draining
    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(served.process.wait(), 10) == 0


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str, *headers: str
) -> tuple[bytes, bytes]:
    """One keep-alive GET on an open connection: (head, body) of a Content-Length answer."""
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    body = await asyncio.wait_for(reader.readexactly(int(length[0].split(b":")[1])), 10)
    return head, body


async def test_draining_process_refuses_streams_on_kept_alive_connections() -> None:
    """During a drain, a new stream on a kept-alive connection gets `error` (shutting_down),
    the client's own id and a 1-2 s retry, then a close; /readyz there answers 503."""
    served = await start_serve("--shutdown-drain", "4", "--shutdown-timeout", "20")
    try:
        await run_cli("grant", "1", "room:1", "--url", served.url)
        clients = [await SseClient.open(served.port, "user=1") for _ in range(30)]
        for client in clients:
            assert (await client.expect()).data == status("ok")
        own_id = clients[0].last_event_id
        assert own_id is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        head, _ = await _get(reader, writer, "/readyz")
        assert head.startswith(b"HTTP/1.1 200 ")
        served.process.send_signal(signal.SIGTERM)
        await _wait_refused(served.port)  # the listener is closed: the drain has begun
        head, body = await _get(reader, writer, "/readyz")
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert body == b'{"status": "stopping"}'
        target = "/?user=1&format=json"
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {own_id}\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 10)  # until the service closes it
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"Content-Type: text/event-stream" in answer
        event = answer.split(b"\r\n\r\n", 1)[1]
        fields = dict(line.split(b": ", 1) for line in event.strip().split(b"\n"))
        assert fields[b"id"] == own_id.encode()
        assert fields[b"event"] == b"status"
        assert fields[b"data"] == b'{"status":"error","reason":"shutting_down"}'
        assert 1000 <= int(fields[b"retry"]) < 2000
        writer.close()
        assert served.process.returncode is None  # the drain was still under way
        assert await asyncio.wait_for(served.process.wait(), 20) == 0
    finally:
        await stop_serve(served)


async def test_a_kept_alive_connection_without_streams_is_answered_through_the_drain() -> None:
    """With no stream but a kept-alive connection (a proxy's, an API client's), the process
    keeps answering it through the drain window (readiness 503), then exits 0."""
    served = await start_serve("--shutdown-drain", "3", "--shutdown-timeout", "20")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        head, _ = await _get(reader, writer, "/readyz")
        assert head.startswith(b"HTTP/1.1 200 ")
        served.process.send_signal(signal.SIGTERM)
        await _wait_refused(served.port)  # the listener is closed: the drain has begun
        await asyncio.sleep(0.5)
        head, body = await _get(reader, writer, "/readyz")
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert body == b'{"status": "stopping"}'
        assert served.process.returncode is None
        writer.close()
        assert await asyncio.wait_for(served.process.wait(), 20) == 0
    finally:
        await stop_serve(served)


@pytest.mark.parametrize("attempt", range(4))
async def test_a_sigterm_right_after_listening_drains_and_ends_at_once(attempt: int) -> None:
    """A SIGTERM as soon as the port listens is a graceful stop (exit 0, never killed by
    the signal), and with no connection open it doesn't wait the drain window out."""
    served = await start_serve("--shutdown-drain", "60", "--shutdown-timeout", "120")
    try:
        served.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.process.wait(), 20) == 0
    finally:
        await stop_serve(served)


async def _wait_refused(port: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        writer.close()
        assert asyncio.get_running_loop().time() < deadline, "the listener stayed open"
        await asyncio.sleep(0.02)


async def test_systemd_hears_ready_once_listening_and_stopping_at_sigterm(tmp_path: Path) -> None:
    """Under systemd (Type=notify), `systemctl start` returns once the port listens, and
    systemd learns when the drain begins."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.setblocking(False)
        served = await start_serve(env={"NOTIFY_SOCKET": address})
        try:
            loop = asyncio.get_running_loop()
            ready = await asyncio.wait_for(loop.sock_recv(sock, 256), 10)
            assert ready == b"READY=1"
            _, writer = await asyncio.open_connection("127.0.0.1", served.port)  # it listens
            writer.close()
            served.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(loop.sock_recv(sock, 256), 10) == b"STOPPING=1"
            assert await asyncio.wait_for(served.process.wait(), 15) == 0
        finally:
            await stop_serve(served)


class GatedBroker(MemoryBroker):
    """The embedded broker, with one user's handshake held at a chosen step (our own seam)."""

    def __init__(self, step: str) -> None:
        super().__init__(history_size=100, history_max_age=3600)
        self.step = step
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    async def _hold(self, step: str, user: str | None = None) -> None:
        if step == self.step and user in (None, "slow"):
            self.reached.set()
            await self.gate.wait()

    async def snapshot(self, user_id: str) -> tuple[Set[str] | None, Position]:
        await self._hold("snapshot", user_id)
        return await super().snapshot(user_id)

    def held_snapshot(self, user_id: str) -> tuple[Set[str] | None, Position] | None:
        return None  # every handshake reads, so the gated step is reached

    def confirmed_before(self, channels: Iterable[str], position: Position) -> bool:
        return "room:slow" not in channels and super().confirmed_before(channels, position)

    async def wait_subscribed(self, channels: Iterable[str]) -> None:
        if "room:slow" in channels:
            await self._hold("subscribe")


async def _drain_with_a_handshake_held(step: str, live: int) -> bytes:
    broker = GatedBroker(step)
    settings = Settings(port=0, keepalive=5, shutdown_drain=1.0)
    service = Service(settings, broker=broker)
    await service.start()
    try:
        await broker.grant("slow", ["room:slow"], b"")
        await broker.grant("fast", ["room:fast"], b"")
        clients = [await SseClient.open(service.port, "user=fast") for _ in range(live)]
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"GET /?user=slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(broker.reached.wait(), 10)
        draining = asyncio.create_task(service.drain())
        await asyncio.sleep(0)  # the drain's first step marks the service as stopping
        assert service.streams.stopping
        broker.gate.set()
        answer = await asyncio.wait_for(reader.read(), 10)  # until the service closes it
        writer.close()
        await asyncio.wait_for(draining, 20)
        for client in clients:
            await client.close()
        return answer
    finally:
        broker.gate.set()
        await service.stop()


@pytest.mark.parametrize(("step", "live"), [("subscribe", 0), ("snapshot", 10)])
async def test_a_handshake_under_way_when_a_drain_begins_gets_a_retry_not_an_ok(
    step: str, live: int
) -> None:
    """A stream still connecting when the stop begins gets `error` and a 1-2 s retry, never
    an `ok` that the exit would then cut without a hint."""
    answer = await _drain_with_a_handshake_held(step, live)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    event = answer.split(b"\r\n\r\n", 1)[1]
    fields = dict(line.split(b": ", 1) for line in event.strip().split(b"\n"))
    assert fields[b"data"] == status("error").encode()
    assert 1000 <= int(fields[b"retry"]) < 2000
    assert b"<status>ok</status>" not in answer
