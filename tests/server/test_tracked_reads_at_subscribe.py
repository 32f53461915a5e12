"""The user's set read on the pub/sub connection when a stream of the user starts:
what a command run between its two replies, a key of another type, and a reconnect
within the linger do to it (real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import redis

from tests.server.test_tracked_rights import (  # noqa: F401  (the fixture)
    connect_ok,
    many_volatile_keys,
    plain,
    set_reads,
    start,
    url_of,
)
from tests.support.sse_client import status

PTTL_OF_U = b"PTTL\r\n$15\r\nuser:u:channels\r\n"


class SplittingProxy:
    """Forwards to Redis; on the connection that sends ``PTTL user:u:channels``, forwards
    up to the end of that PTTL, waits for ``release``, then forwards the rest (its
    SMEMBERS): what Redis does anyway when a pipelined write is longer than one read of
    its query buffer (16 KiB), letting other clients' commands run in between."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.split = asyncio.Event()
        self.release = asyncio.Event()
        self.done = False
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]
        self._tasks.append(asyncio.ensure_future(self._pipe(reader, up_writer, True)))
        self._tasks.append(asyncio.ensure_future(self._pipe(up_reader, writer, False)))

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, to_redis: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                at = data.find(PTTL_OF_U) if to_redis and not self.done else -1
                if at >= 0:
                    self.done = True
                    cut = at + len(PTTL_OF_U)
                    sink.write(data[:cut])
                    await sink.drain()
                    self.split.set()
                    await self.release.wait()
                    data = data[cut:]
                sink.write(data)
                await sink.drain()
        sink.close()

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_a_time_to_live_given_between_a_reads_two_commands_is_not_missed(
    plain: redis.Redis,  # noqa: F811
) -> None:
    """The read is PTTL then SMEMBERS; an EXPIRE that runs between them (its invalidate
    arrives between their replies) must not leave the set kept: after it expires, the
    notice disconnects the user (as test_a_set_that_expires_is_never_kept)."""
    many_volatile_keys(plain)  # the expiry sweep takes long to delete user:u's set
    plain.sadd("user:u:channels", "room")
    proxy = SplittingProxy(plain.connection_pool.connection_kwargs["port"])
    await proxy.start()
    service = await start(proxy.url)
    try:
        connecting = asyncio.ensure_future(connect_ok(service, "u"))
        await asyncio.wait_for(proxy.split.wait(), 5)
        await asyncio.sleep(0.2)  # Redis ran the PTTL (-1: no time to live yet)
        plain.pexpire("user:u:channels", 1500)  # temporary access, from now on
        expires_at = time.monotonic() + 1.5
        proxy.release.set()
        client = await connecting
        await asyncio.sleep(expires_at - time.monotonic() + 0.3)  # expired, not deleted
        # (No EXISTS here: a read of the expired key deletes it, and that invalidates.)
        plain.publish("user:u", "your access expired")
        plain.publish("room", "after the expiry")
        got = [(await client.next_message()).data for _ in range(2)]
        assert got == ["your access expired", status("disconnected")]
    finally:
        await service.stop()
        await proxy.close()


async def test_wrong_type_and_missing_sets_read_at_subscribe_keep_the_link(
    plain: redis.Redis,  # noqa: F811
) -> None:
    """u reads user:v (a string key) and user:w (no key): the reads get WRONGTYPE and an
    empty set, nothing is kept, and the pub/sub link stays up."""
    plain.sadd("user:u:channels", "room", "user:v", "user:w")
    plain.set("user:v:channels", "not a set")
    service = await start(plain)
    try:
        client = await connect_ok(service, "u")
        await asyncio.sleep(0.3)
        plain.publish("room", "one")
        assert (await client.next_message()).data == "one"
        assert service.broker.reconnects == 0  # type: ignore[attr-defined]
        assert "v" not in service.broker._tracked  # type: ignore[attr-defined]
    finally:
        await service.stop()


async def test_a_reconnect_within_the_linger_after_a_change_reads_before_the_first_notice(
    plain: redis.Redis,  # noqa: F811
) -> None:
    """A reconnect within the linger sends no SUBSCRIBE; its set, changed meanwhile (so no
    longer kept), is read with the connect all the same: the first notice reads nothing."""
    plain.sadd("user:u:channels", "room")
    service = await start(plain, linger=5.0)
    try:
        first = await connect_ok(service, "u")
        await first.close()
        await asyncio.sleep(0.2)  # user:u lingers
        plain.sadd("user:u:channels", "lobby")  # invalidated while lingering
        await asyncio.sleep(0.2)
        client = await connect_ok(service, "u")
        await asyncio.sleep(0.2)
        before = set_reads(plain)
        plain.publish("user:u", "hello")
        plain.publish("room", "sync")
        assert await client.messages_until("sync") == ["hello", "sync"]
        assert set_reads(plain) == before
    finally:
        await service.stop()
