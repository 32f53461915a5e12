"""Where the Redis master is: a plain URL, or Redis Sentinel naming it.

Owns parsing the broker URL forms (``redis://``, ``rediss://``, ``unix://``,
``redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]`` and
``redis+cluster://HOST:PORT[,HOST:PORT...]``, whose nodes are where the slot
map is first asked; see :mod:`sisyphus.brokers.slots`) and finding the
connection parameters of the current master before each connect. Following a
failover is the links' job: they ask again whenever they reconnect, and the
broker compares the answer with where its links are.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio.connection import parse_url

from sisyphus.brokers.redis_link import LinkError, ReplyError, RespProtocol, open_link

log = logging.getLogger("sisyphus.redis")

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"


@dataclass(frozen=True)
class Topology:
    """The parameters for a data node, and (with Sentinel) whom to ask which node it is."""

    params: dict[str, Any]
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    # Redis Cluster: the nodes to ask for the slot map (any of them will do).
    cluster_nodes: tuple[tuple[str, int], ...] = ()
    # The address the last lookup returned (Sentinel only), for logs.
    last_seen: list[tuple[str, int]] = field(default_factory=list, compare=False)

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def uses_cluster(self) -> bool:
        return bool(self.cluster_nodes)


def parse_broker_url(url: str) -> Topology:
    """A broker URL in any supported form; ``ValueError`` says what is wrong with it."""
    if url.startswith(CLUSTER_SCHEME + "://"):
        return _parse_cluster_url(url)
    if not url.startswith(SENTINEL_SCHEME + "://"):
        return Topology(dict(parse_url(url)))
    parts = urlsplit(url)
    sentinels = _addresses(parts.netloc, "sentinel")
    path = [piece for piece in parts.path.split("/") if piece]
    if not path or len(path) > 2:
        raise ValueError("name the master: redis+sentinel://HOST:PORT[,HOST:PORT...]/NAME[/DB]")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database must be a number, got {path[1]!r}")
    params: dict[str, Any] = {"db": int(path[1]) if len(path) == 2 else 0, **_credentials(url)}
    return Topology(params, sentinels, unquote(path[0]))


def _parse_cluster_url(url: str) -> Topology:
    parts = urlsplit(url)
    nodes = _addresses(parts.netloc, "cluster node")
    if parts.path.strip("/") not in ("", "0") or parts.query:
        raise ValueError("a cluster URL names nodes only: redis+cluster://HOST:PORT[,HOST:PORT...]")
    return Topology({"db": 0, **_credentials(url)}, cluster_nodes=nodes)


def _addresses(netloc: str, what: str) -> tuple[tuple[str, int], ...]:
    _, _, hosts = netloc.rpartition("@")
    found = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a {what} must be HOST:PORT, got {item!r}")
        found.append((host.strip("[]"), int(port)))
    return tuple(found)


def _credentials(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    found = {}
    if parts.password is not None:
        found["password"] = unquote(parts.password)
    if parts.username:
        found["username"] = unquote(parts.username)
    return found


async def ask_sentinels(topology: Topology, per_sentinel: float) -> tuple[str, int]:
    """The master's address as the first sentinel that answers says; ``OSError`` if none."""
    problems = []
    for host, port in topology.sentinels:
        try:
            link = await open_link({"host": host, "port": port}, RespProtocol, per_sentinel,
                                   select_db=False)  # fmt: skip
        except (LinkError, ReplyError) as exc:
            problems.append(f"{host}:{port}: {exc}")
            continue
        try:
            async with asyncio.timeout(per_sentinel):
                reply = await link.request(
                    "SENTINEL", "get-master-addr-by-name", topology.master_name
                )
        except (LinkError, ReplyError, TimeoutError) as exc:
            problems.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        finally:
            link.abort()
        if reply:
            return reply[0].decode(), int(reply[1])
        problems.append(f"{host}:{port}: no master named {topology.master_name!r}")
    raise OSError("no sentinel named the master: " + "; ".join(problems))


async def locate(topology: Topology, per_sentinel: float) -> dict[str, Any]:
    """The connection parameters of the node to use now."""
    if not topology.uses_sentinel:
        return topology.params
    host, port = await ask_sentinels(topology, per_sentinel)
    if topology.last_seen != [(host, port)]:
        log.info("sentinel: master %s is at %s:%d", topology.master_name, host, port)
        topology.last_seen[:] = [(host, port)]
    # The node must say it is the master: a demoted one is not used.
    return {**topology.params, "host": host, "port": port, "require_master": True}
