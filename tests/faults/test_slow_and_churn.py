"""Slow clients are cut without growing memory; connection churn leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.request

import pytest
import redis

from sisyphus.brokers.redis import COMMAND_CONNECTIONS
from sisyphus.client import HttpPublisher
from sisyphus.server.app import Service
from tests.conftest import grant
from tests.support.metrics import samples
from tests.support.sse_client import SseClient, status
from tests.test_cli import run_cli, start_serve, stop_serve


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_client_that_never_reads_is_cut_and_others_keep_receiving() -> None:
    """A stream that stops reading is cut at the unsent bound; the service's RSS stays bounded.

    The service runs as its own process so its RSS is measured alone.
    """
    served = await start_serve(
        "--max-unsent-bytes", "262144", "--history-size", "10", "--max-message-bytes", "200000"
    )
    sleeper = socket.socket()
    try:
        await run_cli("grant", "slow", "room:1", "--url", served.url)
        await run_cli("grant", "fast", "room:1", "--url", served.url)
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleeper.connect(("127.0.0.1", served.port))
        sleeper.sendall(b"GET /?user=slow HTTP/1.1\r\nHost: x\r\n\r\n")
        fast = await SseClient.open(served.port, "user=fast")
        assert (await fast.expect()).data == status("ok")
        before = process_rss(served.process.pid)
        publisher = HttpPublisher(served.url)
        payload = "x" * 65536
        for i in range(400):  # 26 MB towards a client that reads nothing
            await asyncio.to_thread(publisher.publish, "room:1", f"{payload}{i}")
            event = await fast.next_message()
            assert event.data == f"{payload}{i}"
            fast.raw.clear()  # the test client keeps no history of its own
        growth = process_rss(served.process.pid) - before
        assert growth < 16 * 1024 * 1024, growth
        metrics = await asyncio.to_thread(http_get, served.port, "/metrics")
        assert samples(metrics)["sisyphus_slow_client_cuts_total"] == 1
    finally:
        sleeper.close()
        await stop_serve(served)


async def test_pipelining_clients_that_never_read_leave_memory_bounded() -> None:
    """Sockets pipelining GET /metrics without reading keep the RSS bounded; others are served.

    Each attacker has a small receive buffer and sends as fast as the service reads;
    when the service cuts it (at the header timeout), it comes back. Meanwhile a normal
    client asks /healthz every 0.1 s. The service runs as its own process.
    """
    served = await start_serve("--header-timeout", "1")
    loop = asyncio.get_running_loop()
    batch = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100
    done = asyncio.Event()
    cuts = 0

    async def attack() -> None:
        nonlocal cuts
        while not done.is_set():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", served.port))
                while not done.is_set():
                    await loop.sock_sendall(sock, batch)
            except OSError:
                cuts += 1
            finally:
                sock.close()

    async def stop_attacks() -> None:
        done.set()
        for task in attackers:
            task.cancel()
        await asyncio.gather(*attackers, return_exceptions=True)

    before = process_rss(served.process.pid)
    attackers = [loop.create_task(attack()) for _ in range(4)]
    try:
        peak = before
        for _ in range(40):  # 4 s
            answer = await asyncio.wait_for(asyncio.to_thread(http_get, served.port, "/healthz"), 2)
            assert answer == '{"status": "alive"}'
            peak = max(peak, process_rss(served.process.pid))
            await asyncio.sleep(0.1)
        await stop_attacks()
        assert peak - before < 64 * 1024 * 1024, (before, peak)
        assert cuts >= 4  # each attacker was cut at least once
    finally:
        await stop_attacks()
        await stop_serve(served)


def process_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return str(answer.read().decode())


@pytest.mark.parametrize("cycles", [2000])
async def test_churn_returns_fds_subscriptions_and_state_to_baseline(
    service: Service, broker_kind: str, cycles: int
) -> None:
    """After thousands of clients came and went, fds, subscriptions and state are as before."""
    for user in range(20):
        await grant(service.port, f"u{user}", f"room:{user}", "room:shared")
    await asyncio.sleep(0.05)
    baseline = open_fds()

    async def cycle(index: int) -> None:
        client = await SseClient.open(service.port, f"user=u{index % 20}")
        assert (await client.expect()).data == status("ok")
        await client.close()

    for start in range(0, cycles, 100):
        await asyncio.gather(*(cycle(i) for i in range(start, start + 100)))
    for _ in range(200):
        if service.hub.stream_count() == 0 and open_fds() <= baseline + COMMAND_CONNECTIONS:
            break
        await asyncio.sleep(0.01)
    assert service.hub.stream_count() == 0
    assert service.hub.channels() == []
    assert service.handshakes == {}
    # On Redis, the command connection may have been opened during the churn.
    allowance = COMMAND_CONNECTIONS if broker_kind == "redis" else 0
    assert open_fds() <= baseline + allowance
    assert service.metrics.connections_opened == cycles
    if broker_kind == "redis":
        assert service.settings.redis_url is not None
        client = redis.Redis.from_url(service.settings.redis_url)
        # The channels linger for --subscription-linger after their last stream left.
        until = time.monotonic() + service.settings.subscription_linger + 5
        while time.monotonic() < until:
            if client.pubsub_channels() == []:
                break
            await asyncio.sleep(0.05)
        assert client.pubsub_channels() == []
        assert client.pubsub_numsub("room:shared") == [(b"room:shared", 0)]
        client.close()
