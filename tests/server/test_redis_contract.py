"""The original contract on Redis: the main app's plain commands drive Sisyphus."""

from __future__ import annotations

import asyncio

import pytest
import redis

from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory
from tests.support.redis_server import RedisServer, free_port
from tests.support.sse_client import SseClient, status


@pytest.fixture
def broker_kind() -> str:
    """Every test here runs on Redis only."""
    return "redis"


async def connect_ok(service: Service, user: str) -> SseClient:
    client = await SseClient.open(service.port, f"user={user}")
    event = await client.next_event()
    assert event is not None and event.data == status("ok")
    return client


def pubsub_clients(client: redis.Redis) -> list[dict[str, str]]:
    """CLIENT LIST entries of connections in pub/sub mode."""
    return [entry for entry in client.client_list() if "P" in entry["flags"]]


async def test_plain_redis_commands_drive_rights_and_messages(
    service: Service, redis_client: redis.Redis
) -> None:
    """The main app's SADD/SREM + PUBLISH user:<id> change rights; its PUBLISH delivers."""
    redis_client.sadd("user:1:channels", "room:5")
    client = await connect_ok(service, "1")
    redis_client.publish("room:5", "plain publish")
    assert (await client.next_message()).data == "plain publish"

    redis_client.sadd("user:1:channels", "folder:627")
    redis_client.publish("user:1", "rights changed")
    assert (await client.next_message()).data == "rights changed"
    redis_client.publish("room:5", "sync")  # arrives after the refresh has been scheduled
    assert (await client.next_message()).data == "sync"
    for _ in range(200):
        if "folder:627" in service.hub.channels():
            break
        await asyncio.sleep(0.01)
    redis_client.publish("folder:627", "in the folder")
    assert (await client.next_message()).data == "in the folder"

    redis_client.srem("user:1:channels", "room:5")
    redis_client.publish("user:1", "revoked")
    assert (await client.next_message()).data == "revoked"
    for _ in range(200):
        if "room:5" not in service.hub.channels():
            break
        await asyncio.sleep(0.01)
    redis_client.publish("room:5", "must not arrive")
    redis_client.publish("folder:627", "still readable")
    assert (await client.next_message()).data == "still readable"

    redis_client.delete("user:1:channels")
    redis_client.publish("user:1", "bye")
    events = [e.data for e in await client.until_closed() if not e.is_noop]
    assert events == ["bye", status("disconnected")]


async def test_many_clients_share_one_redis_subscription(
    service: Service, redis_client: redis.Redis
) -> None:
    """A hundred browsers on room:5 cost Redis one subscription on one pub/sub connection."""
    for i in range(100):
        redis_client.sadd(f"user:{i}:channels", "room:5")
    clients = [await connect_ok(service, str(i)) for i in range(100)]
    assert redis_client.pubsub_numsub("room:5") == [(b"room:5", 1)]
    assert len(pubsub_clients(redis_client)) == 1
    # The whole service: one pub/sub link plus a small command pool, not one per browser.
    assert len(redis_client.client_list()) <= 4
    redis_client.publish("room:5", "fan out")
    for client in clients:
        assert (await client.next_message()).data == "fan out"
    for client in clients:
        await client.close()
    # Unsubscribed once --subscription-linger has passed since the last one left.
    await wait_no_channels(redis_client, service.settings.subscription_linger + 5)
    assert redis_client.pubsub_numsub("room:5") == [(b"room:5", 0)]
    assert redis_client.pubsub_channels() == []


async def wait_no_channels(client: redis.Redis, seconds: float) -> None:
    """Poll Redis until no channel is subscribed, for at most ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if client.pubsub_channels() == []:
            return
        await asyncio.sleep(0.02)


def calls(client: redis.Redis, command: str) -> int:
    """How many times Redis has run ``command`` (INFO commandstats)."""
    stats = client.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


async def test_a_client_back_within_the_linger_costs_redis_no_subscribe(
    make_service: ServiceFactory, redis_client: redis.Redis
) -> None:
    """The last stream on a channel closes: Redis keeps the subscription for the linger, a
    client coming back meanwhile gets it without a SUBSCRIBE (and its messages), and the
    subscription ends once the linger has passed with nobody on the channel."""
    service = await make_service(subscription_linger=1.0)
    redis_client.sadd("user:1:channels", "room:5")
    first = await connect_ok(service, "1")
    await first.close()
    for _ in range(100):
        if service.hub.stream_count() == 0:
            break
        await asyncio.sleep(0.01)
    assert redis_client.pubsub_numsub("room:5") == [(b"room:5", 1)]
    before = calls(redis_client, "subscribe"), calls(redis_client, "evalsha")
    again = await connect_ok(service, "1")
    # No SUBSCRIBE, and one script: the snapshot (no history read, nothing to replay).
    assert (calls(redis_client, "subscribe"), calls(redis_client, "evalsha")) == (
        before[0],
        before[1] + 1,
    )
    redis_client.publish("room:5", "still delivered")
    assert (await again.next_message()).data == "still delivered"
    await asyncio.sleep(1.5)  # longer than the linger, with a stream on the channel
    assert redis_client.pubsub_numsub("room:5") == [(b"room:5", 1)]
    await again.close()
    await wait_no_channels(redis_client, 5.0)
    assert redis_client.pubsub_channels() == []
    assert service.broker.ready  # nothing lingering is waited for


async def test_without_a_linger_the_last_stream_unsubscribes_at_once(
    make_service: ServiceFactory, redis_client: redis.Redis
) -> None:
    service = await make_service(subscription_linger=0.0)
    redis_client.sadd("user:1:channels", "room:5")
    client = await connect_ok(service, "1")
    await client.close()
    await wait_no_channels(redis_client, 1.0)
    assert redis_client.pubsub_channels() == []


async def test_invalid_channel_names_in_the_set_are_ignored(
    service: Service, redis_client: redis.Redis
) -> None:
    """A malformed member of the set is never subscribed; the user's valid channels still work."""
    redis_client.sadd("user:1:channels", "room:5", "bad channel*", "user:2:channels")
    client = await connect_ok(service, "1")
    assert set(service.hub.channels()) == {"user:1", "room:5"}
    redis_client.publish("room:5", "fine")
    assert (await client.next_message()).data == "fine"
    await client.close()


async def test_a_set_of_the_wrong_type_is_an_unknown_user(
    service: Service, redis_client: redis.Redis
) -> None:
    """If user:<id>:channels isn't a SET, the user can't be identified: `failure`."""
    redis_client.set("user:1:channels", "not a set")
    client = await SseClient.open(service.port, "user=1")
    events = await client.until_closed()
    assert [e.data for e in events] == [status("failure")]


async def test_a_set_replaced_by_another_type_disconnects_on_the_next_notice(
    service: Service, redis_client: redis.Redis
) -> None:
    """The rights key turned into a string: the refresh reads no set, `disconnected`."""
    redis_client.sadd("user:1:channels", "room:1")
    client = await connect_ok(service, "1")
    redis_client.delete("user:1:channels")
    redis_client.set("user:1:channels", "not a set")
    redis_client.publish("user:1", "rights changed")
    events = await client.until_closed()
    assert [e.data for e in events if not e.is_noop] == ["rights changed", status("disconnected")]


async def test_unreachable_redis_gives_error_status() -> None:
    """With Redis down, a connecting client gets `error` with a retry hint, then the close."""
    settings = Settings(port=0, redis_url=f"redis://127.0.0.1:{free_port()}/0", broker_timeout=1)
    service = Service(settings)
    await service.start()
    try:
        client = await SseClient.open(service.port, "user=1")
        events = await client.until_closed()
        assert [e.data for e in events] == [status("error")]
        assert events[0].retry is not None and events[0].retry >= settings.retry_ms
    finally:
        await service.stop()


async def test_redis_outage_closes_streams_with_error_then_recovers() -> None:
    """Clients get `error` when Redis dies; once it is back, new clients are served again."""
    server = RedisServer()
    server.start()
    service = Service(Settings(port=0, redis_url=server.url, broker_timeout=1))
    await service.start()
    try:
        redis.Redis.from_url(server.url).sadd("user:1:channels", "room:5")
        client = await connect_ok(service, "1")
        server.stop()
        events = [e.data for e in await client.until_closed() if not e.is_noop]
        assert events == [status("error")]
        server.start()  # an empty Redis: the rights are gone until the app writes them again
        redis.Redis.from_url(server.url).sadd("user:1:channels", "room:5")
        for _ in range(500):
            if service.broker.connected:
                break
            await asyncio.sleep(0.02)
        client = await connect_ok(service, "1")
        redis.Redis.from_url(server.url).publish("room:5", "back")
        assert (await client.next_message()).data == "back"
        await client.close()
    finally:
        await service.stop()
        server.close()
