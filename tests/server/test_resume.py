"""Resume without loss: history, Last-Event-ID, reset, and the rights-refresh race."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import redis

from sisyphus.client import RedisPublisher, connect
from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory, grant, publish, revoke
from tests.server.test_api import raw_request
from tests.support.sse_client import Event, SseClient, status

RESET = status("reset")


async def connect_ok(service: Service, user: str, last_id: str | None = None) -> SseClient:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    client = await SseClient.open(service.port, f"user={user}", headers=headers)
    assert (await client.expect()).data == status("ok")
    return client


async def messages(client: SseClient, count: int) -> list[Event]:
    return [await client.next_message() for _ in range(count)]


async def test_reconnect_gets_exactly_the_missed_messages_in_order(service: Service) -> None:
    """Messages published on several channels while away arrive once each, in order."""
    await grant(service.port, "1", "room:1", "room:2", "room:3")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:1", "before")
    last = (await client.next_message()).id
    await client.close()
    sent = [(f"room:{1 + i % 3}", f"missed {i}") for i in range(12)]
    for channel, text in sent:
        await publish(service.port, channel, text)
    client = await connect_ok(service, "1", last)
    got = await messages(client, 12)
    assert [e.data for e in got] == [text for _, text in sent]
    seqs = [int(e.id.split("-")[1]) for e in got]  # type: ignore[union-attr]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 12
    await publish(service.port, "room:2", "live again")
    assert (await client.next_message()).data == "live again"
    noop = await client.next_event()
    assert noop is not None
    assert noop.is_noop  # nothing more: no duplicates after the replay


async def test_last_event_id_query_parameter_for_polyfills(service: Service) -> None:
    """`lastEventId` in the query resumes like the header does."""
    await grant(service.port, "1", "room:1")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:1", "a")
    last = (await client.next_message()).id
    await client.close()
    await publish(service.port, "room:1", "b")
    client = await SseClient.open(service.port, f"user=1&lastEventId={last}")
    assert (await client.expect()).data == status("ok")
    assert (await client.next_message()).data == "b"


def publish_in_thread(port: int, channel: str, count: int, stop: threading.Event) -> list[str]:
    """Publish numbered messages over the HTTP API from a thread, as fast as it can."""
    sent: list[str] = []
    for i in range(count):
        if stop.is_set():
            break
        text = f"m{i}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/publish",
            data=json.dumps({"channel": channel, "data": text}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200
        sent.append(text)
    return sent


async def test_no_gap_and_no_duplicate_at_the_seam(service: Service) -> None:
    """While messages flow, a client reconnecting again and again receives each exactly once."""
    await grant(service.port, "1", "room:1")
    client = await connect_ok(service, "1")
    stop = threading.Event()
    publisher = asyncio.ensure_future(
        asyncio.to_thread(publish_in_thread, service.port, "room:1", 300, stop)
    )
    received: list[str] = []
    last_id: str | None = None

    def all_received() -> bool:
        return publisher.done() and len(received) >= len(publisher.result())

    try:
        while not all_received():
            for _ in range(15):
                try:
                    # Bounded: the last message may have arrived before the publisher
                    # thread returned, and keep-alives alone never end next_message.
                    event = await asyncio.wait_for(client.next_message(), 0.5)
                except TimeoutError:
                    break
                received.append(event.data)
                last_id = event.id
            if all_received():
                break
            await client.close()
            client = await connect_ok(service, "1", last_id)
    finally:
        stop.set()
    assert received == await publisher


async def test_position_older_than_retention_gets_reset(make_service: ServiceFactory) -> None:
    """Missing more than a channel retains gives `reset`, then the live stream goes on.

    Redis trims streams approximately (whole nodes of 100 entries), so 250 are published.
    """
    service = await make_service(history_size=5, replay_max_messages=10_000)
    await grant(service.port, "1", "room:1")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:1", "seen")
    last = (await client.next_message()).id
    await client.close()
    for i in range(250):
        await service.broker.publish("room:1", f"lost {i}".encode())
    client = await SseClient.open(
        service.port, "user=1&format=json", headers={"Last-Event-ID": last}
    )
    assert json.loads((await client.expect()).data) == {"status": "ok"}
    reset = await client.expect()
    assert reset.event == "status"
    assert json.loads(reset.data) == {"status": "reset", "reason": "retention"}
    await publish(service.port, "room:1", "live")
    assert json.loads((await client.next_message()).data) == {"channel": "room:1", "data": "live"}


async def test_too_many_missed_messages_for_one_replay_gets_reset(
    make_service: ServiceFactory,
) -> None:
    """More missed messages than replay_max_messages gives `reset` instead of a partial replay."""
    service = await make_service(replay_max_messages=3)
    await grant(service.port, "1", "room:1")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:1", "seen")
    last = (await client.next_message()).id
    await client.close()
    for i in range(4):
        await publish(service.port, "room:1", f"m{i}")
    client = await connect_ok(service, "1", last)
    assert (await client.expect()).data == RESET


def age_the_timeline(service: Service, clock: dict[str, float], seconds: float) -> None:
    """Make everything published so far `seconds` older, as the broker records it."""
    clock["now"] += seconds  # the embedded broker's clock
    if service.settings.redis_url:
        client = redis.Redis.from_url(service.settings.redis_url)
        for member, score in client.zrange("sisyphus:timeline", 0, -1, withscores=True):
            client.zadd("sisyphus:timeline", {member: score - seconds})
        client.close()


async def test_foreign_or_expired_positions_get_reset(make_service: ServiceFactory) -> None:
    """An id from another epoch, or one that missed messages older than retention: `reset`."""
    clock = {"now": time.time()}
    service = await make_service(history_max_age=60, wall_clock=lambda: clock["now"])
    await grant(service.port, "1", "room:1")
    client = await connect_ok(service, "1", "zzzz-1-2000000000")
    assert (await client.expect()).data == RESET
    await client.close()
    client = await connect_ok(service, "1")
    await publish(service.port, "room:1", "seen")
    last = (await client.next_message()).id
    await client.close()
    await publish(service.port, "room:1", "missed, then aged")
    age_the_timeline(service, clock, 61)
    client = await connect_ok(service, "1", last)
    assert (await client.expect()).data == RESET
    await publish(service.port, "room:1", "live")
    assert (await client.next_message()).data == "live"


async def test_retention_is_decided_from_the_brokers_record_not_the_ids_time(
    make_service: ServiceFactory,
) -> None:
    """An old position with today's time written into it still gets `reset`."""
    clock = {"now": time.time()}
    service = await make_service(history_max_age=60, wall_clock=lambda: clock["now"])
    await grant(service.port, "1", "room:1")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:1", "seen")
    last = (await client.next_message()).id
    await client.close()
    await publish(service.port, "room:1", "old")
    age_the_timeline(service, clock, 61)
    await publish(service.port, "room:1", "recent")
    epoch, seq, _ = last.split("-")
    forged = f"{epoch}-{seq}-{int(clock['now'])}"
    client = await connect_ok(service, "1", forged)
    assert (await client.expect()).data == RESET
    await client.close()
    # A position whose next message is within retention replays it, whatever its time says.
    within = f"{epoch}-{int(seq) + 1}-1"
    client = await connect_ok(service, "1", within)
    assert (await client.next_message()).data == "recent"


async def test_position_from_the_helper_closes_the_gap_before_the_first_connect(
    service: Service, broker_kind: str
) -> None:
    """A page rendered with position() resumes from it: what was published meanwhile arrives."""
    await grant(service.port, "1", "room:1")
    publisher = (
        connect(redis_url=service.settings.redis_url)
        if broker_kind == "redis"
        else connect(url=f"http://127.0.0.1:{service.port}")
    )
    page_position = await asyncio.to_thread(publisher.position)
    first_id = await asyncio.to_thread(publisher.publish, "room:1", "between render and connect")
    assert first_id.split("-")[0] == page_position.split("-")[0]
    client = await connect_ok(service, "1", page_position)
    event = await client.next_message()
    assert event.data == "between render and connect"
    assert event.id == first_id


def pipelined(*calls: tuple[str, dict[str, object]]) -> bytes:
    """API requests back to back on one connection: the service runs them without a pause."""
    data = b""
    for index, (route, body) in enumerate(calls):
        encoded = json.dumps(body).encode()
        close = "Connection: close\r\n" if index == len(calls) - 1 else ""
        data += (
            f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(encoded)}\r\n{close}\r\n"
        ).encode() + encoded
    return data


async def test_rights_refresh_race_never_loses_the_first_message(service: Service) -> None:
    """A message published right after a grant, on the new channel, always arrives.

    The grant and the publish travel pipelined on one connection, so the publish
    happens while the service is still setting up the new subscription.
    """
    await grant(service.port, "1", "room:0")
    client = await connect_ok(service, "1")
    for i in range(1, 21):
        answer = await raw_request(
            service.port,
            pipelined(
                ("/api/grant", {"user": "1", "channels": [f"room:{i}"]}),
                ("/api/publish", {"channel": f"room:{i}", "data": f"first on {i}"}),
            ),
        )
        assert answer.count(b"HTTP/1.1 200 OK") == 2
        events = [await client.next_message() for _ in range(2)]
        assert '"granted"' in events[0].data
        assert events[1].data == f"first on {i}"
        await revoke(service.port, "1", f"room:{i}")
        assert '"revoked"' in (await client.next_message()).data


async def test_plain_publish_ids_never_move_the_position_wrongly(
    service: Service, broker_kind: str, redis_server: object
) -> None:
    """After a plain PUBLISH, resuming from its id neither repeats nor skips messages."""
    await grant(service.port, "1", "room:1")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:1", "sequenced 1")
    first = await client.next_message()
    if broker_kind == "redis":
        assert service.settings.redis_url is not None
        redis.Redis.from_url(service.settings.redis_url).publish("room:1", "plain")
        plain = await client.next_message()
        assert plain.data == "plain"
        assert plain.id == first.id  # the current position, not a new one
        last = plain.id
    else:
        last = first.id
    await client.close()
    await publish(service.port, "room:1", "sequenced 2")
    client = await connect_ok(service, "1", last)
    assert (await client.next_message()).data == "sequenced 2"
    noop = await client.next_event()
    assert noop is not None
    assert noop.is_noop


async def test_history_survives_a_restart_of_the_service_on_redis(
    redis_server: object, redis_client: redis.Redis
) -> None:
    """On Redis, a client resumes across a restart of Sisyphus: the history stays in Redis."""
    url = redis_server.url  # type: ignore[attr-defined]
    redis_client.sadd("user:1:channels", "room:1")
    first = Service(Settings(port=0, redis_url=url, keepalive=0.3))
    await first.start()
    client = await connect_ok(first, "1")
    helper = RedisPublisher(url)
    await asyncio.to_thread(helper.publish, "room:1", "before the restart")
    last = (await client.next_message()).id
    await client.close()
    await first.stop()
    for i in range(3):
        await asyncio.to_thread(helper.publish, "room:1", f"while down {i}")
    second = Service(Settings(port=0, redis_url=url, keepalive=0.3))
    await second.start()
    try:
        client = await connect_ok(second, "1", last)
        assert [e.data for e in await messages(client, 3)] == [f"while down {i}" for i in range(3)]
        await client.close()
    finally:
        await second.stop()
        helper.close()
