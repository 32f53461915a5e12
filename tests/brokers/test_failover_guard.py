"""The sequence guard against a server that lost writes, on a real Redis."""

from __future__ import annotations

import redis

from sisyphus.brokers import failover
from sisyphus.brokers.lua import SEQUENCE_KEY


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
