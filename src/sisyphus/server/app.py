"""The service: wires broker, hub, streams and API, runs the server, stops it.

Owns the process's lifecycle: start (broker first, then the listening
socket), the one periodic keep-alive sweep, and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import time
from collections.abc import Callable

from sisyphus.brokers.base import Broker
from sisyphus.brokers.cluster import ClusterBroker
from sisyphus.brokers.memory import MemoryBroker
from sisyphus.brokers.redis import RedisBroker
from sisyphus.brokers.topology import parse_broker_url
from sisyphus.config import Settings, redact_password
from sisyphus.errors import BrokerUnavailable
from sisyphus.hub.hub import Hub
from sisyphus.hub.states import State
from sisyphus.hub.subscriber import Subscriber
from sisyphus.metrics import Metrics
from sisyphus.protocol import sse
from sisyphus.protocol.auth import Authenticator, TokenVerifier, VerificationKey
from sisyphus.protocol.cors import CorsPolicy
from sisyphus.protocol.resume import Seqs
from sisyphus.server.api import Api
from sisyphus.server.connection import HttpConnection
from sisyphus.server.lifecycle import shutdown_retry_ms
from sisyphus.server.multiproc import MULTIPROC_ENV, SharedFigures
from sisyphus.server.notify import notify
from sisyphus.server.ops import Ops
from sisyphus.server.streams import Streams

log = logging.getLogger("sisyphus")

# Closes during the drain window happen in steps this far apart.
DRAIN_STEP_SECONDS = 0.05

# Allocations between young-generation collections (Python's default is 700).
GC_THRESHOLD_0 = 50_000

# The one periodic tick (keep-alives, token expiry, slow request heads) runs at least
# this often, and at least four times per keep-alive interval.
MAX_TICK_SECONDS = 1.0


def make_broker(settings: Settings, wall_clock: Callable[[], float] = time.time) -> Broker:
    if settings.redis_url:
        cluster = parse_broker_url(settings.redis_url).uses_cluster
        return (ClusterBroker if cluster else RedisBroker)(
            settings.redis_url,
            timeout=settings.broker_timeout,
            history_size=settings.history_size,
            history_max_age=settings.history_max_age,
            ping_interval=settings.broker_ping_interval,
            linger=settings.subscription_linger,
        )
    return MemoryBroker(settings.history_size, settings.history_max_age, wall_clock)


def make_authenticator(settings: Settings) -> Authenticator:
    """Token verification from the settings; development mode when no key is configured."""
    if settings.development_mode:
        return Authenticator(None, settings.token_cookie)
    symmetric, asymmetric = settings.token_algorithms()
    keys = []
    if settings.secret:
        keys.append(VerificationKey(settings.secret, symmetric))
        if settings.previous_secret:
            keys.append(
                VerificationKey(settings.previous_secret, symmetric, settings.previous_secret_until)
            )
    if settings.public_key:
        keys.append(VerificationKey(settings.public_key, asymmetric))
    verifier = TokenVerifier(keys, settings.audience, settings.issuer, settings.leeway)
    return Authenticator(verifier, settings.token_cookie)


def _shared_figures() -> SharedFigures | None:
    """The worker's shared metric files when a supervisor runs several (``--workers``)."""
    path = os.environ.get(MULTIPROC_ENV)
    return SharedFigures(path) if path else None


class Service:
    """One Sisyphus process. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.broker = broker if broker is not None else make_broker(settings, wall_clock)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Connections still sending a request head, and since when (loop clock).
        self.handshakes: dict[HttpConnection, float] = {}
        self.open_connections = 0  # HTTP connections of any kind, streams included
        self.no_connections = asyncio.Event()  # set when the last one closes
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.cors = CorsPolicy(settings.cors_origins)
        self.hub = Hub(
            sink=self.broker,
            schedule=loop.call_soon,
            clock=loop.time,
            metrics=self.metrics,
            on_user_message=self._on_user_message,
            wall_clock=wall_clock,
            max_held=settings.replay_max_messages,
            on_overflow=self._on_overflow,
        )
        self.authenticator = make_authenticator(settings)
        self.streams = Streams(
            settings,
            self.broker,
            self.hub,
            self.metrics,
            loop,
            self.authenticator,
            self.cors,
            wall_clock,
        )
        self.api = Api(self.broker, settings.api_key, self.metrics, self.cors, wall_clock)
        self.accepting = False
        self.ops = Ops(
            self.broker,
            self.hub,
            self.metrics,
            lambda: self.accepting,
            lambda: len(self.handshakes),
            self.cors.vary,
            _shared_figures(),
        )
        self.broker.bind(self.hub.dispatch, self.streams.on_broker_lost)

    def _on_user_message(self, user_id: str, position: Seqs) -> None:
        self.streams.on_user_message(user_id, position)

    def _on_overflow(self, sub: Subscriber) -> None:
        # More arrived while it started or caught up than one replay may carry: the
        # client resumes by id (or gets `reset`) instead of the process holding it all.
        self.metrics.slow_client_cuts += 1
        self.streams.lifecycle.end(sub, sse.Status.ERROR, "overloaded")

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the service is not listening")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        settings = self.settings
        await self.broker.start()
        try:
            position = await self.broker.position()
        except BrokerUnavailable:
            pass  # learnt at the first stream's snapshot, once the broker is back
        else:
            self.hub.set_position(position.epoch, position.seqs, position.epochs)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self),
            settings.host,
            settings.port,
            reuse_address=True,
            reuse_port=settings.reuse_port or None,
            backlog=4096,
        )
        self._sweeper = loop.create_task(self._sweep())
        self.accepting = True
        self.ops.publish()  # one of several workers: counted by the others' /readyz from now
        if isinstance(self.broker, MemoryBroker):
            log.warning(
                "embedded broker: messages and rights live in this process only; "
                "publish and grant through the HTTP API or `sisyphus publish/grant`"
            )
        else:
            log.info("broker: redis at %s", redact_password(settings.redis_url or ""))
        if settings.api_key is None:
            log.warning("no API key: only loopback clients may publish, grant or revoke")
        if self.authenticator.development_mode:
            log.warning(
                "DEVELOPMENT MODE: no SISYPHUS_SECRET or SISYPHUS_PUBLIC_KEY, so ?user=<id> is "
                "trusted and ANYONE CAN LISTEN AS ANYONE. Never expose this to a network."
            )
        log.info("listening on http://%s:%d", settings.host, self.port)

    async def _sweep(self) -> None:
        """The one periodic tick: keep-alives, expired tokens, slow request heads."""
        interval = self.settings.keepalive
        tick = min(MAX_TICK_SECONDS, interval / 4)
        # Walking every stream is the costly part: do it four times per interval only.
        next_keepalive = self.loop.time()
        while True:
            await asyncio.sleep(tick)
            try:
                if self.loop.time() >= next_keepalive:
                    next_keepalive += interval / 4
                    self.hub.sweep_keepalive(interval)
                self.streams.expire()
                self._cut_slow_handshakes()
                self.broker.tick(self.loop.time())
                self.ops.publish()
            except Exception:
                log.exception("periodic sweep failed")  # the next tick tries again

    def _cut_slow_handshakes(self) -> None:
        deadline = self.loop.time() - self.settings.header_timeout
        slow = [conn for conn, since in self.handshakes.items() if since <= deadline]
        for conn in slow:
            self.metrics.header_timeouts += 1
            conn.time_out()

    async def stop(self) -> None:
        """Stop at once: stop accepting, close every stream, disconnect the broker."""
        self.accepting = False
        self.streams.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for sub in self.hub.subscribers():
            self.streams.lifecycle.close(sub)
        for conn in list(self.handshakes):
            conn.time_out()
        await self.streams.wait_idle()
        await self.broker.close()
        if self._server is not None:
            await self._server.wait_closed()
        self.ops.publish()  # a worker's final counters stay in the service's sums
        self.ops.close()

    async def drain(self) -> None:
        """Graceful stop: stop accepting, send every stream a reconnect hint, close them
        spread over the drain window (clients resume by id), then stop.

        The listener closes first, so that a process started with ``--reuse-port`` on the
        same port gets every new connection; streams that still arrive on kept-alive
        connections are refused with the same reconnect hint (``Streams.stopping``). The
        window lasts while any connection is open; with none left the process stops at once.
        """
        self.accepting = False  # /readyz is 503 from now on, on every connection
        self.streams.stopping = True
        self.ops.publish()  # the other workers' /readyz turn 503 now, not a tick later
        notify("STOPPING=1")
        if self._server is not None:
            self._server.close()
        subs = self.hub.subscribers()
        random.shuffle(subs)
        window = self.settings.shutdown_drain
        until = self.loop.time() + window
        batches = max(1, min(len(subs), int(window / DRAIN_STEP_SECONDS)))
        for index in range(batches):
            for sub in subs[index::batches]:
                # Per-connection jitter on top of the spread closes: no reconnect storm.
                if sub.state is State.STARTING:  # no answer yet: refused like a new stream
                    self.streams.lifecycle.end(
                        sub, sse.Status.ERROR, "shutting_down", shutdown_retry_ms()
                    )
                else:
                    farewell = b": shutting down\nretry: %d\n\n" % shutdown_retry_ms()
                    self.streams.lifecycle.close(sub, farewell)
            if index + 1 < batches:
                await asyncio.sleep(window / batches)
        # The window stays open while anyone is still connected (a kept-alive API client, a
        # proxy's idle upstream connection): they get answers (readiness 503, refusals with a
        # reconnect hint) until it ends, not a reset. With nobody left, stop at once.
        if self.open_connections:
            self.no_connections.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.no_connections.wait(), until - self.loop.time())
        log.info("drained %d streams", len(subs), extra={"streams": len(subs)})
        await self.stop()

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain within shutdown_timeout; a second signal
        stops at once."""
        loop = asyncio.get_running_loop()
        first = asyncio.Event()
        second = asyncio.Event()

        def on_signal() -> None:
            (second if first.is_set() else first).set()

        # Before listening: a SIGTERM right after "listening on" drains, never kills.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await self.start()
        gc.freeze()  # what start-up allocated is permanent: keep it out of every collection
        notify("READY=1")  # listening, and a SIGTERM from now on drains
        await first.wait()
        count = self.hub.stream_count()
        log.info("stopping: draining %d streams", count, extra={"streams": count})
        draining = loop.create_task(self.drain())
        forced = loop.create_task(second.wait())
        done, _ = await asyncio.wait(
            {draining, forced},
            timeout=self.settings.shutdown_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        forced.cancel()
        if draining not in done:
            log.warning("stopping now: %s", "second signal" if second.is_set() else "timeout")
            draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await draining
            for sub in self.hub.subscribers():
                self.streams.lifecycle.close(sub, abort=True)
        else:
            draining.result()
        log.info("stopped")


def run(settings: Settings) -> None:
    """Run the service until SIGINT/SIGTERM, on uvloop when available."""
    # Fewer, later collections: with tens of thousands of long-lived connection objects
    # the default thresholds make frequent passes over all of them, which shows in p99.
    gc.set_threshold(GC_THRESHOLD_0, 20, 100)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(_main(settings))
    else:
        uvloop.run(_main(settings))


async def _main(settings: Settings) -> None:
    service = Service(settings)
    await service.run_until_signalled()
