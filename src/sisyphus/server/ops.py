"""Operator endpoints: ``/healthz``, ``/readyz`` and ``/metrics`` (Prometheus).

``/healthz`` says the process is alive and its loop answers. ``/readyz`` says a
load balancer may send clients: the service accepts connections AND its broker
is connected with every subscription confirmed, so a service that went deaf
after a broker failover is not "ready". Each also answers ``HEAD`` (the connection
drops the body of every answer to a ``HEAD``).

``/metrics`` is written by prometheus-client (HELP, TYPE, escaping, and OpenMetrics
when the scraper's ``Accept`` asks for it) from a collector that reads the plain
counters of :mod:`sisyphus.metrics` at scrape time: the hot path never takes the
library's locks.

Under ``serve --workers N`` (:mod:`sisyphus.server.multiproc`) every worker answers for
the whole service: ``/metrics`` merges every worker's figures, and ``/readyz`` is 200 only
while every live worker is ready (the kernel spreads new connects over all of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from http import HTTPStatus

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from sisyphus.brokers.base import Broker
from sisyphus.hub.hub import Hub
from sisyphus.metrics import COUNTER_HELP, Buckets, Metrics
from sisyphus.protocol import http
from sisyphus.server.multiproc import SharedFigures

ROUTES = ("/healthz", "/readyz", "/metrics")

BROKER_COUNTER_HELP = {
    "broker_reconnects": "times the broker link came back after a loss",
    "broker_malformed_messages": "broker messages dropped as malformed",
}

GAUGE_HELP = {
    "streams": "event streams open in this process",
    "channels": "channels with at least one local listener",
    "handshakes": "connections still sending their request head",
    "broker_connected": "1 while the broker connection is up",
    "ready": "1 while /readyz answers 200",
}

HISTOGRAM_HELP = {
    "delivery_latency_seconds": "seconds from a message's arrival at the process to its write "
    "to every local listener's transport",
    "handshake_duration_seconds": "seconds from a stream's complete request to its ok status "
    "written",
}


class Ops:
    def __init__(
        self,
        broker: Broker,
        hub: Hub,
        metrics: Metrics,
        accepting: Callable[[], bool],
        handshakes: Callable[[], int],
        headers: http.Headers = (),
        shared: SharedFigures | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._hub = hub
        self._metrics = metrics
        self._accepting = accepting
        self._handshakes = handshakes
        self._headers = headers  # on every answer (``Vary: Origin`` once CORS is on)
        # A registry of its own: nothing of the library's default (process, GC) registry,
        # and several services in one process (the tests) don't collide.
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))
        # One of several workers: scrapes read every worker's figures from the shared files.
        self._shared = shared
        # Stamps the shared figures: CLOCK_MONOTONIC is one clock for every process of the
        # machine, and a wall-clock step can't make every worker look stale at once.
        self._clock = clock
        if shared is not None:
            self._registry = shared.registry

    def ready(self) -> bool:
        return self._accepting() and self._broker.ready

    def publish(self) -> None:
        """Write this worker's figures to the shared files (nothing in a single process)."""
        if self._shared is None:
            return
        counters, gauges, histograms = self._figures()
        self._shared.write(
            {f"sisyphus_{name}": (_counter_help(name), value) for name, value in counters.items()},
            {f"sisyphus_{name}": (GAUGE_HELP[name], value) for name, value in gauges.items()},
            {
                f"sisyphus_{name}": (HISTOGRAM_HELP[name], buckets)
                for name, buckets in histograms.items()
            },
            self._clock(),
        )

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()

    def _readiness(self) -> bytes | None:
        """Why ``/readyz`` is 503, or ``None`` when it is 200."""
        if not self._accepting():
            return b"stopping"
        if not self._broker.ready:
            return b"broker not ready"
        if self._shared is not None:
            self.publish()
            if not self._shared.all_ready(self._clock()):
                return b"worker not ready"
        return None

    def handle(self, request: http.Request) -> bytes:
        keep = request.keep_alive
        headers = self._headers
        if request.method not in ("GET", "HEAD"):
            return http.response(
                HTTPStatus.METHOD_NOT_ALLOWED,
                http.error_body("use GET"),
                keep_alive=keep,
                headers=(("Allow", "GET, HEAD"), *headers),
            )
        if request.path == "/healthz":
            return http.response(
                HTTPStatus.OK, b'{"status": "alive"}', keep_alive=keep, headers=headers
            )
        if request.path == "/readyz":
            reason = self._readiness()
            if reason is None:
                return http.response(
                    HTTPStatus.OK, b'{"status": "ready"}', keep_alive=keep, headers=headers
                )
            return http.response(
                HTTPStatus.SERVICE_UNAVAILABLE,
                b'{"status": "%s"}' % reason,
                keep_alive=keep,
                headers=headers,
            )
        self.publish()  # this worker's own figures fresh in the merge (several workers)
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return http.response(
            HTTPStatus.OK,
            encode(self._registry),
            content_type,
            keep_alive=keep,
            headers=headers,
        )

    def _figures(self) -> tuple[dict[str, int], dict[str, int], dict[str, Buckets]]:
        """(counters, gauges, histograms) by name, read from the plain numbers now."""
        counters = {
            **self._metrics.statistics(),
            "broker_reconnects": self._broker.reconnects,
            "broker_malformed_messages": self._broker.malformed,
        }
        gauges = {
            "streams": self._hub.stream_count(),
            "channels": len(self._hub.channels()),
            "handshakes": self._handshakes(),
            "broker_connected": int(self._broker.connected),
            "ready": int(self.ready()),
        }
        histograms = {
            "delivery_latency_seconds": self._metrics.delivery_latency,
            "handshake_duration_seconds": self._metrics.handshake_duration,
        }
        return counters, gauges, histograms

    def collect(self) -> Iterator[Metric]:
        """The metric families, read from the plain counters now (prometheus-client calls it)."""
        counters, gauges, histograms = self._figures()
        for name, value in counters.items():
            yield CounterMetricFamily(f"sisyphus_{name}", _counter_help(name), value=value)
        for name, value in gauges.items():
            yield GaugeMetricFamily(f"sisyphus_{name}", GAUGE_HELP[name], value=value)
        for name, buckets in histograms.items():
            yield _histogram(f"sisyphus_{name}", HISTOGRAM_HELP[name], buckets)


class _Collector(Collector):
    def __init__(self, ops: Ops) -> None:
        self._ops = ops

    def collect(self) -> Iterator[Metric]:
        return self._ops.collect()


def _counter_help(name: str) -> str:
    return COUNTER_HELP.get(name) or BROKER_COUNTER_HELP[name]


def _histogram(name: str, help: str, buckets: Buckets) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, help, buckets=buckets.cumulative(), sum_value=buckets.sum)
