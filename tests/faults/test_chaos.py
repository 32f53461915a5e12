"""Chaos: clients come and go while Redis is killed, restarted, frozen and black-holed.

One service reaches a Redis of the test's own through a TCP proxy. Four clients
connect in a loop and resume from the last id they hold, as EventSource does; a
publisher sends numbered messages steadily. Faults follow one another until the
time budget (``SISYPHUS_CHAOS_SECONDS``, default 120) is spent. What a user must see:
every connect gets an HTTP head and a status, the service is ready again after each
fault (and not ready while Redis is frozen or unreachable), and a client that comes
back gets every message published while it was away, once, unless Redis lost its
history (then `reset`, and tracking starts over).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis

from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.faults.test_broker_faults import readiness
from tests.support.redis_server import RedisServer
from tests.support.sse_client import Event, SseClient, status
from tests.support.tcp_proxy import TcpProxy

CHAOS_SECONDS = float(os.environ.get("SISYPHUS_CHAOS_SECONDS", "120"))
RECOVERY_SECONDS = 10.0
HANG_SECONDS = 10.0  # no head or no first status within this: a hang
CLIENTS = 4
CHANNEL = "room:chaos"
OK, ERROR, RESET = status("ok"), status("error"), status("reset")


def parse_id(event_id: str | None) -> tuple[str, int]:
    assert event_id is not None
    epoch, seq, _ = event_id.split("-")
    return epoch, int(seq)


@dataclass
class Segment:
    """What one client received within one history (from a start position on)."""

    epoch: str
    start: int
    received: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Tracker:
    """One client's held id, what it received, and how each connect attempt ended."""

    user: str
    last_id: str | None = None
    segments: list[Segment] = field(default_factory=list)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    # Set when `ok` answered a resume with another position: a `reset` must follow.
    reset_from: str | None = None

    def start_segment(self, event_id: str | None) -> None:
        epoch, seq = parse_id(event_id)
        self.segments.append(Segment(epoch, seq))

    def on_event(self, event: Event) -> None:
        """Apply one event of a live stream, as a browser would (it keeps every id)."""
        held, reset_from, self.reset_from = self.last_id, self.reset_from, None
        if reset_from is not None and event.data != RESET:
            self.problems.append(f"`ok` moved the id from {reset_from} without `reset`")
        if event.data == RESET:
            if reset_from is None or parse_id(reset_from)[0] == parse_id(event.id)[0]:
                self.problems.append(f"`reset` at {event.id} though {reset_from}'s history is kept")
            self.start_segment(event.id)
        elif event.data.startswith("m"):
            epoch, seq = parse_id(event.id)
            segment = self.segments[-1]
            if epoch != segment.epoch:
                self.problems.append(f"{event.data} at {event.id} from another history")
            segment.received.append((seq, event.data))
        elif event.data in (ERROR, status("failure"), status("disconnected")):
            if held is not None and parse_id(event.id) != parse_id(held):
                self.problems.append(f"closing status moved the id from {held} to {event.id}")
        elif not event.is_noop:
            self.problems.append(f"unexpected event {event}")
        self.last_id = event.id


async def run_client(tracker: Tracker, port: int, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        sent = tracker.last_id
        headers = {"Last-Event-ID": sent} if sent else {}
        try:
            client = await SseClient.open(
                port, f"user={tracker.user}", headers=headers, timeout=HANG_SECONDS
            )
        except TimeoutError:
            tracker.outcomes["hang before the head"] += 1
            continue
        except (OSError, asyncio.IncompleteReadError):
            tracker.outcomes["closed before the head"] += 1
            await asyncio.sleep(0.1)
            continue
        try:
            first = await client.next_event(HANG_SECONDS)
        except TimeoutError:
            first = None
            tracker.outcomes["hang before a status"] += 1
        except (OSError, UnicodeDecodeError):
            first = None
        if first is None:
            tracker.outcomes["closed without a status"] += 1
        elif first.data == OK:
            tracker.outcomes["ok"] += 1
            if sent is not None and first.id != sent:
                tracker.reset_from = sent
            elif not tracker.segments or parse_id(first.id)[0] != tracker.segments[-1].epoch:
                tracker.start_segment(first.id)
            tracker.last_id = first.id
            await read_live(tracker, client, loop.time() + random.uniform(0.3, 3.0))
        elif first.data == ERROR:
            tracker.outcomes["error"] += 1
            if first.retry is None:
                tracker.problems.append("`error` without a retry hint")
            if sent is not None and parse_id(first.id) != parse_id(sent):
                tracker.problems.append(f"refusal moved the id from {sent} to {first.id}")
            tracker.last_id = first.id
        else:
            tracker.outcomes[f"first event {first.data!r}"] += 1
        await client.close()
        await asyncio.sleep(random.uniform(0.02, 0.3))


async def read_live(tracker: Tracker, client: SseClient, leave_at: float) -> None:
    """Read events until the server ends the stream or the client leaves at ``leave_at``."""
    loop = asyncio.get_running_loop()
    while (remaining := leave_at - loop.time()) > 0:
        try:
            event = await client.next_event(remaining)
        except TimeoutError:
            return  # the client leaves; it resumes from its last id
        except OSError:
            event = None
        if event is None:
            tracker.outcomes["live then closed without a status"] += 1
            return
        tracker.on_event(event)
        if event.data == ERROR:
            tracker.outcomes["live then error"] += 1
            return


@dataclass
class Chaos:
    """The publisher's record and the problems seen by the fault driver."""

    succeeded: dict[str, tuple[str, int]] = field(default_factory=dict)
    failed: int = 0
    problems: list[str] = field(default_factory=list)
    deaf: bool = False  # the service did not recover from a fault: more faults tell nothing


async def run_publisher(service: Service, chaos: Chaos, stop: asyncio.Event) -> None:
    number = 0
    while not stop.is_set():
        number += 1
        payload = f"m{number}"
        try:
            event_id = await service.broker.publish(CHANNEL, payload.encode())
        except Exception:  # an outage: this message's fate is unknown
            chaos.failed += 1
        else:
            chaos.succeeded[payload] = (event_id.epoch, event_id.seqs[0])
        await asyncio.sleep(0.05)


def seed(server: RedisServer) -> None:
    """The rights the application keeps in Redis (written again after Redis lost them)."""
    client = redis.Redis(port=server.port)
    for index in range(CLIENTS):
        client.sadd(f"user:c{index}:channels", CHANNEL)
    client.sadd("user:probe:channels", "room:probe")
    client.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def probe(service: Service) -> None:
    """A new stream opens (retrying `error`, as EventSource would) and receives a publish."""
    while True:
        client = await SseClient.open(service.port, "user=probe", timeout=HANG_SECONDS)
        first = await client.next_event(HANG_SECONDS)
        if first is not None and first.data == OK:
            break
        await client.close()
        await asyncio.sleep(0.1)
    while True:
        try:
            await service.broker.publish("room:probe", b"probe")
            break
        except Exception:  # not reachable yet: try again
            await asyncio.sleep(0.1)
    while (await client.next_message()).data != "probe":
        pass
    await client.close()


async def check_recovered(service: Service, chaos: Chaos, fault: str) -> None:
    async def ready() -> bool:
        return await readiness(service) == 200

    if not await eventually(ready, RECOVERY_SECONDS):
        chaos.problems.append(f"after {fault}: /readyz not 200 within {RECOVERY_SECONDS} s")
        chaos.deaf = True
        return
    try:
        await asyncio.wait_for(probe(service), RECOVERY_SECONDS)
    except (TimeoutError, OSError, EOFError, AssertionError) as exc:
        chaos.problems.append(f"after {fault}: a new stream got no publish ({exc!r})")
        chaos.deaf = True


async def check_unready(service: Service, chaos: Chaos, fault: str) -> None:
    """/readyz turns 503 within the recovery bound and stays 503 for two seconds."""

    async def unready() -> bool:
        return await readiness(service) == 503

    if not await eventually(unready, RECOVERY_SECONDS):
        chaos.problems.append(f"during {fault}: /readyz never 503")
        return
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.0
    seen = set()
    while loop.time() < until:
        seen.add(await readiness(service))
        await asyncio.sleep(0.02)
    if seen != {503}:
        chaos.problems.append(f"during {fault}: /readyz answered {sorted(seen)}")


@pytest.fixture
async def chaos_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    with contextlib.suppress(ProcessLookupError, RuntimeError):
        os.kill(server.pid, signal.SIGCONT)
    server.close()


def verify(tracker: Tracker, chaos: Chaos) -> list[str]:
    """Per history segment: ids only grow, nothing twice, no succeeded publish missing."""
    problems = [f"{tracker.user}: {p}" for p in tracker.problems]
    by_epoch: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for payload, (epoch, seq) in chaos.succeeded.items():
        by_epoch[epoch].append((seq, payload))
    for segment in tracker.segments:
        seqs = [seq for seq, _ in segment.received]
        if seqs != sorted(set(seqs)):
            problems.append(f"{tracker.user}: repeated or backwards ids in {segment.received}")
        if not seqs:
            continue
        got = {payload for _, payload in segment.received}
        missing = [
            (seq, payload)
            for seq, payload in sorted(by_epoch[segment.epoch])
            if segment.start < seq <= seqs[-1] and payload not in got
        ]
        if missing:
            problems.append(
                f"{tracker.user}: missed {missing} in history {segment.epoch} from "
                f"{segment.start}; received seqs {seqs}"
            )
    return problems


@pytest.mark.chaos
@pytest.mark.timeout(CHAOS_SECONDS + 180)
async def test_chaos_every_client_gets_a_status_and_every_message_once(
    chaos_redis: RedisServer,
) -> None:
    """Under repeated Redis faults, clients always get a status and, resuming, miss nothing."""
    server = chaos_redis
    seed(server)
    proxy = TcpProxy(server.port)
    await proxy.start()
    settings = Settings(
        port=0, redis_url=proxy.url, broker_timeout=0.5, broker_ping_interval=0.2, keepalive=0.3
    )
    service = Service(settings)
    await service.start()
    chaos = Chaos()
    trackers = [Tracker(f"c{index}") for index in range(CLIENTS)]
    stop_clients, stop_publisher = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(run_client(t, service.port, stop_clients)) for t in trackers]
    publisher = asyncio.create_task(run_publisher(service, chaos, stop_publisher))
    loop = asyncio.get_running_loop()
    ends_at = loop.time() + CHAOS_SECONDS
    plain = redis.Redis(port=server.port)
    try:
        await check_recovered(service, chaos, "start")
        while True:
            for _ in range(3):
                await asyncio.sleep(random.uniform(1.0, 2.0))
                await asyncio.to_thread(plain.client_kill_filter, _type="pubsub")
                await check_recovered(service, chaos, "CLIENT KILL TYPE pubsub")
                if chaos.deaf:
                    break
            if chaos.deaf:
                break
            await asyncio.sleep(random.uniform(1.0, 2.0))
            proxy.freeze()  # nothing reaches the new Redis before its rights are written
            server.kill()
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(seed, server)
            proxy.thaw()
            await check_recovered(service, chaos, "kill -9 and restart")
            if chaos.deaf:
                break
            await asyncio.sleep(random.uniform(1.0, 2.0))
            os.kill(server.pid, signal.SIGSTOP)
            try:
                await check_unready(service, chaos, "SIGSTOP")
            finally:
                os.kill(server.pid, signal.SIGCONT)
            await check_recovered(service, chaos, "SIGCONT")
            if chaos.deaf:
                break
            await asyncio.sleep(random.uniform(1.0, 2.0))
            proxy.blackhole()
            try:
                await check_unready(service, chaos, "black hole")
            finally:
                proxy.restore()
            await check_recovered(service, chaos, "black hole restored")
            if chaos.deaf or loop.time() >= ends_at:
                break
        await asyncio.sleep(1.0)
        stop_publisher.set()
        await publisher
        # The publisher is sequential: the last success is the newest (seqs restart per history).
        last_epoch, last_seq = list(chaos.succeeded.values())[-1]

        async def caught_up() -> bool:
            return all(
                t.segments
                and t.segments[-1].epoch == last_epoch
                and any(seq >= last_seq for seq, _ in t.segments[-1].received)
                for t in trackers
            )

        if not await eventually(caught_up, 3 * RECOVERY_SECONDS):
            chaos.problems.append(f"clients never got the last message {last_epoch}-{last_seq}")
    finally:
        stop_publisher.set()
        stop_clients.set()
        await asyncio.gather(publisher, *tasks, return_exceptions=True)
        plain.close()
        await service.stop()
        await proxy.close()
    outcomes: collections.Counter[str] = collections.Counter()
    problems = list(chaos.problems)
    for tracker in trackers:
        outcomes.update(tracker.outcomes)
        problems += verify(tracker, chaos)
    bad = {k: v for k, v in outcomes.items() if k not in ("ok", "error", "live then error")}
    summary = f"outcomes {dict(outcomes)}; {len(chaos.succeeded)} published, {chaos.failed} failed"
    assert not bad and not problems, f"{summary}; bad endings {bad}; problems {problems[:20]}"
    assert outcomes["ok"] >= 20, summary
