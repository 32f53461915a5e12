"""Regressions: a lost pub/sub link never leaves the service deaf, and /readyz tells the truth.

Real Redis servers of each test's own (frozen with SIGSTOP, protected by a password,
or reached through a proxy that cuts, freezes or black-holes), real sockets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis

from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.faults.test_broker_faults import readiness
from tests.support.redis_server import RedisServer
from tests.support.sse_client import SseClient, status
from tests.support.tcp_proxy import TcpProxy

RECOVERY_SECONDS = 10.0


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A Redis of this test's own, which it may kill, freeze and restart."""
    server = RedisServer()
    server.start()
    yield server
    with contextlib.suppress(ProcessLookupError, RuntimeError):
        os.kill(server.pid, signal.SIGCONT)  # never leave a stopped server behind
    server.close()


def settings_for(url: str, **overrides: object) -> Settings:
    return Settings(
        port=0, redis_url=url, broker_timeout=0.5, broker_ping_interval=0.2, keepalive=0.3
    ).replace(**overrides)


@pytest.fixture
async def make_redis_service() -> AsyncIterator[Callable[..., Awaitable[Service]]]:
    """Start services on a given Redis URL; stop them after the test."""
    started: list[Service] = []

    async def make(url: str, **overrides: object) -> Service:
        service = Service(settings_for(url, **overrides))
        await service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        await service.stop()


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """The Redis process stopped (SIGSTOP): sockets stay open, nothing answers."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        outcome = check()
        if outcome if isinstance(outcome, bool) else await outcome:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


async def wait_readiness(service: Service, want: int, timeout: float = RECOVERY_SECONDS) -> None:
    async def answers() -> bool:
        return await readiness(service) == want

    await eventually(answers, f"/readyz answering {want}", timeout)


async def readiness_over(service: Service, seconds: float) -> set[int]:
    """Every status /readyz answered while polled for ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    seen = set()
    while loop.time() < deadline:
        seen.add(await readiness(service))
        await asyncio.sleep(0.02)
    return seen


async def first_event(port: int, user: str) -> tuple[SseClient, str | None]:
    client = await SseClient.open(port, f"user={user}")
    event = await client.next_event()
    return client, None if event is None else event.data


async def probe_receives(service: Service, server: RedisServer, user: str = "probe") -> None:
    """A new stream opens (retrying `error`, as EventSource would) and gets a publish."""
    plain = redis.Redis(port=server.port, password=server.password)
    plain.sadd(f"user:{user}:channels", f"room:{user}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_SECONDS
    while True:
        client, data = await first_event(service.port, user)
        if data == status("ok"):
            break
        await client.close()
        assert loop.time() < deadline, f"a new stream still gets {data!r}"
        await asyncio.sleep(0.05)
    plain.publish(f"room:{user}", "probe message")
    assert (await client.next_message()).data == "probe message"
    await client.close()
    plain.close()


# 1. Deafness --------------------------------------------------------------------


async def test_pubsub_kill_during_connect_churn_never_leaves_the_service_deaf(
    own_redis: RedisServer, make_redis_service: Callable[..., Awaitable[Service]]
) -> None:
    """The pub/sub link is killed while clients come and go: /readyz and streams come back."""
    service = await make_redis_service(own_redis.url)
    plain = redis.Redis(port=own_redis.port)
    churners = 8
    for index in range(churners):
        plain.sadd(f"user:c{index}:channels", f"room:c{index}")  # a channel of its own
    stop = asyncio.Event()
    outcomes: collections.Counter[str] = collections.Counter()

    async def churn(index: int) -> None:
        while not stop.is_set():
            try:
                client, data = await first_event(service.port, f"c{index}")
                outcomes[data or "closed without a status"] += 1
                await client.close()
                await asyncio.sleep(random.uniform(0, 0.005))  # out of step with the others
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1

    tasks = [asyncio.create_task(churn(index)) for index in range(churners)]
    try:
        for _ in range(6):
            await wait_readiness(service, 200)
            settled = sum(outcomes.values())

            def progressed(settled: int = settled) -> bool:
                return sum(outcomes.values()) > settled + 20

            await eventually(progressed, "connect churn making progress", RECOVERY_SECONDS)
            # From a thread, at a random moment, until it hits a subscribed link: the
            # churners' handshakes are then in every phase, some still connecting.
            killed = 0
            for _ in range(500):
                await asyncio.sleep(random.uniform(0, 0.01))
                killed = await asyncio.to_thread(plain.client_kill_filter, _type="pubsub")
                if killed:
                    break
            assert killed >= 1, "the pub/sub link never had a subscription to kill"
        await wait_readiness(service, 200)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await probe_receives(service, own_redis)
    assert outcomes[status("ok")] > 0


async def test_handshake_losing_its_pubsub_link_gets_a_head_and_error(
    own_redis: RedisServer, make_redis_service: Callable[..., Awaitable[Service]]
) -> None:
    """A stream waiting for its subscription when the link drops gets 200 + `error` + retry."""
    proxy = TcpProxy(own_redis.port)
    await proxy.start()
    try:
        # A long broker timeout: the link drop, not a deadline, ends the handshake.
        service = await make_redis_service(proxy.url, broker_timeout=5.0)
        plain = redis.Redis(port=own_redis.port)
        plain.sadd("user:anchor:channels", "room:anchor")
        plain.sadd("user:1:channels", "room:fresh")
        anchor = await SseClient.open(service.port, "user=anchor")
        assert (await anchor.expect()).data == status("ok")
        [pubsub] = plain.client_list(_type="pubsub")
        link = proxy.link(int(pubsub["addr"].rsplit(":", 1)[1]))
        link.freeze(to_redis=False)  # SUBSCRIBE reaches Redis; its confirmation is held
        opening = asyncio.create_task(SseClient.open(service.port, "user=1", timeout=8.0))

        await eventually(
            lambda: plain.pubsub_numsub("room:fresh") == [(b"room:fresh", 1)],
            "the handshake subscribing room:fresh",
            5.0,
        )
        link.cut()
        try:
            client = await opening
        except TimeoutError:
            raise AssertionError("the handshake got no HTTP head after the link dropped") from None
        assert client.status_code == 200
        events = [e for e in await client.until_closed() if not e.is_noop]
        assert [e.data for e in events] == [status("error")]
        assert events[0].retry is not None
        assert events[0].id  # a closing status still carries an id
        await wait_readiness(service, 200)
        await probe_receives(service, own_redis)
    finally:
        await proxy.close()


async def test_a_reset_stream_gets_what_was_published_while_it_subscribed(
    own_redis: RedisServer, make_redis_service: Callable[..., Awaitable[Service]]
) -> None:
    """An id from a wiped Redis gets `reset`, then every message after the new position."""
    proxy = TcpProxy(own_redis.port)
    await proxy.start()
    try:
        service = await make_redis_service(proxy.url, broker_timeout=5.0)
        plain = redis.Redis(port=own_redis.port)
        plain.sadd("user:anchor:channels", "room:anchor")
        plain.sadd("user:1:channels", "room:fresh")
        anchor = await SseClient.open(service.port, "user=anchor")
        assert (await anchor.expect()).data == status("ok")
        [pubsub] = plain.client_list(_type="pubsub")
        link = proxy.link(int(pubsub["addr"].rsplit(":", 1)[1]))
        link.freeze(to_client=False)  # the stream's SUBSCRIBE waits in the proxy
        opening = asyncio.create_task(
            SseClient.open(service.port, "user=1", headers={"Last-Event-ID": "zzzz-7-1"})
        )
        await eventually(lambda: service.hub.count_of("1") == 1, "the handshake subscribing", 5.0)
        published = await service.broker.publish("room:fresh", b"while subscribing")
        link.thaw()
        client = await opening
        assert (await client.expect()).data == status("ok")
        assert (await client.expect()).data == status("reset")
        message = await client.next_message()
        assert (message.data, message.id) == ("while subscribing", published.encode().decode())
    finally:
        await proxy.close()


# 6. Readiness ---------------------------------------------------------------------


async def test_frozen_redis_is_not_ready_until_it_continues(
    own_redis: RedisServer, make_redis_service: Callable[..., Awaitable[Service]]
) -> None:
    """Redis stopped (SIGSTOP): /readyz turns 503 and stays so; after SIGCONT, 200 and delivery."""
    service = await make_redis_service(own_redis.url)
    await wait_readiness(service, 200)
    with frozen(own_redis):
        await wait_readiness(service, 503, timeout=5.0)
        seen = await readiness_over(service, 3.0)
        assert seen == {503}, f"/readyz answered {seen} while Redis was frozen"
    await wait_readiness(service, 200)
    await probe_receives(service, own_redis)


async def test_service_started_against_frozen_redis_is_not_ready(
    own_redis: RedisServer, make_redis_service: Callable[..., Awaitable[Service]]
) -> None:
    """A service started while Redis is stopped answers 503 until Redis continues, then works."""
    with frozen(own_redis):
        service = await make_redis_service(own_redis.url)
        seen = await readiness_over(service, 3.0)
        assert seen == {503}, f"/readyz answered {seen} while Redis was frozen"
    await wait_readiness(service, 200)
    await probe_receives(service, own_redis)


async def test_wrong_redis_password_is_not_ready_backs_off_and_leaks_no_socket(
    make_redis_service: Callable[..., Awaitable[Service]],
) -> None:
    """With a wrong password: /readyz 503, few reconnects, no connection left open per refusal."""
    server = RedisServer(password="the-right-password")
    server.start()
    try:
        admin = redis.Redis(port=server.port, password=server.password)
        mine = admin.client_id()

        def service_connections() -> int:
            return sum(1 for client in admin.client_list() if int(client["id"]) != mine)

        def received() -> int:
            return int(admin.info("stats")["total_connections_received"])

        before = received()
        service = await make_redis_service(f"redis://:a-wrong-password@127.0.0.1:{server.port}/0")
        seen = await readiness_over(service, 3.0)
        opened = received() - before
        peak = 0
        for _ in range(12):  # streams that each need the command connection, refused each time
            client, data = await first_event(service.port, "1")
            assert data == status("error")
            await client.close()
            peak = max(peak, service_connections())
        await asyncio.sleep(0.2)  # Redis notices closed sockets on its next loop turn
        left = service_connections()
        # Capped exponential backoff from 0.1 s: about six attempts in 3 s, not one per 0.1 s.
        assert (seen, opened <= 12, left <= 2) == ({503}, True, True), (
            f"/readyz answered {seen}; {opened} connections to Redis in about 3 s; "
            f"{left} connections of the service stay open after 12 refused streams (peak {peak})"
        )
        admin.close()
    finally:
        server.close()


async def test_black_holed_redis_is_not_ready_and_recovers_on_new_connections(
    own_redis: RedisServer, make_redis_service: Callable[..., Awaitable[Service]]
) -> None:
    """Everything to Redis black-holed: /readyz 503 throughout; once new links flow, it heals."""
    proxy = TcpProxy(own_redis.port)
    await proxy.start()
    try:
        service = await make_redis_service(proxy.url)
        redis.Redis(port=own_redis.port).sadd("user:1:channels", "room:1")
        client = await SseClient.open(service.port, "user=1")
        assert (await client.expect()).data == status("ok")
        proxy.blackhole()
        events = [e.data for e in await client.until_closed() if not e.is_noop]
        assert events == [status("error")]
        await wait_readiness(service, 503, timeout=5.0)
        seen = await readiness_over(service, 3.0)
        assert seen == {503}, f"/readyz answered {seen} while Redis was unreachable"
        proxy.restore()
        await wait_readiness(service, 200)
        await probe_receives(service, own_redis)
    finally:
        await proxy.close()
