"""Resume is no amplifier: replays are held to the unsent bound, far-past ids are cheap.

Measured tests: a service's RSS under non-reading resumes, and the event-loop
stall and Redis busy time of a resume that missed far more than one replay may
carry. The bounds are generous ceilings, not benchmarks.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import time

import pytest
import redis

from sisyphus.client import HttpPublisher
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory, grant
from tests.faults.test_slow_and_churn import http_get, process_rss
from tests.support.metrics import samples
from tests.support.sse_client import SseClient, status
from tests.test_cli import run_cli, start_serve, stop_serve

UNSENT = 256 * 1024


async def test_resumes_that_never_read_hold_at_most_the_unsent_bound_each() -> None:
    """100 resuming sockets that read nothing cost at most 100 x the unsent bound."""
    served = await start_serve(
        "--max-unsent-bytes", str(UNSENT), "--replay-max-bytes", str(4 * 1024 * 1024),
        "--max-message-bytes", "40000", "--max-connections-per-user", "200",
    )  # fmt: skip
    sockets: list[socket.socket] = []
    try:
        await run_cli("grant", "1", "room:1", "--url", served.url)
        await run_cli("grant", "2", "room:1", "--url", served.url)
        publisher = HttpPublisher(served.url)
        first = await asyncio.to_thread(publisher.publish, "room:1", "start")
        for i in range(90):
            # 900 KB of line breaks: 6.3 MB on the wire, each line its own `data:` line
            # (more than the kernel's socket buffer takes off the process's hands).
            await asyncio.to_thread(publisher.publish, "room:1", f"{chr(10) * 10_000}{i}")
        before = process_rss(served.process.pid)
        for _ in range(100):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", served.port))
            sock.sendall(
                b"GET /?user=1 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: %s\r\n\r\n" % first.encode()
            )
            sockets.append(sock)
        for _ in range(300):  # until every handshake has answered
            try:
                metrics = await asyncio.to_thread(http_get, served.port, "/metrics")
            except OSError:  # a service busy writing replays may answer late
                continue
            if samples(metrics)["sisyphus_connections_opened_total"] == 100:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the 100 resumes were not all answered")
        growth = process_rss(served.process.pid) - before
        assert growth < 100 * UNSENT + 16 * 1024 * 1024, growth
        reader = await SseClient.open(served.port, "user=2", headers={"Last-Event-ID": first})
        assert (await reader.expect()).data == status("ok")
        assert (await reader.expect()).data == status("reset")  # 6.3 MB > the unsent bound
    finally:
        for sock in sockets:
            sock.close()
        await stop_serve(served)


PING_PROBE = """
import sys, time, redis
client = redis.Redis(port=int(sys.argv[1]))
client.ping()
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
worst = 0.0
while time.monotonic() < deadline:
    start = time.perf_counter()
    client.ping()
    worst = max(worst, time.perf_counter() - start)
print(worst, flush=True)
"""


async def loop_lag_during(work: asyncio.Future[None]) -> float:
    """The longest the event loop was late for a 1 ms sleep while ``work`` ran."""
    worst = 0.0
    while not work.done():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - start - 0.001)
    return worst


async def far_past_resume(service: Service, first: str) -> None:
    client = await SseClient.open(service.port, "user=1", headers={"Last-Event-ID": first})
    assert (await client.expect()).data == status("ok")
    assert (await client.expect()).data == status("reset")
    await client.close()


@pytest.mark.timeout(180)
async def test_a_far_past_resume_stalls_neither_the_loop_nor_redis(
    make_service: ServiceFactory, broker_kind: str
) -> None:
    """100 channels x 1,000 missed messages: `reset` after bounded work on both sides."""
    service = await make_service(history_size=1000)
    channels = [f"room:{i}" for i in range(100)]
    await grant(service.port, "1", *channels)
    first = (await service.broker.publish("room:0", b"first")).encode().decode()
    payload = b"m" * 100
    for round_ in range(1000):
        await asyncio.gather(*(service.broker.publish(c, payload) for c in channels))
        if round_ % 100 == 0:
            await asyncio.sleep(0)
    probe = None
    plain = None
    if broker_kind == "redis":
        plain = redis.Redis.from_url(service.settings.redis_url or "")
        # Redis's own record of how long each command ran, from now on.
        plain.config_set("slowlog-log-slower-than", 0)
        plain.config_set("slowlog-max-len", 1_000_000)
        plain.slowlog_reset()
        port = plain.connection_pool.connection_kwargs["port"]
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PING_PROBE, str(port), "3", stdout=asyncio.subprocess.PIPE
        )
        assert probe.stdout is not None
        assert (await probe.stdout.readline()).strip() == b"ready"
    gc.collect()  # the set-up's garbage is collected now, not during the measurement
    lags = []
    for _ in range(5):
        work = asyncio.ensure_future(far_past_resume(service, first))
        lags.append(await loop_lag_during(work))
        await work
    assert max(lags) < 0.020, lags
    if probe is not None and plain is not None:
        assert probe.stdout is not None
        worst_ping = float(await probe.stdout.readline())
        await probe.wait()
        busiest = max(
            entry["duration"]
            for entry in plain.slowlog_get(1_000_000)
            if b"EVAL" in entry["command"]
        )
        plain.config_set("slowlog-log-slower-than", 10000)
        plain.close()
        assert busiest < 10_000, f"a script held Redis for {busiest} us"
        # The PING also waits for this machine's scheduler: a ceiling, not Redis's time.
        assert worst_ping < 0.050, worst_ping
