"""Soak: hold thousands of streams with traffic for a while; print RSS, fds and delivery.

    python bench/soak.py --connections 5000 --duration 600 --rate 50

Starts its own `sisyphus serve` (embedded broker, or `--redis URL`), grants every user
one of `--channels` rooms, opens the streams from this process, publishes `--rate`
messages a second on random rooms through the HTTP API, and every `--interval` seconds
prints the service's RSS and open fds and how many events were delivered of those
expected. Exits 1 if anything was lost or a stream dropped. Loopback only; it stops by
itself after `--duration` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import cast


@dataclass
class Tally:
    delivered: int = 0
    expected: int = 0
    open_streams: int = 0
    dropped: int = 0
    per_room: dict[str, int] = field(default_factory=dict)


class Stream(asyncio.Protocol):
    """One subscriber: counts message events (not statuses or keep-alives)."""

    def __init__(self, tally: Tally, user: str) -> None:
        self.tally = tally
        self.user = user
        self.buffer = b""
        self.ok = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(
            f"GET /?user={self.user} HTTP/1.1\r\nHost: soak\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            if b"data: soak " in event:
                self.tally.delivered += 1
            elif b"<status>ok</status>" in event and not self.ok.done():
                self.tally.open_streams += 1
                self.ok.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ok.done():
            self.tally.open_streams -= 1
            self.tally.dropped += 1
        else:
            self.ok.set_exception(ConnectionError("closed before ok"))


def api(connection: http.client.HTTPConnection, route: str, body: dict[str, object]) -> None:
    connection.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"{route}: HTTP {response.status}")


def process_stats(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) of ``pid``."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def soak(args: argparse.Namespace) -> int:
    port = free_port()
    command = [sys.executable, "-m", "sisyphus", "serve", "--port", str(port)]
    command += ["--log-level", "warning", "--max-connections-per-user", "10"]
    command += ["--history-size", str(args.history_size)]
    if args.redis:
        command += ["--redis", args.redis]
    server = await asyncio.create_subprocess_exec(*command)
    try:
        return await drive(args, port, server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        await server.wait()


async def drive(args: argparse.Namespace, port: int, pid: int) -> int:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    rooms = [f"room:{i}" for i in range(args.channels)]
    control = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    tally = Tally()
    members: dict[str, int] = {room: 0 for room in rooms}
    for index in range(args.connections):
        room = rooms[index % len(rooms)]
        api(control, "/api/grant", {"user": f"u{index}", "channels": [room]})
        members[room] += 1
    loop = asyncio.get_running_loop()
    streams = []
    for index in range(args.connections):
        _, stream = await loop.create_connection(
            lambda index=index: Stream(tally, f"u{index}"), "127.0.0.1", port
        )
        streams.append(stream)
    await asyncio.gather(*(stream.ok for stream in streams))
    start = time.monotonic()
    rss, fds = process_stats(pid)
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"{'t (s)':>6} {'RSS MiB':>8} {'fds':>6} {'streams':>8} {'delivered':>10} {'expected':>10}"
    )
    print(f"{0:6.0f} {rss / 2**20:8.1f} {fds:6d} {tally.open_streams:8d} {0:10d} {0:10d}")
    next_report = start + args.interval
    sent = 0
    while (now := time.monotonic()) < start + args.duration:
        due = int((now - start) * args.rate)
        while sent < due:
            room = random.choice(rooms)  # noqa: S311 - load shape, not a secret
            await asyncio.to_thread(
                api, control, "/api/publish", {"channel": room, "data": f"soak {sent}"}
            )
            tally.expected += members[room]
            sent += 1
        if now >= next_report:
            next_report += args.interval
            rss, fds = process_stats(pid)
            print(
                f"{now - start:6.0f} {rss / 2**20:8.1f} {fds:6d} {tally.open_streams:8d} "
                f"{tally.delivered:10d} {tally.expected:10d}",
                flush=True,
            )
        await asyncio.sleep(0.01)
    await asyncio.sleep(2)  # let the last messages arrive
    rss, fds = process_stats(pid)
    print(
        f"{time.monotonic() - start:6.0f} {rss / 2**20:8.1f} {fds:6d} {tally.open_streams:8d} "
        f"{tally.delivered:10d} {tally.expected:10d}"
    )
    lost = tally.expected - tally.delivered
    print(
        f"published {sent}, delivered {tally.delivered} of {tally.expected}, lost {lost}, "
        f"streams dropped {tally.dropped}"
    )
    return 0 if lost == 0 and tally.dropped == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds")
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second")
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between reports")
    parser.add_argument("--redis", help="run the service on this Redis URL")
    parser.add_argument(
        "--history-size", type=int, default=1000, help="the service's --history-size"
    )
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(soak(args))
    return uvloop.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
