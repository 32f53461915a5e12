"""The Python cost of one unicast publish through the HTTP API, no sockets.

    python bench/publish_path.py [--users 10000] [--messages 200000] [--batch 50]

The service runs in this process on the embedded broker with ``--users`` streams,
each on its own channel, writing into transports that only count. Publish requests
are fed to one API connection ``--batch`` at a time (a pipelining publisher), as
bench/run.py's S3 sends them. What is printed is the service's Python cost per
message: parse, authorize, publish, history, dispatch, flush, answer; the kernel's
part (reads and writes on real sockets) comes on top of it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time

import uvloop
from null_transport import NullTransport

from sisyphus.config import load
from sisyphus.hub.subscriber import Subscriber
from sisyphus.server.app import GC_THRESHOLD_0, Service
from sisyphus.server.connection import HttpConnection


def publish_request(channel: str) -> bytes:
    body = b'{"channel":"%s","data":"%s"}' % (channel.encode(), b"x" * 100)
    return (
        b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


async def run(users: int, messages: int, batch: int) -> None:
    service = Service(load({"port": "0", "log_level": "warning"}, environ={}))
    await service.start()
    try:
        transports = []
        for index in range(users):
            transport = NullTransport()
            now = service.loop.time()  # fresh streams: no keep-alive falls due during the run
            sub = Subscriber(transport, f"u{index}", b"e-0-0", 1 << 20, now)  # type: ignore[arg-type]
            service.hub.add(sub, frozenset({f"inbox:{index}"}))
            sub.go_live(b"", b"e-0-0", now)
            transports.append(transport)
        rng = random.Random(1)  # noqa: S311 (load pattern, not a secret)
        batches = [
            b"".join(publish_request(f"inbox:{rng.randrange(users)}") for _ in range(batch))
            for _ in range(64)
        ]
        api = NullTransport()
        conn = HttpConnection(service)
        conn.connection_made(api)  # type: ignore[arg-type]
        gc.freeze()
        before = sum(t.writes for t in transports)
        start = time.perf_counter()
        for index in range(messages // batch):
            conn.data_received(batches[index % len(batches)])
            await asyncio.sleep(0)  # the API task answers the batch
            await asyncio.sleep(0)  # the hub flushes the deliveries
        elapsed = time.perf_counter() - start
        sent = messages // batch * batch
        delivered = sum(t.writes for t in transports) - before
        print(
            f"{users} users, {sent} publishes in batches of {batch}: "
            f"{elapsed * 1e6 / sent:.2f} us of Python per publish, {sent / elapsed:,.0f}/s; "
            f"{delivered} stream writes, {api.writes} API writes"
        )
    finally:
        await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    gc.set_threshold(GC_THRESHOLD_0, 20, 100)
    uvloop.run(run(args.users, args.messages, args.batch))


if __name__ == "__main__":
    main()
