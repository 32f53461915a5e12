"""Redis Sentinel: the service finds the master through the sentinels and follows a failover.

A real topology on free ports: a master, one replica and three sentinels, all the
Valkey (or Redis) binary the suite already uses.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sisyphus.client import AsyncRedisPublisher, RedisPublisher
from sisyphus.config import Settings
from sisyphus.errors import BrokerUnavailable
from sisyphus.server.app import Service
from tests.faults.test_broker_faults import readiness, wait_ready
from tests.support.redis_server import free_port, server_binary
from tests.support.sse_client import SseClient, status
from tests.support.tcp_proxy import TcpProxy

MASTER = "mymaster"


class SentinelTopology:
    """A master, a replica and three sentinels watching them, in a temporary folder."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="sisyphus-sentinel-")
        self.master_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def _start(self, name: str, args: list[str]) -> None:
        self.processes[name] = subprocess.Popen(
            [server_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start(self) -> None:
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                  "--protected-mode", "no", "--dir", self.dir.name]  # fmt: skip
        self._start("master", ["--port", str(self.master_port), *common])
        _wait_ping(self.master_port)
        self._start("replica", ["--port", str(self.replica_port), *common,
                                "--replicaof", "127.0.0.1", str(self.master_port)])  # fmt: skip
        _wait_ping(self.replica_port)
        for index, port in enumerate(self.sentinel_ports):
            conf = Path(self.dir.name) / f"sentinel-{index}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir.name}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self._start(f"sentinel-{index}", [str(conf), "--sentinel"])
            _wait_ping(port)

    def master(self) -> redis.Redis:
        host, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(
            MASTER
        )
        return redis.Redis(host=host, port=int(port))

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(10)
        self.dir.cleanup()


def _wait_ping(port: int) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture
def topology() -> Iterator[SentinelTopology]:
    topology = SentinelTopology()
    topology.start()
    yield topology
    topology.close()


async def ready_after_promotion(service: Service, seconds: float = 45) -> None:
    """Wait while the sentinels agree and promote the replica, until the service is ready."""
    for _ in range(int(seconds / 0.05)):
        if await readiness(service) == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never ready on the new master")


def settings(url: str) -> Settings:
    return Settings(port=0, redis_url=url, broker_timeout=1.0, broker_ping_interval=0.2,
                    keepalive=0.3)  # fmt: skip


async def connect_ok(service: Service, user: str, last_id: str | None = None) -> SseClient:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    client = await SseClient.open(service.port, f"user={user}", headers=headers)
    event = await client.expect()
    assert event.data == status("ok"), event
    return client


@pytest.mark.timeout(120)
async def test_a_failover_is_followed_and_nothing_published_after_it_is_lost(
    topology: SentinelTopology,
) -> None:
    """Master killed: streams get `error`, readiness drops, the new master serves everything."""
    service = Service(settings(topology.url))
    await service.start()
    try:
        await wait_ready(service)
        await service.broker.grant("1", ["room:1"], b"granted")
        client = await connect_ok(service, "1")
        before = await service.broker.publish("room:1", b"before")
        assert (await client.next_message()).data == "before"
        # Everything so far is on the replica before the master dies.
        assert topology.master().wait(1, 5000) == 1
        topology.processes["master"].kill()
        events = [e for e in await client.until_closed(timeout=15) if not e.is_noop]
        assert [e.data for e in events] == [status("error")]
        assert events[0].retry is not None
        assert await readiness(service) == 503
        await ready_after_promotion(service)
        assert topology.master().connection_pool.connection_kwargs["port"] == (
            topology.replica_port
        )
        publisher = RedisPublisher(topology.url)
        after = await asyncio.to_thread(publisher.publish, "room:1", "after the failover")
        publisher.close()
        client = await connect_ok(service, "1", before.encode().decode())
        message = await client.next_message()
        assert (message.data, message.id) == ("after the failover", after)
        await service.broker.publish("room:1", b"live")
        assert (await client.next_message()).data == "live"
    finally:
        await service.stop()


@pytest.mark.timeout(120)
async def test_ids_the_failover_lost_are_never_handed_out_again(
    topology: SentinelTopology,
) -> None:
    """Messages the old master sent but never replicated are lost with it; a browser that
    got them resumes from their id and still gets everything published afterwards."""
    # The replica follows the master through a proxy that the test can black-hole.
    proxy = TcpProxy(topology.master_port)
    await proxy.start()
    replica = redis.Redis(port=topology.replica_port)
    replica.replicaof("127.0.0.1", proxy.port)
    service = Service(settings(topology.url))
    await service.start()
    try:
        await wait_ready(service)
        await service.broker.grant("1", ["room:1"], b"granted")
        client = await connect_ok(service, "1")
        await service.broker.publish("room:1", b"kept")
        assert (await client.next_message()).data == "kept"
        assert await asyncio.to_thread(topology.master().wait, 1, 10000) == 1
        proxy.blackhole()  # from here on the replica hears nothing, and doesn't know it
        for text in (b"lost 1", b"lost 2"):
            await service.broker.publish("room:1", text)
        got = [await client.next_message() for _ in range(2)]
        assert [m.data for m in got] == ["lost 1", "lost 2"]
        topology.processes["master"].kill()
        await client.until_closed(timeout=15)
        await ready_after_promotion(service)
        publisher = RedisPublisher(topology.url)
        after = [
            await asyncio.to_thread(publisher.publish, "room:1", f"after {n}") for n in range(3)
        ]
        publisher.close()
        client = await connect_ok(service, "1", got[-1].id)
        # (Keep-alives flow meanwhile: a missing message shows as this wait's timeout.)
        resumed = [await asyncio.wait_for(client.next_message(), 10) for _ in range(3)]
        assert [(m.data, m.id) for m in resumed] == [(f"after {n}", after[n]) for n in range(3)]
    finally:
        await service.stop()
        await proxy.close()


async def test_a_sentinel_url_that_names_no_known_master_is_not_ready(
    topology: SentinelTopology,
) -> None:
    """A master name the sentinels don't know: /readyz 503 and streams get `error`."""
    url = topology.url.replace(f"/{MASTER}/", "/nosuchmaster/")
    service = Service(settings(url))
    await service.start()
    try:
        assert await readiness(service) == 503
        client = await SseClient.open(service.port, "user=1")
        assert [e.data for e in await client.until_closed()] == [status("error")]
    finally:
        await service.stop()


@pytest.mark.timeout(120)
async def test_a_demoted_master_that_stays_up_is_left_for_the_new_one(
    topology: SentinelTopology,
) -> None:
    """SENTINEL FAILOVER keeps the old master running as a replica: the service moves anyway."""
    service = Service(settings(topology.url))
    await service.start()
    try:
        await wait_ready(service)
        await service.broker.grant("1", ["room:1"], b"granted")
        client = await connect_ok(service, "1")
        assert topology.master().wait(1, 5000) == 1
        redis.Redis(port=topology.sentinel_ports[0]).sentinel_failover(MASTER)
        events = [e for e in await client.until_closed(timeout=20) if not e.is_noop]
        assert [e.data for e in events][-1:] == [status("error")]
        for _ in range(600):
            port = topology.master().connection_pool.connection_kwargs["port"]
            if port == topology.replica_port and await readiness(service) == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("never ready on the promoted replica")
        client = await connect_ok(service, "1")
        for attempt in range(100):  # the command link may still meet the demoted node once
            try:
                await service.broker.publish("room:1", b"on the new master")
                break
            except BrokerUnavailable:  # a publish during the failover gets 503
                assert attempt < 99
                await asyncio.sleep(0.05)
        assert (await client.next_message()).data == "on the new master"
    finally:
        await service.stop()


async def test_the_async_helper_publishes_through_the_sentinels(topology: SentinelTopology) -> None:
    """AsyncRedisPublisher with a redis+sentinel:// URL reaches the master and sequences."""
    publisher = AsyncRedisPublisher(topology.url)
    try:
        first = await publisher.publish("room:1", "one")
        second = await publisher.publish("room:1", "two")
    finally:
        await publisher.aclose()
    assert int(second.split("-")[1]) == int(first.split("-")[1]) + 1
    assert topology.master().xlen("sisyphus:history:room:1") == 2
