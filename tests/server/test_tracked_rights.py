"""Rights kept with Redis client-side caching: a message on user:<id> reads nothing while
the user's set is unchanged, and every change, however it is made, is seen at the next
notice (real Redis; the pub/sub link speaks RESP3 with CLIENT TRACKING on)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Callable

import pytest
import redis

from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.support.redis_server import RedisServer
from tests.support.sse_client import SseClient, status
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
async def plain() -> AsyncIterator[redis.Redis]:
    server = RedisServer()
    server.start()
    client = redis.Redis(port=server.port)
    yield client
    client.close()
    server.close()


def url_of(plain: redis.Redis) -> str:
    return f"redis://127.0.0.1:{plain.connection_pool.connection_kwargs['port']}/0"


async def start(
    plain_or_url: redis.Redis | str, linger: float = 5.0, broker_timeout: float = 2.0
) -> Service:
    url = plain_or_url if isinstance(plain_or_url, str) else url_of(plain_or_url)
    settings = Settings(port=0, redis_url=url, broker_timeout=broker_timeout,
                        broker_ping_interval=0.2, keepalive=5.0,
                        subscription_linger=linger)  # fmt: skip
    service = Service(settings)
    await service.start()
    return service


async def connect_ok(service: Service, user: str) -> SseClient:
    client = await SseClient.open(service.port, f"user={user}")
    assert (await client.expect()).data == status("ok")
    return client


def set_reads(plain: redis.Redis) -> int:
    """SMEMBERS commands Redis ran so far."""
    return int(plain.info("commandstats").get("cmdstat_smembers", {}).get("calls", 0))


async def personal_messages(plain: redis.Redis, client: SseClient, count: int) -> None:
    """``count`` messages on user:u, each followed by one on room that is held until the
    refresh the personal one started is over: one refresh per message."""
    for i in range(count):
        plain.publish("user:u", f"personal {i}")
        plain.publish("room", f"settled {i}")
        assert await client.messages_until(f"settled {i}") == [f"personal {i}", f"settled {i}"]


async def settled(plain: redis.Redis, client: SseClient) -> None:
    """Every refresh started so far is over (a message on room is held until then), so
    every channel it added is subscribed."""
    plain.publish("room", "sync")
    await client.messages_until("sync")


async def test_personal_messages_read_nothing_while_the_set_is_unchanged(
    plain: redis.Redis,
) -> None:
    plain.sadd("user:u:channels", "room")
    service = await start(plain)
    try:
        before = set_reads(plain)
        client = await connect_ok(service, "u")
        for _ in range(100):
            if set_reads(plain) - before == 2:
                break
            await asyncio.sleep(0.01)
        # The snapshot's read, and the tracked one sent with the SUBSCRIBE of user:u.
        assert set_reads(plain) - before == 2
        await personal_messages(plain, client, 20)
        assert set_reads(plain) - before == 2  # no message read it again
        plain.publish("room", "still reading")
        assert (await client.next_message()).data == "still reading"
    finally:
        await service.stop()


async def reads_the_new_channel(plain: redis.Redis, client: SseClient) -> None:
    """Once the refreshes are over, a message on the channel "new" reaches the client."""
    await settled(plain, client)
    plain.publish("new", "on the new channel")
    assert (await client.next_message()).data == "on the new channel"


def many_volatile_keys(plain: redis.Redis) -> None:
    """100,000 keys with a time to live: Redis's expiry sweep then takes long to reach
    any one of them, so an expired key may stay undeleted (and not invalidated)."""
    plain.eval(
        "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'vol:' .. i, 'x', 'EX', 3600) end",
        0,
        100_000,
    )


def grant_by_pipeline(plain: redis.Redis, port: int) -> None:
    plain.pipeline(transaction=False).sadd("user:u:channels", "new").publish(
        "user:u", "granted"
    ).execute()


def grant_by_transaction(plain: redis.Redis, port: int) -> None:
    plain.pipeline(transaction=True).sadd("user:u:channels", "new").publish(
        "user:u", "granted"
    ).execute()


def grant_by_script(plain: redis.Redis, port: int) -> None:
    script = "redis.call('SADD', KEYS[1], 'new'); redis.call('PUBLISH', 'user:u', 'granted')"
    plain.eval(script, 1, "user:u:channels")


def grant_by_api(plain: redis.Redis, port: int) -> None:
    body = json.dumps({"user": "u", "channels": ["new"]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/grant",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200


@pytest.mark.parametrize(
    "grant", [grant_by_pipeline, grant_by_transaction, grant_by_script, grant_by_api]
)
async def test_a_grant_is_seen_at_its_notice_however_it_is_made(
    plain: redis.Redis, grant: Callable[[redis.Redis, int], None]
) -> None:
    plain.sadd("user:u:channels", "room")
    service = await start(plain)
    try:
        client = await connect_ok(service, "u")
        await personal_messages(plain, client, 3)  # the set is read, and kept
        await asyncio.to_thread(grant, plain, service.port)
        assert (await client.next_message()).data.startswith(("granted", '{"rights"'))
        await reads_the_new_channel(plain, client)
    finally:
        await service.stop()


async def test_a_revoke_is_seen_at_its_notice(plain: redis.Redis) -> None:
    plain.sadd("user:u:channels", "room", "lobby")
    service = await start(plain)
    try:
        client = await connect_ok(service, "u")
        await personal_messages(plain, client, 3)
        burst = plain.pipeline(transaction=False)
        burst.srem("user:u:channels", "room").publish("user:u", "revoked")
        burst.publish("room", "after the revoke").publish("lobby", "marker").execute()
        assert await client.messages_until("marker") == ["revoked", "marker"]
    finally:
        await service.stop()


async def test_an_unannounced_change_is_seen_at_the_next_personal_message(
    plain: redis.Redis,
) -> None:
    plain.sadd("user:u:channels", "room")
    service = await start(plain)
    try:
        client = await connect_ok(service, "u")
        await personal_messages(plain, client, 3)
        plain.sadd("user:u:channels", "quiet")  # no notice
        await asyncio.sleep(0.1)
        plain.publish("user:u", "hello")
        assert (await client.next_message()).data == "hello"
        await settled(plain, client)
        plain.publish("quiet", "seen")
        assert (await client.next_message()).data == "seen"
    finally:
        await service.stop()


async def test_a_flush_drops_every_kept_set(plain: redis.Redis) -> None:
    plain.sadd("user:u:channels", "room")
    service = await start(plain)
    try:
        client = await connect_ok(service, "u")
        await personal_messages(plain, client, 3)
        plain.flushall()
        plain.sadd("user:u:channels", "elsewhere")
        burst = plain.pipeline(transaction=False)
        burst.publish("user:u", "moved").publish("room", "old room")
        burst.publish("user:u", "marker").execute()
        assert await client.messages_until("marker") == ["moved", "marker"]
    finally:
        await service.stop()


async def test_a_new_pubsub_link_keeps_sets_again_and_sees_changes(plain: redis.Redis) -> None:
    """Sets kept by a lost link are dropped with it: a change made while no link tracked
    them is seen; the new link keeps sets again."""
    plain.sadd("user:u:channels", "room")
    service = await start(plain)
    try:
        first = await connect_ok(service, "u")
        await personal_messages(plain, first, 3)
        plain.client_kill_filter(_type="pubsub")
        events = await first.until_closed()
        assert events[-1].data == status("error")
        for _ in range(200):
            if service.broker.ready:
                break
            await asyncio.sleep(0.02)
        # Changed while no link tracked it: the set kept before the loss is stale now.
        plain.sadd("user:u:channels", "quiet")
        client = await connect_ok(service, "u")
        await personal_messages(plain, client, 1)
        await settled(plain, client)
        plain.publish("quiet", "seen")
        assert (await client.next_message()).data == "seen"
        before = set_reads(plain)
        await personal_messages(plain, client, 5)
        assert set_reads(plain) == before
        grant_by_pipeline(plain, service.port)
        assert (await client.next_message()).data == "granted"
        await reads_the_new_channel(plain, client)
    finally:
        await service.stop()


@pytest.mark.parametrize("refused", ["-client|tracking", "-pttl"])
async def test_without_client_side_caching_every_personal_message_reads_the_set(
    plain: redis.Redis, caplog: pytest.LogCaptureFixture, refused: str
) -> None:
    """A server (or ACL) without CLIENT TRACKING, or without a command the reads need:
    said once in the log; every notice reads the set, and changes take effect as before."""
    plain.execute_command("ACL", "SETUSER", "default", refused)
    plain.sadd("user:u:channels", "room")
    with caplog.at_level(logging.WARNING, logger="sisyphus.redis"):
        service = await start(plain)
    try:
        assert any("no client-side caching" in r.getMessage() for r in caplog.records)
        client = await connect_ok(service, "u")
        before = set_reads(plain)
        await personal_messages(plain, client, 5)
        assert set_reads(plain) - before == 5
        grant_by_pipeline(plain, service.port)
        assert (await client.next_message()).data == "granted"
        await reads_the_new_channel(plain, client)
    finally:
        await service.stop()


@pytest.mark.parametrize("tracking", [True, False], ids=["tracked", "control-untracked"])
async def test_a_set_that_expires_is_never_kept(plain: redis.Redis, tracking: bool) -> None:
    """A set whose time to live passed is gone for any read, but Redis invalidates it
    only when it deletes the key (on access, or when its expiry sweep, about 20 keys per
    100 ms, reaches it): among many volatile keys that may take minutes. So a set with a
    time to live is never kept, and the notice after its expiry disconnects the user."""
    if not tracking:
        plain.execute_command("ACL", "SETUSER", "default", "-client|tracking")
    many_volatile_keys(plain)
    plain.sadd("user:u:channels", "room")
    plain.pexpire("user:u:channels", 1500)  # temporary access
    expires_at = time.monotonic() + 1.5
    service = await start(url_of(plain))
    try:
        client = await connect_ok(service, "u")
        await personal_messages(plain, client, 2)  # read while its time to live runs
        await asyncio.sleep(expires_at - time.monotonic() + 0.3)  # expired, not yet deleted
        plain.publish("user:u", "your access expired")
        plain.publish("room", "after the expiry")
        got = [(await client.next_message()).data for _ in range(2)]
        # Re-read after the notice: no set, an unknown user -> disconnected.
        assert got == ["your access expired", status("disconnected")]
    finally:
        await service.stop()


async def test_a_read_answered_after_the_user_left_is_not_kept(
    plain: redis.Redis,
) -> None:
    """The user's last stream closes (user:u unsubscribed) while its refresh read is on
    the way: the answer is not kept, or one entry per user who left mid-read would stay
    until the key changes."""
    port = plain.connection_pool.connection_kwargs["port"]
    proxy = TcpProxy(port)
    await proxy.start()
    plain.sadd("user:u:channels", "room")
    service = await start(proxy.url, linger=0.0)
    try:
        client = await connect_ok(service, "u")
        subscribed = {int(c["addr"].rsplit(":", 1)[1])
                      for c in plain.client_list() if int(c.get("sub", 0)) > 0}  # fmt: skip
        for link in proxy.links:
            if link.upstream_port in subscribed:
                link.delay_replies(0.4)  # the pub/sub link: a slow route
        plain.publish("user:u", "hello")
        assert (await client.next_message(timeout=3)).data == "hello"  # the read goes out now
        await client.close()  # the user leaves before the reply is back
        await asyncio.sleep(1.0)
        broker = service.broker
        assert "user:u" not in broker._wanted  # type: ignore[attr-defined]
        assert "u" not in broker._tracked  # type: ignore[attr-defined]
    finally:
        await service.stop()
        await proxy.close()
