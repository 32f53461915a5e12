"""Where the Redis master is: a plain URL, or Redis Sentinel naming it.

Owns parsing the broker URL forms (``redis://``, ``rediss://``, ``unix://`` and
``redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``) and finding the
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


@dataclass(frozen=True)
class Topology:
    """The parameters for a data node, and (with Sentinel) whom to ask which node it is."""

    params: dict[str, Any]
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    # The address the last lookup returned (Sentinel only), for logs.
    last_seen: list[tuple[str, int]] = field(default_factory=list, compare=False)

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)


def parse_broker_url(url: str) -> Topology:
    """A broker URL in any supported form; ``ValueError`` says what is wrong with it."""
    if not url.startswith(SENTINEL_SCHEME + "://"):
        return Topology(dict(parse_url(url)))
    parts = urlsplit(url)
    _, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a sentinel must be HOST:PORT, got {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [piece for piece in parts.path.split("/") if piece]
    if not path or len(path) > 2:
        raise ValueError("name the master: redis+sentinel://HOST:PORT[,HOST:PORT...]/NAME[/DB]")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database must be a number, got {path[1]!r}")
    params: dict[str, Any] = {"db": int(path[1]) if len(path) == 2 else 0}
    if parts.password is not None:
        params["password"] = unquote(parts.password)
    if parts.username:
        params["username"] = unquote(parts.username)
    return Topology(params, tuple(sentinels), unquote(path[0]))


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
