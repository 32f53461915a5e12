"""The connect's Redis Cluster reads on redis-py's cluster client beside the service's links,
and how the sequenced publishes spread over the primaries.

    .venv/bin/python bench/cluster_command_path.py [--connects 5000] [--publishes 30000]

SPEC §4 leaves a cluster's topology to the client library unless measured otherwise.
This measures it: a private three-primary cluster (the suite's topology helper), then,
in this one process, the reads a connect makes (each sequence group's position
script, then the user's SMEMBERS) done ``--connects`` times in batches of 100 concurrent connects,
once through ``redis.asyncio.cluster.RedisCluster`` and once through the service's
``ClusterBroker``. Prints the CPU time of this process per connect for each, and the
ratio; the servers' CPU is not counted (it is the same commands either way). Then
``--publishes`` sequenced publishes through the broker on 1,000 channels, 100 at a time,
and each primary's count of publish scripts and its own CPU time for them (INFO).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import redis.asyncio.cluster

sys.path.insert(0, str(Path(__file__).parent.parent))
from tests.support.redis_cluster import ClusterTopology

from sisyphus.brokers.cluster import ClusterBroker
from sisyphus.brokers.groups import GROUPS_KEY, layouts, parse
from sisyphus.brokers.lua import POSITION_SCRIPT
from sisyphus.protocol.names import channels_key

BATCH = 100


async def with_redis_py(url_ports: list[int], connects: int) -> float:
    client = redis.asyncio.cluster.RedisCluster(
        startup_nodes=[redis.asyncio.cluster.ClusterNode("127.0.0.1", p) for p in url_ports]
    )
    script = client.register_script(POSITION_SCRIPT)
    groups = layouts(parse(await client.get(GROUPS_KEY)))  # the service chose them

    async def connect(user: int) -> None:
        # As the service does: every group's position, then the user's set.
        await asyncio.gather(
            *(script(keys=[g.epoch_key, g.sequence_key, g.timeline_key], args=["e1", "3600"])
              for g in groups)
        )  # fmt: skip
        await client.smembers(channels_key(str(user)))

    await connect(0)  # the slot map and the script loaded
    started = time.process_time()
    for first in range(0, connects, BATCH):
        await asyncio.gather(*(connect(user) for user in range(first, first + BATCH)))
    spent = time.process_time() - started
    await client.aclose()
    return spent / connects


async def with_service_links(url: str, connects: int) -> float:
    broker = ClusterBroker(url)
    await broker.start()
    await broker.snapshot("0")
    started = time.process_time()
    for first in range(0, connects, BATCH):
        await asyncio.gather(*(broker.snapshot(str(user)) for user in range(first, first + BATCH)))
    spent = time.process_time() - started
    await broker.close()
    return spent / connects


async def publish_spread(url: str, publishes: int) -> None:
    broker = ClusterBroker(url)
    await broker.start()
    for first in range(0, publishes, BATCH):
        await asyncio.gather(
            *(broker.publish(f"room:{n % 1000}", b"x") for n in range(first, first + BATCH))
        )
    await broker.close()


def script_figures(cluster: ClusterTopology) -> list[tuple[int, int, float]]:
    """Per primary: (port, scripts run, their CPU seconds)."""
    figures = []
    for port in cluster.primary_ports():
        stats = cluster.client(port).info("commandstats")
        calls = sum(
            v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
        )
        usec = sum(v["usec"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
        figures.append((port, calls, usec / 1e6))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=5000)
    parser.add_argument("--publishes", type=int, default=30000)
    args = parser.parse_args()
    with ClusterTopology(primaries=3) as cluster:
        for user in range(args.connects):
            key = channels_key(str(user))
            cluster.command(cluster.primary_for_slot(cluster.slot_of(key)), "SADD", key, "room:1")
        links = asyncio.run(with_service_links(cluster.url, args.connects))
        library = asyncio.run(with_redis_py(cluster.primary_ports(), args.connects))
        before = script_figures(cluster)
        asyncio.run(publish_spread(cluster.url, args.publishes))
        after = script_figures(cluster)
    print(f"connect reads on a 3-primary cluster, {args.connects} connects, CPU of this process:")
    print(f"  redis.asyncio.cluster.RedisCluster: {library * 1e6:7.1f} us per connect")
    print(f"  the service's ClusterBroker:        {links * 1e6:7.1f} us per connect")
    print(f"  ratio (library / service links):    {library / links:7.2f}")
    print(f"{args.publishes} sequenced publishes on 1,000 channels, per primary (the scripts")
    print("include the first publish's reads of the other groups' positions):")
    for (port, calls, cpu), (_, calls0, cpu0) in zip(after, before, strict=True):
        print(f"  primary :{port}: {calls - calls0:7d} scripts, {cpu - cpu0:6.2f} s of its CPU")


if __name__ == "__main__":
    main()
