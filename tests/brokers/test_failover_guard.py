"""The sequence guard against a server that lost writes, on a real Redis."""

from __future__ import annotations

import pytest
import redis

from sisyphus.brokers import failover
from sisyphus.brokers.lua import SEQUENCE_KEY
from sisyphus.config import Settings
from sisyphus.server.app import Service
from tests.faults.test_broker_faults import wait_ready
from tests.support.redis_server import RedisServer
from tests.support.sse_client import SseClient, status


def run_guard(client: redis.Redis, replid: str) -> int:
    command, script, numkeys, *rest = failover.guard_call(replid)
    assert command == "EVAL"
    result: int = client.eval(script, int(numkeys), *rest)
    return result


def test_the_sequence_jumps_once_when_the_replication_id_changes(
    redis_client: redis.Redis,
) -> None:
    """First sight: stored, no jump. Same id: nothing. A new id (a promoted replica, a
    crash restart): the sequence moves past every id the old server may have handed out,
    once, whichever process sees it first."""
    redis_client.set(SEQUENCE_KEY, 41)
    assert run_guard(redis_client, "a" * 40) == 0
    assert int(redis_client.get(SEQUENCE_KEY) or 0) == 41
    assert run_guard(redis_client, "a" * 40) == 0
    assert run_guard(redis_client, "b" * 40) == 1
    assert int(redis_client.get(SEQUENCE_KEY) or 0) == 41 + failover.SEQUENCE_GAP
    assert run_guard(redis_client, "b" * 40) == 0  # the second process: already done
    assert int(redis_client.get(SEQUENCE_KEY) or 0) == 41 + failover.SEQUENCE_GAP


def test_a_server_without_history_gets_no_jump(redis_client: redis.Redis) -> None:
    """A new id over an empty server (a wiped Redis: its epoch changes anyway)."""
    assert run_guard(redis_client, "a" * 40) == 0
    redis_client.delete(SEQUENCE_KEY)
    assert run_guard(redis_client, "c" * 40) == 0
    assert redis_client.get(SEQUENCE_KEY) is None


def test_the_replication_id_is_read_off_info(redis_client: redis.Redis) -> None:
    raw = redis_client.execute_command("INFO", "replication")
    text = raw if isinstance(raw, str) else "\r\n".join(f"{k}:{v}" for k, v in raw.items())
    found = failover.replication_id(text)
    assert found is not None and len(found) == 40
    assert failover.replication_id("# Replication\r\nrole:master\r\n") is None


async def test_a_user_not_allowed_info_is_served_without_the_guard(
    redis_server: RedisServer, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user without the dangerous commands (INFO among them) gets a ready service
    that streams and publishes; the log says once that the guard is off, and why."""
    redis_client.flushall()
    redis_client.execute_command(
        "ACL", "SETUSER", "limited", "on", ">a-password", "~*", "&*", "+@all", "-@dangerous"
    )
    try:
        url = f"redis://limited:a-password@127.0.0.1:{redis_server.port}/0"
        service = Service(Settings(port=0, redis_url=url, broker_timeout=2.0))
        await service.start()
        try:
            await wait_ready(service)
            redis_client.sadd("user:u:channels", "room")
            client = await SseClient.open(service.port, "user=u")
            assert (await client.expect()).data == status("ok")
            published = await service.broker.publish("room", b"hello")
            event = await client.next_message()
            assert (event.data, event.id) == ("hello", published.encode().decode())
            await client.close()
        finally:
            await service.stop()
        refused = [r for r in caplog.records if "replication history" in r.getMessage()]
        assert len(refused) == 1 and "NOPERM" in refused[0].getMessage()
    finally:
        redis_client.execute_command("ACL", "DELUSER", "limited")
