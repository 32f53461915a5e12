"""Graceful stop of a real `sisyphus serve` process on SIGTERM, and a forced one."""

from __future__ import annotations

import asyncio
import signal

import pytest

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
