"""The Python cost of one stream handshake and close (S4's cycle), no sockets.

    python bench/handshake_path.py [--users 10000] [--cycles 100000] [--redis URL]

The service runs in this process on the embedded broker (or on the Redis at URL: every
user connects twice first, so that the measured cycles find their sets held); each
cycle makes a
connection with a transport that only records, feeds it a stream request, lets the
loop run until the `ok` status is written, then loses the connection, as a client
that connects, reads `ok` and closes does. The kernel's part (accept, read, write,
close on real sockets) comes on top of what is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import uvloop
from null_transport import NullTransport

from sisyphus.config import load
from sisyphus.server.app import GC_THRESHOLD_0, Service
from sisyphus.server.connection import HttpConnection


async def cycle(service: Service, request: bytes) -> None:
    transport = NullTransport()
    conn = HttpConnection(service)
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(request)
    while not transport.writes:  # noqa: ASYNC110 (an Event would add its own cost)
        await asyncio.sleep(0)
    conn.connection_lost(None)


async def run(users: int, cycles: int, redis_url: str | None) -> None:
    options = {"port": "0", "log_level": "warning"}
    if redis_url:
        options["redis_url"] = redis_url
    service = Service(load(options, environ={}))
    await service.start()
    try:
        for index in range(users):  # as S4: every user may read room:1
            await service.broker.grant(f"b{index}", ["room:1"], b"granted")
        requests = [
            b"GET /?user=b%d HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n\r\n" % index
            for index in range(users)
        ]
        if redis_url:
            for _ in range(2):  # the second read of each set, with user:<id> lingering, is kept
                for request in requests:
                    await cycle(service, request)
            await asyncio.sleep(0.5)
        gc.freeze()
        start = time.perf_counter()
        for index in range(cycles):
            await cycle(service, requests[index % users])
        elapsed = time.perf_counter() - start
        print(
            f"{cycles} handshakes over {users} users: {elapsed * 1e6 / cycles:.1f} us of "
            f"Python per connect-ok-close cycle, {cycles / elapsed:,.0f}/s "
            f"({service.metrics.connections_opened} streams opened)"
        )
    finally:
        await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--redis", help="a Redis URL (redis://HOST:PORT/DB) instead of embedded")
    args = parser.parse_args()
    gc.set_threshold(GC_THRESHOLD_0, 20, 100)
    uvloop.run(run(args.users, args.cycles, args.redis))


if __name__ == "__main__":
    main()
