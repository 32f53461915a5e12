"""Which Redis Cluster node serves each key and shard channel.

Owns the slot map (slot -> primary's address), asking a node for it (``CLUSTER
SLOTS``, answered by every Redis from 3.0 and Valkey), and reading a redirection
(``MOVED``/``ASK``) out of an error. Keys and shard channels hash alike (CRC16 of
the hash tag, or of the whole name), so one map routes both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

from redis.crc import key_slot

from sisyphus.brokers.redis_link import LinkError, ReplyError, RespProtocol, open_link

log = logging.getLogger("sisyphus.redis")

SLOT_COUNT = 16384

Address = tuple[str, int]


def slot_of(name: str | bytes) -> int:
    """The hash slot of a key or shard channel name."""
    return key_slot(name.encode() if isinstance(name, str) else name)


class SlotMap:
    """Slot -> the address of the primary serving it (``None`` while unassigned)."""

    def __init__(self, owners: list[Address | None]) -> None:
        if len(owners) != SLOT_COUNT:
            raise ValueError(f"a slot map has {SLOT_COUNT} slots")
        self._owners = owners

    @classmethod
    def from_cluster_slots(cls, reply: Iterable[Any], asked: Address) -> SlotMap:
        """A ``CLUSTER SLOTS`` answer; a node that names no host of its own (an empty or
        ``?`` endpoint) is on the host that was asked."""
        owners: list[Address | None] = [None] * SLOT_COUNT
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            if host in ("", "?"):
                host = asked[0]
            address = (host, int(primary[1]))
            owners[start : end + 1] = [address] * (end - start + 1)
        return cls(owners)

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int, Address]]) -> SlotMap:
        """(first slot, last slot, primary) ranges, as a client library reports them."""
        owners: list[Address | None] = [None] * SLOT_COUNT
        for start, end, address in ranges:
            owners[start : end + 1] = [address] * (end - start + 1)
        return cls(owners)

    def node_for(self, name: str | bytes) -> Address | None:
        return self._owners[slot_of(name)]

    def owner(self, slot: int) -> Address | None:
        return self._owners[slot]

    def first_slot(self, address: Address) -> int:
        """The lowest slot ``address`` serves (``SLOT_COUNT`` if none): orders primaries."""
        return next((i for i, o in enumerate(self._owners) if o == address), SLOT_COUNT)

    def assign(self, slot: int, address: Address) -> None:
        """A ``MOVED`` says where one slot is now (the rest is asked again later)."""
        self._owners[slot] = address

    @property
    def complete(self) -> bool:
        return all(owner is not None for owner in self._owners)

    def primaries(self) -> set[Address]:
        return {owner for owner in self._owners if owner is not None}


class Redirect(NamedTuple):
    asking: bool  # ASK (one command, during a migration) rather than MOVED
    slot: int
    address: Address


def redirect_of(error: ReplyError | str) -> Redirect | None:
    """``MOVED 3999 127.0.0.1:6381`` or ``ASK 3999 127.0.0.1:6381``; ``None`` for any
    other error."""
    words = str(error).split()
    if len(words) != 3 or words[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = words[2].rpartition(":")
    if not words[1].isdigit() or not port.isdigit():
        return None
    return Redirect(words[0] == "ASK", int(words[1]), (host.strip("[]"), int(port)))


async def discover(nodes: Iterable[Address], params: dict[str, Any], per_node: float) -> SlotMap:
    """The slot map as the first node that answers with every slot assigned says it;
    ``LinkError`` naming every node's problem if none does."""
    problems = []
    for host, port in nodes:
        try:
            link = await open_link({**params, "host": host, "port": port}, RespProtocol,
                                   per_node, select_db=False)  # fmt: skip
        except (LinkError, ReplyError) as exc:
            problems.append(f"{host}:{port}: {exc}")
            continue
        try:
            async with asyncio.timeout(per_node):
                reply = await link.request("CLUSTER", "SLOTS")
            found = SlotMap.from_cluster_slots(reply, (host, port))
        except (LinkError, ReplyError, TimeoutError, ValueError, IndexError) as exc:
            problems.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        finally:
            link.abort()
        if found.complete:
            return found
        problems.append(f"{host}:{port}: not every slot is served")
    raise LinkError("no cluster node gave the slot map: " + "; ".join(problems))
