"""The Python cost of one stream handshake and close (S4's cycle), no sockets.

    python bench/handshake_path.py [--users 10000] [--cycles 100000]

The service runs in this process on the embedded broker; each cycle makes a
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


async def run(users: int, cycles: int) -> None:
    service = Service(load({"port": "0", "log_level": "warning"}, environ={}))
    await service.start()
    try:
        for index in range(users):  # as S4: every user may read room:1
            await service.broker.grant(f"b{index}", ["room:1"], b"granted")
        requests = [
            b"GET /?user=b%d HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n\r\n" % index
            for index in range(users)
        ]
        gc.freeze()
        start = time.perf_counter()
        for index in range(cycles):
            transport = NullTransport()
            conn = HttpConnection(service)
            conn.connection_made(transport)  # type: ignore[arg-type]
            conn.data_received(requests[index % users])
            while not transport.writes:  # noqa: ASYNC110 (an Event would add its own cost)
                await asyncio.sleep(0)
            conn.connection_lost(None)
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
    args = parser.parse_args()
    gc.set_threshold(GC_THRESHOLD_0, 20, 100)
    uvloop.run(run(args.users, args.cycles))


if __name__ == "__main__":
    main()
