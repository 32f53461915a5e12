"""Plain integer counters and bucket counts, bumped on the hot path and read at scrape time.

A Prometheus client Counter takes a lock on every increment, and a Histogram's
``observe`` one too; these are plain attributes and plain lists on objects owned by
the event loop's thread, so counting costs one integer add and observing a latency
one ``bisect`` plus one add. :mod:`sisyphus.server.ops` turns them into Prometheus
metric families (through prometheus-client) when ``/metrics`` is scraped.

Each counter's HELP text is defined once, here, beside its field.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

# Delivery latency buckets, seconds: 0.5 ms to 5 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Buckets:
    """A histogram as plain numbers: the count per bucket (not cumulative), the sum.

    ``counts[i]`` counts the values in ``(bounds[i-1], bounds[i]]``; the last slot
    counts those above every bound (Prometheus's ``+Inf``). Only the loop's thread
    touches it: the scrape runs on the loop too, so no lock is needed.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs as a Prometheus histogram exposes them."""
        out = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


def _counter(help: str) -> Any:
    return dataclasses.field(default=0, metadata={"help": help})


@dataclass(slots=True)
class Metrics:
    """The process's counters (each exposed as ``sisyphus_<name>_total``) and histograms."""

    connections_opened: int = _counter("event streams that reached the ok status")
    connections_closed: int = _counter("event streams that ended")
    messages_in: int = _counter("messages received from the broker")
    messages_out: int = _counter("messages queued for delivery to streams (one per stream)")
    keepalives: int = _counter("noop keep-alives sent")
    slow_client_cuts: int = _counter("streams cut for holding more than --max-unsent-bytes")
    status_failure: int = _counter("failure statuses sent")
    status_error: int = _counter("error statuses sent")
    status_disconnected: int = _counter("disconnected statuses sent")
    api_requests: int = _counter("publish/grant/revoke/position API calls")
    api_rejected: int = _counter("API calls refused")
    bad_requests: int = _counter("malformed or unroutable HTTP requests")
    auth_failures: int = _counter("streams refused for a missing, bad or expired token")
    tokens_expired: int = _counter("streams ended because their token expired")
    limit_connections: int = _counter("streams refused at --max-connections")
    limit_user_connections: int = _counter("streams refused at --max-connections-per-user")
    limit_channels: int = _counter(
        "channel sets over --max-channels-per-user (stream refused or ended)"
    )
    header_timeouts: int = _counter("connections cut for a request head slower than allowed")
    replayed: int = _counter("messages replayed to resuming streams")
    resets: int = _counter("reset statuses sent (a position too old to resume)")
    # Seconds from a message's arrival at the process to its write to every local
    # listener's transport (measured at the end of the flush that wrote it).
    delivery_latency: Buckets = dataclasses.field(default_factory=Buckets)
    # Seconds from a stream's complete request to its `ok` written.
    handshake_duration: Buckets = dataclasses.field(default_factory=Buckets)

    def statistics(self) -> dict[str, int]:
        """The counters by name (without the histograms)."""
        return {name: getattr(self, name) for name in COUNTER_HELP}


COUNTER_HELP: dict[str, str] = {
    field.name: field.metadata["help"]
    for field in dataclasses.fields(Metrics)
    if "help" in field.metadata
}
