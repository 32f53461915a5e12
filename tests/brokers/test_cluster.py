"""Redis Cluster: sharded pub/sub across primaries, sequences spread over them, exact
resume across groups, and a cluster that changes.

Real topologies on free ports (three primaries, each with a replica), started with the
server binaries the suite uses and joined by their cli's ``--cluster create``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sisyphus.brokers.cluster import ClusterBroker
from sisyphus.brokers.groups import GROUPS_KEY, layouts, parse
from sisyphus.brokers.lua import KeyLayout
from sisyphus.client import AsyncRedisPublisher, RedisPublisher
from sisyphus.config import Settings
from sisyphus.protocol.resume import at_or_before, channel_group, parse_event_id
from sisyphus.server.app import Service
from tests.faults.test_broker_faults import readiness, wait_ready
from tests.support.redis_cluster import ClusterTopology, server_binaries
from tests.support.sse_client import SseClient, status
from tests.test_cli import run_cli, start_serve, stop_serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=server_binaries())
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterTopology]:
    """Three primaries with a replica each, on every server binary found (Redis 7.0 and
    Valkey 8 differ after a failover)."""
    with ClusterTopology(primaries=3, replicas=1, binary=request.param) as topology:
        yield topology


@pytest.fixture
def clean(cluster: ClusterTopology) -> ClusterTopology:
    for port in cluster.primary_ports():
        cluster.command(port, "FLUSHALL")
    return cluster


def settings(url: str, **overrides: object) -> Settings:
    return Settings(port=0, redis_url=url, broker_timeout=1.0, broker_ping_interval=0.2,
                    keepalive=0.3).replace(**overrides)  # fmt: skip


@pytest.fixture
async def service(clean: ClusterTopology) -> AsyncIterator[Service]:
    started = Service(settings(clean.url))
    await started.start()
    await wait_ready(started)
    yield started
    await started.stop()


def channel_on(
    cluster: ClusterTopology, port: int, stem: str = "room", group: int | None = None
) -> str:
    """A channel whose plain shard channel lives on the primary at ``port`` (and, if
    given, whose messages take sequence group ``group``)."""
    for number in range(10_000):
        name = f"{stem}:{number}"
        if cluster.primary_for_slot(cluster.slot_of(name)) != port:
            continue
        if group is None or channel_group(name, 3) == group:
            return name
    raise AssertionError(f"no channel found on port {port}")


def groups_of(cluster: ClusterTopology) -> list[KeyLayout]:
    """The sequence groups the cluster holds (a service or publisher chose them)."""
    owner = cluster.primary_for_slot(cluster.slot_of(GROUPS_KEY))
    return layouts(parse(cluster.command(owner, "GET", GROUPS_KEY)))


def group_primary(cluster: ClusterTopology, channel: str) -> int:
    """The primary that serves the sequence group of ``channel``."""
    found = groups_of(cluster)
    layout = found[channel_group(channel, len(found))]
    return cluster.primary_for_slot(cluster.slot_of(layout.sequence_key))


def own_seq(event_id: str, channel: str) -> int:
    """The seq an id holds for ``channel``'s group (the message's own, on its event)."""
    seqs = parse_event_id(event_id).seqs
    return seqs[channel_group(channel, len(seqs))]


async def connect_ok(service: Service, user: str, last_id: str | None = None) -> SseClient:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    client = await SseClient.open(service.port, f"user={user}", headers=headers)
    event = await client.expect()
    assert event.data == status("ok"), event
    return client


async def closed_with_error(client: SseClient) -> None:
    events = [e for e in await client.until_closed(timeout=15) if not e.is_noop]
    assert [e.data for e in events][-1:] == [status("error")], events
    assert events[-1].retry is not None


async def test_the_sequences_are_spread_one_group_per_primary(
    clean: ClusterTopology, service: Service
) -> None:
    found = groups_of(clean)
    assert len(found) == 3
    owners = {clean.primary_for_slot(clean.slot_of(g.sequence_key)) for g in found}
    assert owners == set(clean.primary_ports())
    await service.broker.grant("2", ["room:1"], b"granted")
    client = await connect_ok(service, "2")
    assert client.last_event_id is not None
    assert len(parse_event_id(client.last_event_id).seqs) == 3  # one seq per group


async def test_channels_of_every_group_are_heard_and_resume_is_exact(
    clean: ClusterTopology, service: Service
) -> None:
    """Channels on three shards and in three sequence groups: a client resuming from
    any id it got gets exactly what came after it, once, each channel in order."""
    primaries = clean.primary_ports()
    channels = [channel_on(clean, primaries[g], group=g) for g in range(3)]
    await service.broker.grant("1", channels, b"granted")
    client = await connect_ok(service, "1")
    for channel in channels:
        await service.broker.publish(channel, f"live {channel}".encode())
    live = [await client.next_message() for _ in channels]
    assert [m.data for m in live] == [f"live {c}" for c in channels]
    # The main application's plain SPUBLISH, on the channel's own shard.
    clean.command(primaries[1], "SPUBLISH", channels[1], "plain")
    assert (await client.next_message()).data == "plain"
    await client.close()
    missed = [f"missed {n} {c}" for n in range(3) for c in channels]
    for payload in missed:
        await service.broker.publish(payload.split()[-1], payload.encode())
    client = await connect_ok(service, "1", live[-1].id)
    resumed = [await client.next_message() for _ in missed]
    assert sorted(m.data for m in resumed) == sorted(missed)
    for channel in channels:  # each channel in publication order
        mine = [m.data for m in resumed if m.data.endswith(channel)]
        assert mine == [p for p in missed if p.endswith(channel)]
    positions = [parse_event_id(m.id or "").seqs for m in [live[-1], *resumed]]
    assert all(at_or_before(a, b) for a, b in itertools.pairwise(positions))
    await client.close()
    # From any id it got, exactly what came after it (the earlier rounds' markers too).
    markers: list[str] = []
    for index in (0, 3, 7):
        client = await connect_ok(service, "1", resumed[index].id)
        markers.append(f"marker {index}")
        await service.broker.publish(channels[0], markers[-1].encode())
        rest = await client.messages_until(markers[-1])
        assert sorted(rest) == sorted([m.data for m in resumed[index + 1 :]] + markers)
        await client.close()


async def test_the_seed_contract_on_a_cluster_sadd_then_spublish(
    clean: ClusterTopology, service: Service
) -> None:
    """The main application changes a set and announces it with SPUBLISH user:<id>."""
    first, second = (channel_on(clean, port) for port in clean.primary_ports()[:2])
    rights_owner = clean.primary_for_slot(clean.slot_of("user:7:channels"))
    notice_owner = clean.primary_for_slot(clean.slot_of("user:7"))
    clean.command(rights_owner, "SADD", "user:7:channels", first)
    client = await connect_ok(service, "7")
    clean.command(rights_owner, "SADD", "user:7:channels", second)
    clean.command(notice_owner, "SPUBLISH", "user:7", "granted")
    assert (await client.next_message()).data == "granted"
    await service.broker.publish(second, b"on the granted channel")
    assert (await client.next_message()).data == "on the granted channel"
    clean.command(rights_owner, "SREM", "user:7:channels", first)
    clean.command(notice_owner, "SPUBLISH", "user:7", "revoked")
    assert (await client.next_message()).data == "revoked"
    await service.broker.publish(first, b"not for user 7 any more")
    await service.broker.publish(second, b"still for user 7")
    assert (await client.next_message()).data == "still for user 7"


async def test_the_python_publishers_speak_the_cluster_url(
    clean: ClusterTopology, service: Service
) -> None:
    channels = [channel_on(clean, port, "news") for port in clean.primary_ports()]
    publisher = RedisPublisher(clean.url)
    try:
        await asyncio.to_thread(publisher.grant, "3", channels[:2])
        start = await asyncio.to_thread(publisher.position)
        client = await connect_ok(service, "3", start)
        ids = [await asyncio.to_thread(publisher.publish, c, f"sync {c}") for c in channels[:2]]
        got = [await client.next_message() for _ in ids]
        sent = list(zip(channels[:2], ids, strict=True))
        assert [m.data for m in got] == [f"sync {c}" for c, _ in sent]
        # The id the publisher got holds the message's own seq in its group.
        assert [own_seq(m.id or "", c) for m, (c, _) in zip(got, sent, strict=True)] == [
            own_seq(i, c) for c, i in sent
        ]
        await asyncio.to_thread(publisher.revoke, "3", channels[:1])
        assert "revoked" in (await client.next_message()).data
    finally:
        publisher.close()
    async with AsyncRedisPublisher(clean.url) as async_publisher:
        await async_publisher.grant("3", channels[2:])
        assert "granted" in (await client.next_message()).data
        sent = await async_publisher.publish(channels[2], "async")
        message = await client.next_message()
        assert message.data == "async"
        assert own_seq(message.id or "", channels[2]) == own_seq(sent, channels[2])


async def publish_steadily(service: Service, channel: str, stop: asyncio.Event) -> list[str]:
    """Publish every 10 ms until ``stop``; the payloads the broker acknowledged."""
    acknowledged = []
    number = 0
    while not stop.is_set():
        number += 1
        with contextlib.suppress(Exception):  # a refusal mid-migration: that one is not sent
            await service.broker.publish(channel, f"m{number}".encode())
            acknowledged.append(f"m{number}")
        await asyncio.sleep(0.01)
    return acknowledged


async def every_message_once(
    service: Service, client: SseClient, user: str, acknowledged: list[str]
) -> None:
    """Reading on, and resuming by id whenever the stream ends, the client gets each
    acknowledged message exactly once, in order."""
    got: list[str] = []
    last_id = None
    while not got or got[-1] != acknowledged[-1]:
        event = await client.next_event(timeout=15)
        if event is None:
            await wait_ready(service)
            client = await connect_ok(service, user, last_id)
            continue
        if event.is_noop or event.data.startswith("<message>"):
            if event.data == status("error"):
                assert event.retry is not None
            continue
        got.append(event.data)
        last_id = event.id
    assert got == acknowledged


async def test_a_channel_follows_its_slot_to_another_primary(
    clean: ClusterTopology, service: Service
) -> None:
    source, target = clean.primary_ports()[:2]
    channel = channel_on(clean, source, "moving")
    await service.broker.grant("5", [channel], b"granted")
    client = await connect_ok(service, "5")
    stop = asyncio.Event()
    publishing = asyncio.create_task(publish_steadily(service, channel, stop))
    await asyncio.sleep(0.2)
    await asyncio.to_thread(clean.migrate_slot, clean.slot_of(channel), target)
    await asyncio.sleep(0.5)
    await wait_ready(service)
    stop.set()
    acknowledged = await publishing
    await every_message_once(service, client, "5", acknowledged)
    assert service.broker.reconnects == 1  # the move was noticed, not slept through
    # The main application's SPUBLISH now goes to the new primary, and is heard there.
    client = await connect_ok(service, "5")
    await wait_ready(service)
    clean.command(target, "SPUBLISH", channel, "plain, after the move")
    assert (await client.next_message()).data == "plain, after the move"


async def test_the_sequence_slot_migrates_while_messages_flow(
    clean: ClusterTopology, service: Service
) -> None:
    target = clean.primary_ports()[0]
    channel = channel_on(clean, target, "steady", group=1)
    source = group_primary(clean, channel)
    assert source != target
    layout = groups_of(clean)[1]
    await service.broker.grant("6", [channel], b"granted")
    client = await connect_ok(service, "6")
    stop = asyncio.Event()
    publishing = asyncio.create_task(publish_steadily(service, channel, stop))
    await asyncio.sleep(0.2)
    await asyncio.to_thread(clean.migrate_slot, clean.slot_of(layout.sequence_key), target)
    await asyncio.sleep(0.5)
    stop.set()
    acknowledged = await publishing
    assert len(acknowledged) > 20
    await every_message_once(service, client, "6", acknowledged)
    await wait_ready(service)
    assert service.broker.reconnects == 1


async def test_a_primary_failover_is_followed_and_readiness_tells_the_truth(
    clean: ClusterTopology, service: Service
) -> None:
    primary = clean.primary_ports()[0]
    channel = channel_on(clean, primary, "failing", group=0)
    assert group_primary(clean, channel) == primary
    await service.broker.grant("8", [channel], b"granted")
    client = await connect_ok(service, "8")
    before = await service.broker.publish(channel, b"before")
    assert (await client.next_message()).data == "before"
    answers: list[int] = []

    async def watch() -> None:
        while True:
            answers.append(await readiness(service))
            await asyncio.sleep(0.02)

    watching = asyncio.create_task(watch())
    promoted = await asyncio.to_thread(clean.failover, primary)
    await closed_with_error(client)
    await wait_ready(service)
    watching.cancel()
    # Not ready from the failover until the links are confirmed on the promoted primary.
    assert 503 in answers and await readiness(service) == 200
    assert group_primary(clean, channel) == promoted
    after = await service.broker.publish(channel, b"after the failover")
    client = await connect_ok(service, "8", before.encode().decode())
    message = await client.next_message()
    assert message.data == "after the failover"
    assert own_seq(message.id or "", channel) == own_seq(after.encode().decode(), channel)
    owner = clean.primary_for_slot(clean.slot_of(channel))
    clean.command(owner, "SPUBLISH", channel, "plain on the promoted primary")
    assert (await client.next_message()).data == "plain on the promoted primary"


async def test_a_frozen_primary_ends_the_streams_and_the_thaw_brings_them_back(
    clean: ClusterTopology, service: Service
) -> None:
    """A primary that keeps its connections but answers nothing (SIGSTOP) is found by
    the links' own timeout, not by waiting for a message."""
    port = clean.primary_ports()[1]
    channel = channel_on(clean, port, "frozen")
    await service.broker.grant("9", [channel], b"granted")
    client = await connect_ok(service, "9")
    os.kill(clean.pid(port), signal.SIGSTOP)
    try:
        await closed_with_error(client)
        assert await readiness(service) == 503
    finally:
        os.kill(clean.pid(port), signal.SIGCONT)
    await wait_ready(service)
    client = await connect_ok(service, "9")
    await wait_ready(service)
    await service.broker.publish(channel, b"after the thaw")
    assert (await client.next_message()).data == "after the thaw"


async def test_a_wrong_password_is_said_and_never_ready() -> None:
    with ClusterTopology(primaries=3, replicas=0, password="right") as secured:
        wrong = secured.url.replace(":right@", ":wrong@")
        refused = Service(settings(wrong))
        await refused.start()
        try:
            await asyncio.sleep(1.0)
            assert await readiness(refused) == 503
            assert not refused.broker.connected
        finally:
            await refused.stop()
        accepted = Service(settings(secured.url))
        await accepted.start()
        try:
            await wait_ready(accepted)
            await accepted.broker.grant("1", ["room:1"], b"granted")
            client = await connect_ok(accepted, "1")
            await accepted.broker.publish("room:1", b"with the right password")
            assert (await client.next_message()).data == "with the right password"
        finally:
            await accepted.stop()


async def test_the_command_line_serves_and_publishes_on_a_cluster(clean: ClusterTopology) -> None:
    """`serve --redis redis+cluster://...` follows what `sisyphus grant|publish --redis` write."""
    served = await start_serve("--redis", clean.url)
    try:
        granted = await run_cli("grant", "4", "room:4", "--redis", clean.url)
        assert granted.returncode == 0, granted.stderr
        owner = clean.primary_for_slot(clean.slot_of("user:4:channels"))
        assert clean.command(owner, "SMEMBERS", "user:4:channels") == {b"room:4"}
        client = await SseClient.open(served.port, "user=4")
        assert (await client.expect()).data == status("ok")
        published = await run_cli("publish", "room:4", "via the cluster", "--redis", clean.url)
        assert published.returncode == 0, published.stderr
        message = await client.next_message()
        assert message.data == "via the cluster"
        assert own_seq(message.id or "", "room:4") == own_seq(published.stdout.strip(), "room:4")
    finally:
        await stop_serve(served)


def connections(cluster: ClusterTopology) -> int:
    """Client connections on the primaries (this test's own one per primary included)."""
    return sum(len(cluster.client(port).client_list()) for port in cluster.primary_ports())


def subscribed(cluster: ClusterTopology) -> int:
    """Connections holding shard subscriptions."""
    return sum(
        1
        for port in cluster.primary_ports()
        for client in cluster.client(port).client_list()
        if int(client.get("ssub", 0))
    )


async def test_a_process_keeps_links_only_to_primaries_serving_its_channels(
    clean: ClusterTopology,
) -> None:
    service = Service(settings(clean.url, subscription_linger=0.0))
    await service.start()
    try:
        await wait_ready(service)
        await service.broker.grant("3", ["room:3"], b"granted")
        client = await connect_ok(service, "3")
        links = subscribed(clean)  # the channel's primary and its group's (maybe one)
        assert links in (1, 2, 3)
        reading = connections(clean)
        await client.close()
        for _ in range(100):  # unsubscribed, then closed after a ping interval idle
            if connections(clean) == reading - links:
                break
            await asyncio.sleep(0.05)
        assert (subscribed(clean), connections(clean)) == (0, reading - links)
        client = await connect_ok(service, "3")
        await service.broker.publish("room:3", b"on new links")
        assert (await client.next_message()).data == "on new links"
    finally:
        await service.stop()


async def test_a_grant_keeps_what_the_streams_old_channels_got_meanwhile(
    clean: ClusterTopology, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channel c is granted (same group as a, which the stream reads): while the refresh
    catches c up, a message on a arrives live (held), and one on c is published before
    the history read (replayed, with a higher seq). Both reach the stream, in order."""
    broker = service.broker
    a, c = [f"room:{n}" for n in range(99) if channel_group(f"room:{n}", 3) == 0][:2]
    await broker.grant("1", [a], b"granted a")
    client = await connect_ok(service, "1")
    original = broker.history
    injected = False

    async def history(
        channels: list[str], after: Any, limit: int, max_bytes: int, not_before: Any = None
    ) -> Any:
        nonlocal injected
        if not injected and list(channels) == [c]:
            injected = True
            await broker.publish(a, b"on a during the catch-up")
            await asyncio.sleep(0.2)  # it arrives live: held
            await broker.publish(c, b"on c before the read")
        return await original(channels, after, limit, max_bytes, not_before)

    monkeypatch.setattr(broker, "history", history)
    await broker.grant("1", [c], b"granted c")
    got = await client.messages_until("on c before the read")
    assert got == ["granted c", "on a during the catch-up", "on c before the read"]
    await broker.publish(a, b"later")
    assert (await client.next_message()).data == "later"


async def test_closing_an_idle_link_forgets_only_what_that_link_owed(
    clean: ClusterTopology,
) -> None:
    """In one step: a channel's unsubscription is on its way on one link, an idle link is
    closed, and the channel is subscribed again. Its new subscription is confirmed."""
    primaries = clean.primary_ports()
    staying = channel_on(clean, primaries[0], "z", group=0)  # both its names on primary 0
    leaving = channel_on(clean, primaries[1], "y", group=1)  # both on primary 1
    broker = ClusterBroker(clean.url, timeout=2.0, ping_interval=1.0)
    await broker.start()
    try:
        broker.subscribe([leaving])
        await asyncio.wait_for(broker.wait_subscribed([leaving]), 5)
        broker.unsubscribe([leaving])
        await asyncio.sleep(0.2)  # its link to primary 1 carries nothing now
        broker.subscribe([staying])
        await asyncio.wait_for(broker.wait_subscribed([staying]), 5)
        loop = asyncio.get_running_loop()
        broker.tick(loop.time() + 1.0)  # the link to primary 1 is idle since this tick
        await asyncio.sleep(0.2)  # (the tick's PINGs answered)
        broker.unsubscribe([staying])  # its SUNSUBSCRIBE is on its way ...
        broker.tick(loop.time() + 2.0)  # ... while the idle link is closed ...
        broker.subscribe([staying])  # ... and the channel is wanted again
        await asyncio.wait_for(broker.wait_subscribed([staying]), 5)
        assert broker.ready
    finally:
        await broker.close()


async def test_a_message_published_after_a_grant_in_another_group_is_not_lost(
    clean: ClusterTopology, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """User 1 is granted c, then m is published on c. c's sequence group is not the
    notice's, and the process hears m first (another user reads c; the notice's link
    lags): m is still delivered to user 1, once."""
    broker = service.broker
    notice_group = channel_group("user:1", 3)
    a = next(f"room:{n}" for n in range(99) if channel_group(f"room:{n}", 3) == notice_group)
    c = next(f"room:{n}" for n in range(99) if channel_group(f"room:{n}", 3) != notice_group)
    await broker.grant("1", [a], b"granted a")
    await broker.grant("2", [c], b"granted c")
    one = await connect_ok(service, "1")
    await connect_ok(service, "2")  # so the process hears c
    original = broker._on_shard_message
    lagging: list[tuple[bytes, bytes]] = []
    heard_m = False

    def on_shard_message(name: bytes, payload: bytes) -> None:
        nonlocal heard_m
        if name.endswith(b":seq user:1") and not heard_m:
            lagging.append((name, payload))  # the notice's link lags ...
            return
        original(name, payload)
        if name.endswith(b":seq " + c.encode()):
            heard_m = True  # (m may also come first by itself: two links, no order)
            while lagging:
                original(*lagging.pop(0))  # ... behind m

    monkeypatch.setattr(broker, "_on_shard_message", on_shard_message)
    await broker.grant("1", [c], b"granted c to 1")
    await broker.publish(c, b"m, after the grant")
    assert await one.messages_until("m, after the grant") == [
        "granted c to 1",
        "m, after the grant",
    ]
    await broker.publish(a, b"later")
    assert (await one.next_message()).data == "later"
