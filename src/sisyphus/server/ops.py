"""Operator endpoints: ``/healthz``, ``/readyz`` and ``/metrics`` (Prometheus text).

``/healthz`` says the process is alive and its loop answers. ``/readyz`` says a
load balancer may send clients: the service accepts connections AND its broker
is connected with every subscription confirmed, so a service that went deaf
after a broker failover is not "ready". Each also answers ``HEAD`` (the connection
drops the body of every answer to a ``HEAD``).
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from sisyphus.brokers.base import Broker
from sisyphus.hub.hub import Hub
from sisyphus.metrics import Metrics
from sisyphus.protocol import http

ROUTES = ("/healthz", "/readyz", "/metrics")

_GAUGE_HELP = {
    "streams": "event streams open in this process",
    "channels": "channels with at least one local listener",
    "handshakes": "connections still sending their request head",
    "broker_connected": "1 while the broker connection is up",
    "ready": "1 while /readyz answers 200",
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
    ) -> None:
        self._broker = broker
        self._hub = hub
        self._metrics = metrics
        self._accepting = accepting
        self._handshakes = handshakes
        self._headers = headers  # on every answer (``Vary: Origin`` once CORS is on)

    def ready(self) -> bool:
        return self._accepting() and self._broker.ready

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
            if self.ready():
                return http.response(
                    HTTPStatus.OK, b'{"status": "ready"}', keep_alive=keep, headers=headers
                )
            reason = "stopping" if not self._accepting() else "broker not ready"
            return http.response(
                HTTPStatus.SERVICE_UNAVAILABLE,
                b'{"status": "%s"}' % reason.encode(),
                keep_alive=keep,
                headers=headers,
            )
        return http.response(
            HTTPStatus.OK,
            self.exposition(),
            "text/plain; version=0.0.4; charset=utf-8",
            keep_alive=keep,
            headers=headers,
        )

    def exposition(self) -> bytes:
        """Counters and gauges in Prometheus text format, read now (no lock on the hot path)."""
        lines = []
        counters = {
            **self._metrics.statistics(),
            "broker_reconnects": self._broker.reconnects,
            "broker_malformed_messages": self._broker.malformed,
        }
        for name, value in counters.items():
            metric = f"sisyphus_{name}_total"
            lines += [f"# TYPE {metric} counter", f"{metric} {value}"]
        gauges = {
            "streams": self._hub.stream_count(),
            "channels": len(self._hub.channels()),
            "handshakes": self._handshakes(),
            "broker_connected": int(self._broker.connected),
            "ready": int(self.ready()),
        }
        for name, value in gauges.items():
            metric = f"sisyphus_{name}"
            lines += [f"# HELP {metric} {_GAUGE_HELP[name]}", f"# TYPE {metric} gauge"]
            lines.append(f"{metric} {value}")
        return ("\n".join(lines) + "\n").encode()
