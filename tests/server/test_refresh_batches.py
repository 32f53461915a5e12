"""Rights refreshes of many users read in one round trip: each user's outcome is its own.

Notices for several users that arrive together are refreshed by one read of all
their sets (real Valkey; the command link goes through a proxy that can black-hole it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis

from tests.server.test_tracked_rights import connect_ok, start
from tests.support.redis_server import RedisServer
from tests.support.sse_client import status
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
async def world() -> AsyncIterator[tuple[TcpProxy, redis.Redis]]:
    server = RedisServer()
    server.start()
    proxy = TcpProxy(server.port)
    await proxy.start()
    plain = redis.Redis(port=server.port)
    yield proxy, plain
    plain.close()
    await proxy.close()
    server.close()


async def test_notices_for_several_users_at_once_are_settled_user_by_user(
    world: tuple[TcpProxy, redis.Redis],
) -> None:
    """In one burst: a personal message, a set turned into a string, and a revoke. The
    first user keeps reading, the second is disconnected, the third loses the channel."""
    proxy, plain = world
    service = await start(proxy.url)
    try:
        for user in ("a", "b", "c"):
            plain.sadd(f"user:{user}:channels", f"room:{user}", "lobby")
        tabs = {user: await connect_ok(service, user) for user in ("a", "b", "c")}
        burst = plain.pipeline(transaction=False)  # one write: the notices arrive together
        burst.delete("user:b:channels").set("user:b:channels", "not a set")
        burst.srem("user:c:channels", "room:c")
        burst.publish("user:a", "hello a").publish("user:b", "hello b")
        burst.publish("user:c", "revoked")
        burst.publish("room:a", "after a").publish("room:c", "after the revoke")
        burst.execute()
        assert await tabs["a"].messages_until("after a") == ["hello a", "after a"]
        events = await tabs["b"].until_closed()
        assert [e.data for e in events if not e.is_noop] == ["hello b", status("disconnected")]
        plain.publish("user:c", "marker")
        assert await tabs["c"].messages_until("marker") == ["revoked", "marker"]
        plain.publish("room:a", "still reading")
        assert (await tabs["a"].next_message()).data == "still reading"
    finally:
        await service.stop()


async def test_a_command_link_black_holed_during_a_refresh_ends_every_held_stream(
    world: tuple[TcpProxy, redis.Redis],
) -> None:
    """Rights can't be read: every user noticed together gets `error` (it resumes by id),
    none stays held with its messages kept back. (Without client-side caching, the sets
    are read on the command link.)"""
    proxy, plain = world
    plain.execute_command("ACL", "SETUSER", "default", "-client|tracking")
    service = await start(proxy.url, broker_timeout=0.5)
    try:
        for user in ("a", "b"):
            plain.sadd(f"user:{user}:channels", "room")
        tabs = [await connect_ok(service, user) for user in ("a", "b")]
        subscribed = {int(c["addr"].rsplit(":", 1)[1])
                      for c in plain.client_list() if int(c.get("sub", 0)) > 0}  # fmt: skip
        for link in proxy.links:
            if link.upstream_port not in subscribed:
                link.dead = True  # the command link: its packets vanish, the socket stays
        burst = plain.pipeline(transaction=False)
        burst.publish("user:a", "notice a").publish("user:b", "notice b").execute()
        for tab, notice in zip(tabs, ("notice a", "notice b"), strict=True):
            events = await asyncio.wait_for(tab.until_closed(), 10)
            assert [e.data for e in events if not e.is_noop] == [notice, status("error")]
    finally:
        await service.stop()
