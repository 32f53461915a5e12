"""Regressions in a stream's life: refusal ids, id order after grants, tabs, forged envelopes,
what closed streams leave behind, and the token leeway. Real sockets; real Redis where named."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import urllib.request

import pytest
import redis

from sisyphus.brokers.lua import ENVELOPE_PREFIX, PUBLISH_SCRIPT, publish_call
from sisyphus.client import mint_token
from sisyphus.hub.subscriber import Subscriber
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory, api, grant
from tests.server.test_api import raw_request
from tests.server.test_resume import connect_ok, pipelined
from tests.support.metrics import samples
from tests.support.sse_client import SseClient, status

SECRET = "a-test-secret-that-is-long-enough-for-hs512-0123456789abcdefghij"


def seq_of(event_id: str | None) -> int:
    assert event_id is not None
    return int(event_id.split("-")[1])


async def publish_id(service: Service, channel: str, data: str) -> str:
    """Publish through the API; the id the message got."""
    code, body = await api(service.port, "/api/publish", {"channel": channel, "data": data})
    assert code == 200, body
    return str(body["id"])


def stream_gauge(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return int(samples(answer.read().decode())["sisyphus_streams"])


async def wait_streams(service: Service, count: int) -> None:
    """Poll /metrics until the process holds ``count`` streams."""
    for _ in range(500):
        if await asyncio.to_thread(stream_gauge, service.port) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the service never got to {count} streams")


# 2. A refusal repeats the client's own id ----------------------------------------------


async def test_refusal_past_the_user_limit_repeats_the_clients_id_and_resume_misses_nothing(
    make_service: ServiceFactory,
) -> None:
    """Refused past max_connections_per_user, a client keeps its own id and later misses nothing."""
    service = await make_service(max_connections_per_user=1)
    await grant(service.port, "1", "room:1")
    holder = await connect_ok(service, "1")  # the user's only allowed stream
    old = await publish_id(service, "room:1", "m1")
    await publish_id(service, "room:1", "m2")
    await publish_id(service, "room:1", "m3")
    refused = await SseClient.open(service.port, "user=1", headers={"Last-Event-ID": old})
    events = await refused.until_closed()
    assert [e.data for e in events] == [status("error")]
    assert events[0].id == old, f"the refusal moved the client from {old} to {events[0].id}"
    await holder.close()
    await wait_streams(service, 0)
    await publish_id(service, "room:1", "m4")
    resumed = await connect_ok(service, "1", events[0].id)
    assert [(await resumed.next_message()).data for _ in range(3)] == ["m2", "m3", "m4"]


async def test_refusal_of_an_expired_token_repeats_the_clients_id(
    make_service: ServiceFactory,
) -> None:
    """An expired token's `failure` carries the id the client sent; a fresh token resumes there."""
    service = await make_service(secret=SECRET)
    await grant(service.port, "1", "room:1")
    old = await publish_id(service, "room:1", "m1")
    await publish_id(service, "room:1", "m2")
    expired = mint_token(SECRET, "1", ttl=60, now=time.time() - 3600)
    refused = await SseClient.open(service.port, f"token={expired}", headers={"Last-Event-ID": old})
    events = await refused.until_closed()
    assert [e.data for e in events] == [status("failure")]
    assert events[0].id == old, f"the refusal moved the client from {old} to {events[0].id}"
    await publish_id(service, "room:1", "m3")
    fresh = mint_token(SECRET, "1", ttl=3600)
    client = await SseClient.open(
        service.port, f"token={fresh}", headers={"Last-Event-ID": events[0].id or ""}
    )
    assert (await client.expect()).data == status("ok")
    assert [(await client.next_message()).data for _ in range(2)] == ["m2", "m3"]


# 3. Ids never go backwards after a grant -----------------------------------------------


async def test_ids_never_go_backwards_when_a_grant_races_publishes(service: Service) -> None:
    """Grant, publish on the new channel, publish on an old one, pipelined: ids only grow."""
    await grant(service.port, "1", "room:old")
    client = await connect_ok(service, "1")
    seen: list[tuple[int, str]] = []
    for i in range(20):
        answer = await raw_request(
            service.port,
            pipelined(
                ("/api/grant", {"user": "1", "channels": [f"room:new{i}"]}),
                ("/api/publish", {"channel": f"room:new{i}", "data": f"new {i}"}),
                ("/api/publish", {"channel": "room:old", "data": f"old {i}"}),
            ),
        )
        assert answer.count(b"HTTP/1.1 200 OK") == 3
        events = [await client.next_message() for _ in range(3)]
        assert '"granted"' in events[0].data
        assert {e.data for e in events[1:]} == {f"new {i}", f"old {i}"}
        seen += [(seq_of(e.id), e.data) for e in events]
    assert seen == sorted(seen), f"ids went backwards: {seen}"


# A burst of messages on user:<id> -------------------------------------------------------


async def test_a_burst_on_the_users_own_channel_is_delivered_and_keeps_the_stream(
    service: Service,
) -> None:
    """Messages on user:<id> back to back (pipelined, so several arrive before the rights
    refresh runs) all arrive in order; the stream stays open and gets later messages."""
    await grant(service.port, "1", "room:1")
    client = await connect_ok(service, "1")
    for burst in range(5):
        texts = [f"personal {burst}.{n}" for n in range(6)]
        answer = await raw_request(
            service.port,
            pipelined(*(("/api/publish", {"channel": "user:1", "data": t}) for t in texts)),
        )
        assert answer.count(b"HTTP/1.1 200 OK") == len(texts)
        assert [(await client.next_message()).data for _ in texts] == texts
    await api(service.port, "/api/publish", {"channel": "room:1", "data": "after"})
    assert (await client.next_message()).data == "after"
    assert service.metrics.status_error == 0


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_a_plain_publish_burst_on_the_users_own_channel_keeps_the_stream(
    service: Service,
) -> None:
    """The seed's way: the application PUBLISHes many notices on user:<id> in one
    pipeline; every one arrives and the stream stays open."""
    assert service.settings.redis_url is not None
    plain = redis.Redis.from_url(service.settings.redis_url)
    plain.sadd("user:1:channels", "room:1")
    client = await connect_ok(service, "1")
    texts = [f"notice {n}" for n in range(20)]
    with plain.pipeline(transaction=False) as pipe:
        for text in texts:
            pipe.publish("user:1", text)
        pipe.publish("room:1", "after")
        pipe.execute()
    assert [(await client.next_message()).data for _ in texts] == texts
    assert (await client.next_message()).data == "after"
    assert service.metrics.status_error == 0


# Notices that arrive while the set is being read ----------------------------------------


async def _drain_events(client: SseClient, seconds: float) -> list[tuple[str | None, str]]:
    """(id, data) of every message (not keep-alive) that arrives within ``seconds``."""
    got: list[tuple[str | None, str]] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while (left := until - loop.time()) > 0:
        try:
            event = await client.next_event(left)
        except TimeoutError:
            break
        assert event is not None, f"the stream closed after {got}"
        if not event.is_noop:
            got.append((event.id, event.data))
    return got


async def test_nothing_published_after_a_revoke_notice_arrives_while_a_refresh_reads(
    service: Service,
) -> None:
    """A refresh still reading the set (for a grant) when a revoke's notice, a message on
    the revoked channel and another notice arrive: the message never reaches the stream."""
    for trial in range(20):
        user = f"leak{trial}"
        await grant(service.port, user, "room:base")
        client = await connect_ok(service, user)
        await grant(service.port, user, "room:secret")
        answer = await raw_request(
            service.port,
            pipelined(
                ("/api/revoke", {"user": user, "channels": ["room:secret"]}),
                ("/api/publish", {"channel": "room:secret", "data": "after the revoke"}),
                ("/api/publish", {"channel": f"user:{user}", "data": "hello"}),
            ),
        )
        assert answer.count(b"HTTP/1.1 200 OK") == 3
        got = [data for _, data in await _drain_events(client, 0.4)]
        assert "after the revoke" not in got, f"trial {trial}: {got}"
        assert got[-1] == "hello", got
        await client.close()


async def test_ids_stay_in_order_when_a_grant_arrives_while_a_refresh_reads(
    service: Service,
) -> None:
    """A notice, a message on a channel not yet granted, then its grant, pipelined: the
    stream's ids only grow, and a resume from any of them repeats nothing."""
    for trial in range(20):
        user = f"order{trial}"
        await grant(service.port, user, "room:base")
        client = await connect_ok(service, user)
        await grant(service.port, user, "room:a")  # its refresh may still be reading
        channel = f"room:c{trial}"
        answer = await raw_request(
            service.port,
            pipelined(
                ("/api/publish", {"channel": f"user:{user}", "data": "ping"}),
                ("/api/publish", {"channel": channel, "data": "pre"}),
                ("/api/grant", {"user": user, "channels": [channel]}),
            ),
        )
        assert answer.count(b"HTTP/1.1 200 OK") == 3
        got = await _drain_events(client, 0.4)
        seqs = [seq_of(event_id) for event_id, _ in got if event_id]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"trial {trial}: {got}"
        await client.close()


# 4. Two tabs of one user ----------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_both_tabs_get_the_first_message_on_a_granted_channel(service: Service) -> None:
    """Tab A open; C added to the set; tab B opens; notice, then first on C: both tabs get it."""
    assert service.settings.redis_url is not None
    plain = redis.Redis.from_url(service.settings.redis_url)
    plain.sadd("user:1:channels", "room:0")
    tab_a = await connect_ok(service, "1")
    plain.sadd("user:1:channels", "room:C")  # the application changes the set...
    tab_b = await connect_ok(service, "1")  # ...a second tab opens and reads the new set...
    # ...then the application sends the rights notice and, right behind it, the first
    # message on C, both through the sequenced publish script (pipelined, as a busy app).
    script = plain.register_script(PUBLISH_SCRIPT)
    with plain.pipeline(transaction=False) as pipe:
        for channel, payload in (("user:1", b'{"rights": "granted"}'), ("room:C", b"first on C")):
            keys, args = publish_call(channel, payload, 1000, 3600, "0", None)
            script(keys=keys, args=args, client=pipe)
        pipe.execute()
    for name, tab in (("A", tab_a), ("B", tab_b)):
        assert (await tab.next_message()).data == '{"rights": "granted"}'
        try:
            event = await asyncio.wait_for(tab.next_message(), 5.0)
        except TimeoutError:
            raise AssertionError(f"tab {name} never got the first message on C") from None
        assert event.data == "first on C", f"tab {name} got {event.data!r}"
    plain.close()


# 5. Forged envelopes ------------------------------------------------------------------


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_plain_publish_shaped_like_an_envelope_is_verbatim_and_sets_no_id(
    service: Service,
) -> None:
    """A plain PUBLISH that looks like Sisyphus's envelope arrives as sent and moves no id."""
    assert service.settings.redis_url is not None
    plain = redis.Redis.from_url(service.settings.redis_url)
    plain.sadd("user:1:channels", "room:1")
    client = await connect_ok(service, "1")
    real = await publish_id(service, "room:1", "real")
    assert (await client.next_message()).id == real
    epoch, seq = real.split("-")[0], seq_of(real)
    forged = ENVELOPE_PREFIX + f"{epoch} 999999 1700000000\nhello".encode()
    plain.publish("room:1", forged)
    event = await client.next_message()
    assert event.data == forged.decode()  # every byte, the line break as two data lines
    assert b"data: " + forged.replace(b"\n", b"\ndata: ") + b"\n" in client.raw
    assert event.id is not None and event.id.split("-")[0] == epoch
    assert seq_of(event.id) <= seq, f"a plain PUBLISH moved the id to {event.id}"
    noop = await client.expect()
    assert noop.is_noop and seq_of(noop.id) <= seq
    await client.close()
    after = await publish_id(service, "room:1", "after")
    resumed = await connect_ok(service, "1", event.id)
    follow = await resumed.next_message()  # no `reset`: the id was a real position
    assert (follow.data, follow.id) == ("after", after)
    plain.close()


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_malformed_envelope_never_breaks_other_streams(service: Service) -> None:
    """A plain PUBLISH with a broken envelope reaches its readers as sent; nobody gets `error`."""
    assert service.settings.redis_url is not None
    plain = redis.Redis.from_url(service.settings.redis_url)
    plain.sadd("user:1:channels", "room:1")
    plain.sadd("user:2:channels", "room:2")
    reader = await connect_ok(service, "1")
    other = await connect_ok(service, "2")
    plain.publish("room:1", ENVELOPE_PREFIX + b"ab\r 1 1\nx")
    assert (await reader.next_message()).data == "\x1es1 ab\n 1 1\nx"
    await publish_id(service, "room:2", "for the other stream")
    assert (await other.next_message()).data == "for the other stream"
    await publish_id(service, "room:1", "still live")
    assert (await reader.next_message()).data == "still live"
    plain.close()


# 7. Closed streams leave nothing behind ---------------------------------------------------


async def test_closed_token_streams_leave_no_subscriber_in_memory(
    make_service: ServiceFactory,
) -> None:
    """After hundreds of hour-long-token streams came and went, none stays in the process."""
    service = await make_service(secret=SECRET)
    await grant(service.port, "1", "room:1")
    token = mint_token(SECRET, "1", ttl=3600)

    async def cycle() -> None:
        client = await SseClient.open(service.port, f"token={token}")
        assert (await client.expect()).data == status("ok")
        await client.close()

    for _ in range(10):
        await asyncio.gather(*(cycle() for _ in range(30)))
    await wait_streams(service, 0)
    gc.collect()
    alive = sum(isinstance(o, Subscriber) for o in gc.get_objects())
    assert alive <= 5, f"{alive} stream states outlive their 300 closed streams"


# 8. Token leeway --------------------------------------------------------------------------


async def test_token_within_leeway_stays_open_until_expiry_plus_leeway(
    make_service: ServiceFactory,
) -> None:
    """A token expired by less than the leeway gets `ok` and lives until exp + leeway."""
    clock = {"now": time.time()}
    service = await make_service(secret=SECRET, leeway=30, wall_clock=lambda: clock["now"])
    await grant(service.port, "1", "room:1")
    issued = int(clock["now"]) - 65
    token = mint_token(SECRET, "1", ttl=60, now=issued)  # expired 5 s ago
    client = await SseClient.open(service.port, f"token={token}&format=json")
    assert json.loads((await client.expect()).data) == {"status": "ok"}
    # Keep-alives prove the periodic tick (which ends expired streams) ran meanwhile.
    for _ in range(3):
        event = await client.expect()
        assert event.event == "noop", f"the stream ended inside the leeway: {event}"
    clock["now"] = issued + 60 + 30 - 1
    for _ in range(2):
        event = await client.expect()
        assert event.event == "noop", f"the stream ended inside the leeway: {event}"
    clock["now"] = issued + 60 + 30 + 1
    events = [e for e in await client.until_closed() if e.event != "noop"]
    assert [json.loads(e.data) for e in events] == [{"status": "failure", "reason": "expired"}]
