"""The Redis Cluster broker: sharded pub/sub, one link per shard that holds channels.

Owns: the slot map, one pub/sub link per primary that serves a subscribed channel
(``SSUBSCRIBE``/``SUNSUBSCRIBE``, reference-counted by the hub as on one Redis),
one command link per primary the service asks, and following the cluster when it
changes.

Layout: the channels are spread over sequence groups (see
:mod:`sisyphus.brokers.groups`), each with its sequence, histories and envelopes'
shard channels in one slot, so every script touches one slot and one link hears each
group's sequenced messages in seq order; ids carry one seq per group. A channel's
plain shard channel (the main application's ``SPUBLISH``) and users' sets
(``user:<id>:channels``) live where their names hash.

Following the cluster: a pub/sub link that is lost or stops answering, a shard
channel the server unsubscribes by itself (its slot moved, or its primary was
demoted), or a ``MOVED`` answer to a subscription, all end the whole pub/sub side at
once: every stream gets `error` with its `retry:` and resumes by id, while the
broker asks for the slot map again and subscribes everything where it now lives.
That is the same path as a lost link on one Redis, so nothing is ever half-heard.
Commands follow ``MOVED`` and ``ASK`` by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Iterable, Sequence, Set
from typing import Any, TypeVar

import hiredis

from sisyphus.brokers import backoff, failover, groups, subscriptions
from sisyphus.brokers.base import LostHandler, MessageHandler, Position, drop_message, ignore_loss
from sisyphus.brokers.lua import (
    HISTORY_SCRIPT,
    POSITION_SCRIPT,
    REWIND_SCRIPT,
    KeyLayout,
    history_reply,
    parse_envelope,
    publish_call,
)
from sisyphus.brokers.memory import new_epoch
from sisyphus.brokers.redis_link import (
    CommandLink,
    LinkError,
    ReplyError,
    RespProtocol,
    decode_members,
    open_link,
    retrieve,
)
from sisyphus.brokers.slots import Address, SlotMap, discover, redirect_of
from sisyphus.brokers.topology import parse_broker_url
from sisyphus.errors import BrokerUnavailable
from sisyphus.protocol.names import channels_key, user_channel
from sisyphus.protocol.resume import (
    OVER_BUDGET,
    ChannelHistory,
    EventId,
    Seqs,
    channel_group,
    history_name,
)

log = logging.getLogger("sisyphus.redis")

T = TypeVar("T")

# Envelopes' shard channels are "{sisyphus.<n>}:seq <channel>" (no channel has a space).
_SEQUENCED_START = b"{sisyphus."
_SEQUENCED_MARK = b"}:seq "
# How often a command follows a redirection before giving up (a slot moving twice).
_REDIRECTS = 3
# A multi-key script during a slot's migration answers TRYAGAIN: wait this long.
_TRYAGAIN_DELAY = 0.05


def _busy(error: ReplyError) -> bool:
    """A refusal that passes by itself: a multi-key command during a slot's migration,
    or a cluster that is electing a new primary."""
    return str(error).startswith(("TRYAGAIN", "CLUSTERDOWN"))


class _ShardLink(RespProtocol):
    """A pub/sub link to one primary: shard messages and (un)subscriptions go to the
    broker, PONGs to their PING; any error answer ends it (a ``MOVED`` included)."""

    def __init__(self, broker: ClusterBroker, address: Address) -> None:
        super().__init__()
        self._broker = broker
        self.address = address
        self.established = False

    def on_reply(self, reply: Any) -> None:
        if type(reply) is list:
            kind = reply[0]
            if kind == b"smessage":
                self._broker._on_shard_message(reply[1], reply[2])
                return
            if kind == b"ssubscribe" or kind == b"sunsubscribe":
                self._broker._on_confirmation(self, kind, reply[1].decode("utf-8", "replace"))
                return
            if kind == b"pong":
                self.answer(b"PONG")
                return
        if self.established and isinstance(reply, hiredis.ReplyError):
            log.error("redis cluster %s:%d pub/sub error: %s", *self.address, reply)
            self._broker._lose(f"{self.address[0]}:{self.address[1]} answered {reply}")
            return
        self.answer(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._broker._on_link_lost(self)


class ClusterBroker:
    name = "redis-cluster"

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        history_size: int = 1000,
        history_max_age: float = 3600.0,
        ping_interval: float = 5.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        linger: float = 0.0,
    ) -> None:
        topology = parse_broker_url(url)
        if not topology.uses_cluster:
            raise ValueError("a Redis Cluster URL is redis+cluster://HOST:PORT[,HOST:PORT...]")
        self._seeds = topology.cluster_nodes
        self._params = topology.params
        self._timeout = timeout
        self._history_size = history_size
        self._history_max_age = history_max_age
        self._ping_interval = ping_interval
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._linger = linger
        self._map: SlotMap | None = None
        self._map_refresh: asyncio.Task[None] | None = None
        # Command links: one per primary asked, plus each group's own (which checks the
        # failover guard whenever it connects, wherever the group's slot has gone).
        self._commands: dict[Address, CommandLink] = {}
        # The sequence groups, once read from the cluster (fixed for the process's life
        # unless the cluster's record of them changes), and each group's link.
        self._layouts: list[KeyLayout] = []
        self._sequences: list[CommandLink] = []
        # Per group's tag, its index; and the latest (epoch, seq) this process knows of
        # in each group (heard or read): the other groups' part of a publish's id.
        self._group_of_tag: dict[bytes, int] = {}
        self._known: list[tuple[bytes, int] | None] = []
        # Hub channels wanted (the Redis names depend on the groups, known at connect).
        self._channels: set[str] = set()
        self._probe: asyncio.Task[None] | None = None
        self._on_message: MessageHandler = drop_message
        self._on_lost: LostHandler = ignore_loss
        self._closing = False
        # The pub/sub side: up once the map is known; its links, by primary, once their
        # handshake answered, and the ones being opened with the names waiting for them.
        self._up = False
        self._links: dict[Address, _ShardLink] = {}
        self._idle: set[Address] = set()  # links that carried no channel at the last tick
        # Names whose SUNSUBSCRIBE is on its way, with the link it went on.
        self._leaving: dict[str, Address] = {}
        self._opening: dict[Address, list[str]] = {}
        self._generation = 0  # bumped at every loss: a link opened for an older one is dropped
        self._reconnect_task: asyncio.Task[None] | None = None
        self._failures = 0
        self._last_ping = 0.0
        # As on one Redis: shard channels wanted, replies due, confirmations (numbered),
        # lingering hub channels, and who waits for which confirmation.
        self._wanted: set[str] = set()
        self._home: dict[str, Address] = {}  # where each wanted name was subscribed
        self._outstanding: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self._confirmations = 0
        self._lingering: dict[str, float] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.reconnects = 0
        self.malformed = 0
        self._unguarded = False

    def bind(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        self._on_message = on_message
        self._on_lost = on_lost

    # Lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self._connect()
        except BrokerUnavailable as exc:
            log.warning("redis cluster unavailable at start (%s); retrying in the background", exc)
            self._schedule_reconnect()

    async def close(self) -> None:
        self._closing = True
        for task in (self._reconnect_task, self._probe, self._map_refresh):
            if task is not None:
                task.cancel()
        for link in list(self._links.values()):
            link.abort()
        self._links.clear()
        self._fail_waiters()
        for command_link in (*self._sequences, *self._commands.values()):
            command_link.close()

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def ready(self) -> bool:
        """The map is known, every wanted channel is confirmed, and the sequence's
        primary answers."""
        return (
            self._up
            and not self._opening
            and self._confirmed.keys() == self._wanted
            and all(link.healthy for link in self._sequences)
        )

    def tick(self, now: float) -> None:
        """Each link's own timeout and idle PINGs, as on one Redis."""
        if self._lingering:
            self._end_lingering(now)
        ping = now - self._last_ping >= self._ping_interval
        if ping:
            self._last_ping = now
            if self._up:
                self._close_idle_links()
        for link in list(self._links.values()):
            if link.overdue(now, self._timeout):
                log.error("redis cluster %s:%d: no answer in %.1f s", *link.address, self._timeout)
                self._lose(f"{link.address[0]}:{link.address[1]} stopped answering")
                break
            if ping and not link.pending:
                link.request("PING").add_done_callback(retrieve)
        for command_link in (*self._sequences, *self._commands.values()):
            command_link.check(now)
            command_link.ping(now, self._ping_interval)
        unhealthy = [link for link in self._sequences if not link.healthy]
        if unhealthy and self._probe is None and not self._closing:
            self._probe = asyncio.get_running_loop().create_task(self._probe_sequences(unhealthy))

    def _close_idle_links(self) -> None:
        """A shard link that carried no channel for a whole ping interval is closed: a
        process holds links only to the primaries that serve what it reads."""
        homes = set(self._home.values())
        for address, link in list(self._links.items()):
            if address in homes or address in self._opening or link.pending:
                self._idle.discard(address)
            elif address not in self._idle:
                self._idle.add(address)  # idle since this tick: closed at the next
            else:
                self._idle.discard(address)
                del self._links[address]  # first: its loss is not the broker's loss
                link.abort()
                # Unsubscriptions it still owed an answer to will never get one.
                for name in [n for n, at in self._leaving.items() if at == address]:
                    del self._leaving[name]
                    self._outstanding.pop(name, None)

    async def _probe_sequences(self, links: list[CommandLink]) -> None:
        try:
            await asyncio.gather(*(link.call("PING") for link in links))
        except (LinkError, ReplyError, OSError) as exc:
            log.debug("redis cluster sequence link probe failed: %s", exc)
            self._refresh_map_soon()
        finally:
            self._probe = None

    # The slot map ----------------------------------------------------------
    async def _discover(self) -> SlotMap:
        known = self._map.primaries() if self._map is not None else set()
        # The URL's nodes first, then every primary seen since (the URL's may be gone).
        nodes = list(dict.fromkeys([*self._seeds, *sorted(known)]))
        try:
            found = await discover(nodes, self._params, self._timeout)
        except LinkError as exc:
            raise BrokerUnavailable(str(exc)) from None
        self._map = found
        return found

    def _refresh_map_soon(self) -> None:
        """Ask for the map again in the background (after a MOVED, a failed link)."""
        if self._map_refresh is not None or self._closing:
            return

        async def refresh() -> None:
            try:
                await self._discover()
            except BrokerUnavailable as exc:
                log.warning("redis cluster: %s", exc)
            finally:
                self._map_refresh = None

        self._map_refresh = asyncio.get_running_loop().create_task(refresh())

    def _params_at(self, address: Address) -> dict[str, Any]:
        return {**self._params, "host": address[0], "port": address[1]}

    def _sequence_link(self, layout: KeyLayout) -> CommandLink:
        """A link that goes wherever the group's slot is served, guarded when it opens."""

        async def locate() -> dict[str, Any]:
            found = self._map if self._map is not None else await self._discover()
            address = found.node_for(layout.sequence_key)
            if address is None:
                raise LinkError("no primary serves the sequence's slot")
            return self._params_at(address)

        async def guard(link: RespProtocol) -> None:
            await self._guard(link, layout)

        return CommandLink(
            locate, self._timeout, self._backoff_base, self._backoff_cap, on_open=guard
        )

    async def _guard(self, link: RespProtocol, layout: KeyLayout) -> None:
        """A group's primary: if its history diverged, no id may be reused."""
        try:
            replid = failover.replication_id(await link.request("INFO", "replication"))
            if replid is None:
                return
            jumped = await link.request(*failover.guard_call(replid, layout))
        except ReplyError as exc:
            if redirect_of(exc) is not None:
                raise  # the slot moved since the map was read: this link is not the one
            if not self._unguarded:
                self._unguarded = True
                log.warning(
                    "redis cluster: can't check the server's replication history (%s): after "
                    "a failover that lost writes, ids may be handed out twice; allow INFO and "
                    "the key %s to the service's user",
                    exc,
                    layout.replication_id_key,
                )
            return
        if jumped:
            log.warning(
                "redis cluster: the sequence's primary has a new replication history (a "
                "failover that may have lost writes): ids continue %d further on",
                failover.SEQUENCE_GAP,
            )

    # The pub/sub side --------------------------------------------------------
    async def _connect(self) -> None:
        """Learn the map, then open the links the wanted channels need and subscribe."""
        found = await self._discover()
        await self._load_groups()
        if self._closing:
            return
        self._up = True
        self._outstanding.clear()
        self._confirmed.clear()
        self._home.clear()
        self._leaving.clear()
        self._channels.difference_update(self._lingering)
        self._lingering.clear()
        self._wanted = set(self._names(self._channels))
        self._route(sorted(self._wanted), found)
        log.info("redis cluster pub/sub connected channels=%d", len(self._channels))

    async def _load_groups(self) -> None:
        """The cluster's sequence groups, chosen here if nobody did yet."""
        try:
            stored = await self._routed(groups.GROUPS_KEY, ("GET", groups.GROUPS_KEY))
            if stored is None:
                found = self._map if self._map is not None else await self._discover()
                tags = groups.initial_tags(found)
                await self._routed(
                    groups.GROUPS_KEY, ("SET", groups.GROUPS_KEY, groups.encode(tags), "NX")
                )
                stored = await self._routed(groups.GROUPS_KEY, ("GET", groups.GROUPS_KEY))
            tags = groups.parse(stored)
        except (ReplyError, groups.GroupsError) as exc:
            raise BrokerUnavailable(f"redis cluster: the sequence groups: {exc}") from None
        if [layout.prefix for layout in self._layouts] == tags:
            return
        if self._layouts:
            log.error("redis cluster: the sequence groups changed to %s", groups.encode(tags))
        for link in self._sequences:
            link.close()
        self._layouts = groups.layouts(tags)
        self._group_of_tag = {tag.encode(): index for index, tag in enumerate(tags)}
        self._known = [None] * len(tags)
        self._sequences = [self._sequence_link(layout) for layout in self._layouts]
        log.info("redis cluster: %d sequence groups", len(tags))

    def _group(self, channel: str) -> int:
        return channel_group(channel, len(self._layouts))

    def _names(self, channels: Iterable[str]) -> list[str]:
        """The shard channels behind hub channels: the plain one and its group's
        sequenced one."""
        channels = list(channels)
        layouts = self._layouts
        if not layouts:
            return []
        return channels + [layouts[self._group(c)].sequenced_channel(c) for c in channels]

    def _route(self, names: list[str], found: SlotMap) -> None:
        """Subscribe each name on the primary that serves it, opening links as needed."""
        by_node: dict[Address, list[str]] = {}
        for name in names:
            address = found.node_for(name)
            if address is None:
                self._lose(f"no primary serves the slot of {name!r}")
                return
            by_node.setdefault(address, []).append(name)
        for address, group in by_node.items():
            link = self._links.get(address)
            if link is not None:
                self._send_subscriptions(link, "SSUBSCRIBE", group)
            elif address in self._opening:
                self._opening[address].extend(group)
            else:
                self._opening[address] = group
                asyncio.get_running_loop().create_task(self._open(address, self._generation))

    async def _open(self, address: Address, generation: int) -> None:
        try:
            link = await open_link(
                self._params_at(address),
                lambda: _ShardLink(self, address),
                self._timeout,
                select_db=False,
            )
        except (LinkError, ReplyError) as exc:
            if generation == self._generation:
                self._lose(f"can't open pub/sub at {address[0]}:{address[1]}: {exc}")
            return
        if generation != self._generation or self._closing or link.closed:
            link.abort()
            if generation == self._generation and not self._closing:
                self._lose(f"pub/sub at {address[0]}:{address[1]} lost during its set-up")
            return
        link.established = True
        self._links[address] = link
        names = [name for name in self._opening.pop(address, []) if name in self._wanted]
        self._send_subscriptions(link, "SSUBSCRIBE", names)

    def _send_subscriptions(self, link: _ShardLink, verb: str, names: list[str]) -> None:
        # A shard subscription names channels of one slot: one command per channel.
        for name in names:
            self._outstanding[name] = self._outstanding.get(name, 0) + 1
            if verb == "SSUBSCRIBE":
                self._home[name] = link.address
            link.send((verb, name))

    def _lose(self, reason: str) -> None:
        """End the whole pub/sub side; streams resume by id once it is back."""
        if not self._up:
            return
        self._up = False
        self._failures += 1  # a subscription confirmed again resets it
        self._generation += 1
        links, self._links = self._links, {}
        self._idle.clear()
        self._opening.clear()
        self._home.clear()
        self._leaving.clear()
        self._confirmed.clear()
        self._outstanding.clear()
        for link in links.values():
            link.abort()
        self._fail_waiters()
        if self._closing:
            return
        log.error("redis cluster pub/sub: %s; reconnecting", reason)
        self._schedule_reconnect()
        try:
            self._on_lost()
        except Exception:
            log.exception("a listener of the broker's loss failed")

    def _on_link_lost(self, link: _ShardLink) -> None:
        if self._links.get(link.address) is link:
            self._lose(f"pub/sub connection to {link.address[0]}:{link.address[1]} lost")

    def _schedule_reconnect(self) -> None:
        if self._closing or self._reconnect_task is not None:
            return
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            while not self._closing:
                await asyncio.sleep(
                    backoff.delay(
                        self._failures, self._backoff_base, self._backoff_cap, random.random
                    )
                )
                try:
                    await self._connect()
                except BrokerUnavailable as exc:
                    self._failures += 1
                    log.warning(
                        "redis cluster reconnect attempt=%d failed: %s", self._failures, exc
                    )
                    continue
                if not self._up and not self._closing:
                    continue  # lost again while subscribing: this task tries again
                self.reconnects += 1
                return
        finally:
            self._reconnect_task = None

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        subscriptions.fail_all(waiters, "redis cluster pub/sub connection lost")

    def subscribe(self, channels: list[str]) -> None:
        lingering = self._lingering
        if lingering:
            channels = [channel for channel in channels if lingering.pop(channel, None) is None]
            if not channels:
                return
        self._channels.update(channels)
        names = self._names(channels)
        self._wanted.update(names)
        if self._up and self._map is not None:
            self._route(names, self._map)

    def unsubscribe(self, channels: list[str]) -> None:
        if self._linger > 0:
            deadline = asyncio.get_running_loop().time() + self._linger
            for channel in channels:
                self._lingering[channel] = deadline
            return
        self._drop(channels)

    def _end_lingering(self, now: float) -> None:
        ended = subscriptions.pop_expired(self._lingering, now)
        if ended:
            self._drop(ended)

    def _drop(self, channels: list[str]) -> None:
        self._channels.difference_update(channels)
        names = self._names(channels)
        self._wanted.difference_update(names)
        for name in names:
            self._confirmed.pop(name, None)
            subscriptions.release(self._waiters, name)
            address = self._home.pop(name, None)
            link = self._links.get(address) if address is not None else None
            if link is not None:
                self._outstanding[name] = self._outstanding.get(name, 0) + 1
                self._leaving[name] = link.address
                link.send(("SUNSUBSCRIBE", name))

    def _on_confirmation(self, link: _ShardLink, kind: bytes, name: str) -> None:
        if self._links.get(link.address) is not link:
            return  # a link of an ended generation
        due = self._outstanding.get(name, 0)
        if due <= 0:
            if kind == b"sunsubscribe" and name in self._wanted:
                # Unasked: the server gave the channel's slot away (a migration, a failover).
                self._lose(f"{link.address[0]}:{link.address[1]} no longer serves {name!r}")
            return
        if due > 1:
            self._outstanding[name] = due - 1
            return
        del self._outstanding[name]
        self._leaving.pop(name, None)
        if kind == b"ssubscribe" and name in self._wanted:
            self._failures = 0  # a real round trip on the pub/sub side
            self._confirmations += 1
            self._confirmed[name] = self._confirmations
            subscriptions.release(self._waiters, name)

    def confirmed_before(self, channels: Iterable[str], position: Position) -> bool:
        mark = position.confirmations
        if mark <= 0 or not self._layouts:
            return False
        confirmed = self._confirmed
        for name in self._names(channels):
            number = confirmed.get(name)
            if number is None or number > mark:
                return False
        return True

    async def wait_subscribed(self, channels: Iterable[str]) -> None:
        if not self._up:
            raise BrokerUnavailable("redis cluster pub/sub is not connected")
        loop = asyncio.get_running_loop()
        futures = []
        for name in self._names(channels):
            if name not in self._confirmed:
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(name, []).append(future)
                futures.append(future)
        if futures:
            await asyncio.gather(*futures)

    async def barrier(self) -> None:
        """PING on every pub/sub link: each PONG comes after every message published
        before on its shard."""
        if not self._up:
            raise BrokerUnavailable("redis cluster pub/sub is not connected")
        try:
            await asyncio.gather(*(link.request("PING") for link in list(self._links.values())))
        except (LinkError, ReplyError) as exc:
            raise BrokerUnavailable(f"redis cluster pub/sub: {exc}") from None

    def _on_shard_message(self, name: bytes, payload: bytes) -> None:
        mark = name.find(_SEQUENCED_MARK) if name.startswith(_SEQUENCED_START) else -1
        if mark > 0:
            envelope = parse_envelope(payload)
            if envelope is None:
                self.malformed = subscriptions.count_malformed(self.malformed, name)
                return
            epoch, seq, time, body = envelope
            group = self._group_of_tag.get(name[: mark + 1])
            if group is not None:
                self._learn(group, epoch, seq)
            channel = name[mark + len(_SEQUENCED_MARK) :].decode("utf-8", "replace")
            self._on_message(channel, body, seq, epoch, time)
            return
        self._on_message(name.decode("utf-8", "replace"), payload, None, None, 0)

    # Commands --------------------------------------------------------------
    def _command_link(self, address: Address) -> CommandLink:
        link = self._commands.get(address)
        if link is None:
            params = self._params_at(address)

            async def locate() -> dict[str, Any]:
                return params

            link = self._commands[address] = CommandLink(
                locate, self._timeout, self._backoff_base, self._backoff_cap
            )
        return link

    async def _routed(self, key: str, command: tuple[Any, ...]) -> Any:
        """``command`` on the primary serving ``key``, following redirections; Redis's
        own refusals stay :class:`ReplyError`."""
        found = self._map if self._map is not None else await self._discover()
        address = found.node_for(key)
        asking = False
        for _ in range(_REDIRECTS):
            if address is None:
                raise BrokerUnavailable("redis cluster: no primary serves the key's slot")
            link = self._command_link(address)
            try:
                if not asking:
                    return await self._call(link.call(*command))
                # ASKING holds for the next command on the connection: both in one write.
                _, reply = await self._call(link.call_all([("ASKING",), command]))
                if isinstance(reply, ReplyError):
                    raise reply
                return reply
            except ReplyError as exc:
                redirect = redirect_of(exc)
                if redirect is None:
                    if not _busy(exc):
                        raise
                    await asyncio.sleep(_TRYAGAIN_DELAY)
                    continue
                address, asking = redirect.address, redirect.asking
                if not asking:
                    found.assign(redirect.slot, redirect.address)
                    self._refresh_map_soon()
        raise BrokerUnavailable("redis cluster: the key's slot kept moving; try again")

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """Link failures become BrokerUnavailable; Redis's own answers stay ReplyError."""
        try:
            return await awaitable
        except (LinkError, OSError) as exc:
            self._refresh_map_soon()
            raise BrokerUnavailable(f"redis command failed: {exc or type(exc).__name__}") from None

    async def _script(self, group: int, body: str, keys: list[str], args: list[Any]) -> Any:
        """A script on a group's slot, on the group's link; a redirection means the slot
        moved (the link is replaced) or is moving (the script follows the ASK once)."""
        link = self._sequences[group]
        for _ in range(_REDIRECTS):
            try:
                return await self._call(link.script(body, keys, args))
            except ReplyError as exc:
                redirect = redirect_of(exc)
                if redirect is not None and redirect.asking:
                    return await self._routed_script(redirect.address, body, keys, args)
                if redirect is not None or str(exc).startswith("READONLY"):
                    link.close()
                    await self._discover()
                    continue
                if _busy(exc):
                    await asyncio.sleep(_TRYAGAIN_DELAY)
                    continue
                raise BrokerUnavailable(f"redis refused a command: {exc}") from None
        raise BrokerUnavailable("redis cluster: the sequence's slot kept moving; try again")

    async def _known_groups(self) -> list[KeyLayout]:
        """The groups; read from the cluster first if this process hasn't yet (a publish
        while the pub/sub side is still connecting)."""
        if not self._layouts:
            await self._discover()
            await self._load_groups()
        return self._layouts

    async def _routed_script(
        self, address: Address, body: str, keys: list[str], args: list[Any]
    ) -> Any:
        link = self._command_link(address)
        command = ("EVAL", body, len(keys), *keys, *args)
        _, reply = await self._call(link.call_all([("ASKING",), command]))
        if isinstance(reply, ReplyError):
            raise BrokerUnavailable(f"redis refused a command: {reply}")
        return reply

    def user_channels_now(self, user_id: str) -> tuple[bool, Set[str] | None]:
        return False, None  # sets live on other shards than their notices: always read

    def held_snapshot(self, user_id: str) -> tuple[Set[str] | None, Position] | None:
        return None

    async def user_channels_many(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        return list(await asyncio.gather(*(self._user_channels(u) for u in user_ids)))

    async def _user_channels(self, user_id: str) -> set[str] | None:
        key = channels_key(user_id)
        try:
            reply = await self._routed(key, ("SMEMBERS", key))
        except ReplyError as exc:
            if "WRONGTYPE" not in str(exc):
                raise BrokerUnavailable(f"redis refused a command: {exc}") from None
            log.warning("%s is not a SET: user=%s treated as unknown", key, user_id)
            return None
        return decode_members(reply)

    async def snapshot(self, user_id: str) -> tuple[Set[str] | None, Position]:
        # The position first, then the set: a grant between the two reads is then
        # replayed to the stream (harmless), never missed with the set before it.
        confirmations = self._confirmations
        position = await self._read_position(confirmations)
        return await self._user_channels(user_id), position

    async def _read_position(self, confirmations: int = 0) -> Position:
        layouts = await self._known_groups()
        reads = await asyncio.gather(*(self._group_position(g) for g in range(len(layouts))))
        epochs = tuple(epoch for epoch, _, _ in reads)
        return Position(
            history_name(epochs),
            tuple(seq for _, seq, _ in reads),
            tuple(oldest for _, _, oldest in reads),
            confirmations,
            epochs,
        )

    async def _group_position(self, group: int) -> tuple[str, int, int]:
        """A group's history name, last seq and retention edge."""
        layout = self._layouts[group]
        keys = [layout.epoch_key, layout.sequence_key, layout.timeline_key]
        args = [new_epoch(), str(int(self._history_max_age))]
        epoch, seq, oldest = await self._script(group, POSITION_SCRIPT, keys, args)
        self._learn(group, epoch, int(seq))
        return epoch.decode(), int(seq), int(oldest)

    def _learn(self, group: int, epoch: bytes, seq: int) -> None:
        known = self._known[group]
        if known is None or known[0] != epoch or seq > known[1]:
            self._known[group] = (epoch, seq)

    async def position(self) -> Position:
        return await self._read_position()

    async def history(
        self,
        channels: Iterable[str],
        after: Seqs,
        limit: int,
        max_bytes: int,
        not_before: int | None = None,
    ) -> list[ChannelHistory]:
        by_group: dict[int, list[str]] = {}
        for channel in channels:
            by_group.setdefault(self._group(channel), []).append(channel)
        # Each group's read is bounded as a whole replay would be; the merged replay is
        # bounded again by the caller.
        answers = await asyncio.gather(
            *(self._group_history(g, group_channels, after[g], limit, max_bytes, not_before)
              for g, group_channels in by_group.items())
        )  # fmt: skip
        if any(answer is OVER_BUDGET for answer in answers):
            return OVER_BUDGET
        return [history for answer in answers for history in answer]

    async def _group_history(
        self,
        group: int,
        channels: list[str],
        after: int,
        limit: int,
        max_bytes: int,
        not_before: int | None,
    ) -> list[ChannelHistory]:
        layout = self._layouts[group]
        if not_before is not None:
            rewound = await self._script(
                group, REWIND_SCRIPT, [layout.timeline_key, layout.sequence_key], [not_before]
            )
            after = min(after, int(rewound))
        keys = [layout.sequence_key, *(layout.history_key(channel) for channel in channels)]
        reply = await self._script(group, HISTORY_SCRIPT, keys, [after, limit, max_bytes])
        return history_reply(channels, reply, group)

    async def publish(self, channel: str, payload: bytes) -> EventId:
        return await self._sequenced(channel, payload)

    async def grant(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        await self._change_set("SADD", user_id, channels)
        return await self._sequenced(user_channel(user_id), notice)

    async def revoke(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        await self._change_set("SREM", user_id, channels)
        return await self._sequenced(user_channel(user_id), notice)

    async def _change_set(self, verb: str, user_id: str, channels: list[str]) -> None:
        # The set is in its own slot: changed first, then announced (as the seed's
        # contract does it), never announced before it changed.
        key = channels_key(user_id)
        try:
            await self._routed(key, (verb, key, *channels))
        except ReplyError as exc:
            raise BrokerUnavailable(f"redis refused a command: {exc}") from None

    async def _sequenced(self, channel: str, payload: bytes) -> EventId:
        """Publish in the channel's group. The id: the message's seq in its group, and in
        each other group the latest seq this process knows of there (heard, or read once
        if none): a stream given this id resumes after this message, and after what the
        other groups had published by then or a little before (never after)."""
        layouts = await self._known_groups()
        group = self._group(channel)
        layout = layouts[group]
        keys, args = publish_call(
            channel, payload, self._history_size, self._history_max_age, new_epoch(),
            layout=layout,
        )  # fmt: skip
        unknown = [g for g, known in enumerate(self._known) if known is None and g != group]
        published, *_ = await asyncio.gather(
            self._script(group, layout.publish_script, keys, args),
            *(self._group_position(g) for g in unknown),
        )
        epoch, seq, time = published
        self._learn(group, epoch, int(seq))
        parts = [known or (b"", 0) for known in self._known]
        parts[group] = (epoch, int(seq))
        return EventId(
            history_name([e.decode() for e, _ in parts]), tuple(s for _, s in parts), int(time)
        )
