"""The Python cost of the hot path alone: dispatch + flush to N subscribers, no sockets.

    python bench/hub_dispatch.py [--subscribers 10000] [--messages 200] [--burst 1]
                                 [--plain] [--repeat 1]

Subscribers write into a transport that only counts bytes, so what is measured is the
hub's own work per delivery (encode once, queue, one write per subscriber per flush).
`--burst K` dispatches K messages per loop iteration, to show write coalescing.
`--repeat R` runs the timed loop R times on the same subscribers and prints the best and
the median too: on a shared machine one run's number moves by tens of percent.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from null_transport import NullTransport

from sisyphus.hub.hub import Hub
from sisyphus.hub.subscriber import Subscriber
from sisyphus.metrics import Metrics


class Sink:
    def subscribe(self, channels: list[str]) -> None:
        return None

    def unsubscribe(self, channels: list[str]) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--plain", action="store_true", help="plain PUBLISH messages (no seq): each stream's id"
    )
    args = parser.parse_args()
    scheduled: list[Callable[[], None]] = []
    hub = Hub(Sink(), scheduled.append, time.monotonic, Metrics(), lambda u, p: None, time.time)
    transports = []
    for index in range(args.subscribers):
        transport = NullTransport()
        sub = Subscriber(transport, f"u{index}", b"e-0-0", 1 << 20, 0.0)
        hub.add(sub, ["room:1"])
        sub.go_live(b"", b"e-0-0", 0.0)
        transports.append(transport)
    payload = b'{"event":"changed","id":12345,"ts":1795869851.123}'
    deliveries = args.subscribers * args.messages
    per_delivery = []
    for _ in range(args.repeat):
        before = sum(t.writes for t in transports)
        start = time.perf_counter()
        for index in range(0, args.messages, args.burst):
            for seq in range(index, index + args.burst):
                if args.plain:
                    hub.dispatch("room:1", payload)
                else:
                    hub.dispatch("room:1", payload, seq + 1, b"e", 1)
            for callback in scheduled:
                callback()
            scheduled.clear()
        elapsed = time.perf_counter() - start
        writes = sum(t.writes for t in transports) - before
        per_delivery.append(elapsed * 1e9 / deliveries)
        print(
            f"{args.subscribers} subscribers x {args.messages} messages, burst {args.burst}: "
            f"{elapsed * 1e9 / deliveries:.0f} ns per delivery, "
            f"{deliveries / elapsed:,.0f} deliveries/s, "
            f"{writes / deliveries:.2f} writes per delivery"
        )
    if args.repeat > 1:
        print(
            f"best {min(per_delivery):.0f} ns, median {statistics.median(per_delivery):.0f} ns "
            f"per delivery over {args.repeat} runs"
        )


if __name__ == "__main__":
    main()
