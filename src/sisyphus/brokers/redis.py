"""The Redis/Valkey broker: the original contract, one pub/sub connection per process.

Owns: the single pub/sub connection (a lean asyncio protocol on hiredis's
parser, so each message goes from the socket to the hub without a coroutine),
which channels it must carry, reconnecting with backoff, and the command
connection for rights sets and publishing. Where the server has client-side
caching, the pub/sub connection also reads the sets a rights refresh needs and
keeps each until Redis invalidates it there (see :class:`_PubSubProtocol`).
Redis errors become
:class:`~sisyphus.errors.BrokerUnavailable` here and nowhere else.

Subscriptions are reference-counted by the hub: this class only hears
"first local listener" and "last local listener gone", so the hundredth
browser on ``room:5`` costs Redis nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Iterable, Sequence, Set
from typing import Any, TypeVar

import hiredis

from sisyphus.brokers import backoff, failover, subscriptions
from sisyphus.brokers.base import LostHandler, MessageHandler, Position, drop_message, ignore_loss
from sisyphus.brokers.lua import (
    EPOCH_KEY,
    HISTORY_SCRIPT,
    PUBLISH_SCRIPT,
    SEQUENCE_KEY,
    SEQUENCED_PREFIX_BYTES,
    SNAPSHOT_SCRIPT,
    TIMELINE_KEY,
    history_reply,
    parse_envelope,
    publish_call,
    sequenced_channel,
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
from sisyphus.brokers.topology import ask_sentinels, locate, parse_broker_url
from sisyphus.errors import BrokerUnavailable
from sisyphus.protocol.names import (
    USER_CHANNEL_PREFIX,
    channels_key,
    history_key,
    user_channel,
    user_of_channels_key,
)
from sisyphus.protocol.resume import ChannelHistory, EventId, Seqs

log = logging.getLogger("sisyphus.redis")

T = TypeVar("T")

# Channels per SUBSCRIBE command when resubscribing after a reconnect.
SUBSCRIBE_BATCH = 1000
# Command connections (sets, history, publish) per process, beside the one pub/sub link:
# one pipelined link carries them all.
COMMAND_CONNECTIONS = 1


# What the server pushes in RESP3 (messages, confirmations, invalidations), as parsed.
_PUSH = hiredis.PushNotification


class _PubSubProtocol(RespProtocol):
    """The pub/sub link: messages and confirmations go to the broker, PONGs to their PING.

    On a server that speaks RESP3 (Redis 6 and later), the link also reads users' sets
    with client-side caching on (``CLIENT TRACKING``): Redis then pushes an
    ``invalidate`` for a set read here as soon as the set changes, on this same
    connection, so before any message published after the change. A set read here is
    kept from its reply until its invalidation (see :meth:`RedisBroker.user_channels_now`).
    """

    def __init__(self, broker: RedisBroker) -> None:
        super().__init__()
        self._broker = broker
        # Set once the handshake (AUTH, PING) is done: from then on an error is fatal.
        self.established = False
        self.address: tuple[Any, Any] = (None, None)
        # RESP3: pushes are PushNotification, lists are replies to commands.
        self.resp3 = False
        # CLIENT TRACKING is on: sets read here are kept until Redis invalidates them.
        self.tracking = False
        # The set reads waiting for their reply: future -> (user, whether it is the
        # PTTL sent just before the user's SMEMBERS).
        self.reads: dict[asyncio.Future[Any], tuple[str, bool]] = {}
        # The read whose PTTL is answered and whose SMEMBERS is not yet (a read's two
        # replies come one after the other, pushes aside): its user, and whether its set
        # may expire (a time to live, or a change of the key in between).
        self._between: str | None = None
        self._may_expire = False

    def on_reply(self, reply: Any) -> None:
        kind_of = type(reply)
        if kind_of is _PUSH or (kind_of is list and not self.resp3):
            kind = reply[0]
            if kind == b"message":  # the hot path: straight from the parser to the hub
                self._broker._on_pubsub_message(reply[1], reply[2])
                return
            if kind == b"subscribe" or kind == b"unsubscribe":
                self._broker._on_confirmation(kind, reply[1].decode("utf-8", "replace"))
                return
            if kind == b"invalidate":
                self._spoil(reply[1])
                self._broker._on_invalidate(reply[1])
                return
            if kind == b"pong":
                self.answer(b"PONG")
                return
            if kind_of is _PUSH:
                return  # a push of no interest: it answers no command
        # A set read's WRONGTYPE is its answer; any other error breaks the link.
        if (
            self.established
            and isinstance(reply, hiredis.ReplyError)
            and not (self._answers_a_read() and str(reply).startswith("WRONGTYPE"))
        ):
            log.error("redis pub/sub error: %s; reconnecting", reply)
            self.abort()
            return
        self.answer(reply)

    def _answers_a_read(self) -> bool:
        return bool(self.pending) and self.pending[0][0] in self.reads

    def answer(self, reply: Any) -> None:
        # A set read is kept in the step its reply is parsed: an invalidation parsed
        # right after it (in the same read from the socket) must find it.
        if self.reads and self.pending:
            read = self.reads.pop(self.pending[0][0], None)
            if read is not None:
                user_id, is_ttl = read
                if is_ttl:
                    # Redis invalidates an expired key only once it deletes it, which may
                    # be long after its time: a set that expires is never kept.
                    self._between, self._may_expire = user_id, reply != -1
                else:
                    keep = self._between == user_id and not self._may_expire
                    self._between = None
                    if type(reply) is list:
                        reply = self._broker._keep_tracked(self, user_id, reply, keep=keep)
        super().answer(reply)

    def _spoil(self, keys: list[bytes] | None) -> None:
        """An invalidation between a read's PTTL and its SMEMBERS: other commands ran
        between the two, and may have given the set a time to live."""
        between = self._between
        if between is None:
            return
        if keys is None or any(
            user_of_channels_key(k.decode("utf-8", "replace")) == between for k in keys
        ):
            self._may_expire = True

    def read_set(self, user_id: str) -> asyncio.Future[Any]:
        """Read a user's set here (its time to live first): the future gets the set,
        ``None`` for an unknown user, or the error of a key of another type."""
        ttl = self.request("PTTL", channels_key(user_id))
        ttl.add_done_callback(retrieve)  # read in answer(), as it is parsed
        self.reads[ttl] = (user_id, True)
        future = self.request("SMEMBERS", channels_key(user_id))
        self.reads[future] = (user_id, False)
        return future

    def connection_lost(self, exc: Exception | None) -> None:
        self.reads.clear()
        self._between = None
        super().connection_lost(exc)
        self._broker._on_pubsub_lost(self)


def _not_a_set(user_id: str) -> None:
    key = channels_key(user_id)
    log.warning("%s is not a SET: user=%s treated as unknown", key, user_id)


def _names(channels: Iterable[str]) -> list[str]:
    """The Redis channels behind hub channels: the plain one and the sequenced one."""
    channels = list(channels)
    return channels + [sequenced_channel(channel) for channel in channels]


class RedisBroker:
    name = "redis"

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
        self._ping_interval = ping_interval
        # Seconds a channel stays subscribed after its last stream left: a client that
        # comes back within them (a reconnect, a page load) needs no SUBSCRIBE.
        self._linger = linger
        self._last_ping = 0.0
        self._url = url
        self._history_size = history_size
        self._history_max_age = history_max_age
        self._timeout = timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._topology = parse_broker_url(url)
        # The service's own commands: one pipelined hiredis connection (see redis_link.py).
        self._commands = CommandLink(
            self._locate, timeout, backoff_base, backoff_cap, on_open=self._guard_sequence
        )
        self._probe: asyncio.Task[None] | None = None
        # Sentinel only: the periodic look at which node is the master now.
        self._master_check: asyncio.Task[None] | None = None
        self._last_master_check = 0.0
        self._on_message: MessageHandler = drop_message
        self._on_lost: LostHandler = ignore_loss
        # The pub/sub link, once its handshake answered; None while (re)connecting.
        self._link: _PubSubProtocol | None = None
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._failures = 0  # failed connects since the last successful round trip
        # Redis channels wanted (each hub channel twice: plain and sequenced), and per
        # channel the (UN)SUBSCRIBE replies still due.
        self._wanted: set[str] = set()
        self._outstanding: dict[str, int] = {}
        # Confirmed channels, each with the number of the confirmation (counted over
        # the broker's life) that made it so: a snapshot records the count it was read
        # at, to tell which channels were confirmed before it (see confirmed_before).
        self._confirmed: dict[str, int] = {}
        self._confirmations = 0
        # Hub channels no stream reads any more, still subscribed (both Redis channels)
        # until their deadline (loop time); in the order they were left, so in deadline
        # order.
        self._lingering: dict[str, float] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # What a handshake needs, held in-process while it stays true (see
        # held_snapshot): users' sets, each read while its user:<id> was subscribed, and
        # dropped at the next message there (the seed's rule: every change of a set is
        # announced on it) or when user:<id> is unsubscribed; the position of the latest
        # snapshot read; and the last sequenced message heard on this pub/sub link.
        self._rights: dict[str, set[str]] = {}
        # Users' sets read on the pub/sub link with CLIENT TRACKING on: each is kept
        # from its reply until Redis invalidates it there (see _PubSubProtocol).
        self._tracked: dict[str, set[str]] = {}
        self._notices_heard = 0  # messages on user channels, over the broker's life
        self._known: Position | None = None
        self._heard_epoch: bytes | None = None
        self._heard = 0
        self._held_position: tuple[Position, Position] | None = None
        self.reconnects = 0
        self.malformed = 0  # sequenced messages dropped for a malformed envelope
        self._unguarded = False  # the failover guard was refused (said once in the log)
        self._untracked = False  # client-side caching was refused (said once in the log)

    def bind(self, on_message: MessageHandler, on_lost: LostHandler) -> None:
        self._on_message = on_message
        self._on_lost = on_lost

    # Lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Connect the pub/sub link; if Redis is down, keep trying in the background."""
        try:
            await self._connect()
        except BrokerUnavailable as exc:
            log.warning("redis unavailable at start (%s); retrying in the background", exc)
            self._schedule_reconnect()

    async def close(self) -> None:
        self._closing = True
        for task in (self._reconnect_task, self._probe, self._master_check):
            if task is not None:
                task.cancel()
        if self._link is not None:
            self._link.abort()
        self._fail_waiters()
        self._commands.close()

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def ready(self) -> bool:
        """Both links answered, and every channel the hub wants is confirmed subscribed."""
        return (
            self._link is not None
            and self._confirmed.keys() == self._wanted
            and self._commands.healthy
        )

    def tick(self, now: float) -> None:
        """From the service's periodic tick: the links' health, each link's own timeout.

        A link that stays open but answers nothing (a frozen server, a black-holed
        network, a failover that kept the TCP connection) is aborted and replaced
        here, not found by waiting for a message.
        """
        if self._lingering:
            self._end_lingering(now)
        link = self._link
        if link is not None:
            if link.overdue(now, self._timeout):
                log.error("redis pub/sub: no answer in %.1f s; reconnecting", self._timeout)
                link.abort()
            elif not link.pending and now - self._last_ping >= self._ping_interval:
                self._last_ping = now
                link.request("PING").add_done_callback(retrieve)
        self._commands.check(now)
        self._commands.ping(now, self._ping_interval)
        if not self._commands.healthy and self._probe is None and not self._closing:
            self._probe = asyncio.get_running_loop().create_task(self._probe_commands())
        if (
            self._topology.uses_sentinel
            and self._master_check is None
            and not self._closing
            and now - self._last_master_check >= self._ping_interval
        ):
            self._last_master_check = now
            self._master_check = asyncio.get_running_loop().create_task(self._check_master())

    async def _locate(self) -> dict[str, Any]:
        """Where to connect now (with Sentinel: the master the sentinels name)."""
        try:
            return await locate(self._topology, self._timeout)
        except OSError as exc:
            raise LinkError(str(exc)) from None

    async def _check_master(self) -> None:
        """Sentinel: if the master moved (a failover), drop the links to the old one.

        A demoted master may keep its connections and even its pub/sub (replicas
        receive published messages), so a failover is not always a lost link: the
        sentinels' answer is the truth. Streams get `error` and come back to the new
        master; readiness follows the reconnect.
        """
        try:
            address = await ask_sentinels(self._topology, self._timeout)
        except OSError as exc:
            log.warning("sentinel: %s", exc)
            return
        finally:
            self._master_check = None
        link = self._link
        if link is not None and link.address != address:
            log.error("sentinel: the master moved to %s:%d; reconnecting", *address)
            link.abort()
        if self._commands.address not in ((None, None), address):
            self._commands.close()

    async def _guard_sequence(self, link: RespProtocol) -> None:
        """A new command link: if the server's history diverged, no id may be reused."""
        try:
            replid = failover.replication_id(await link.request("INFO", "replication"))
            if replid is None:
                return  # a server too old to say (before Redis 4): nothing to compare
            jumped = await link.request(*failover.guard_call(replid))
        except ReplyError as exc:
            # An ACL without INFO (``-@dangerous``), a renamed INFO, a key pattern without
            # sisyphus:replid: serve anyway, without the guard, and say so once.
            if not self._unguarded:
                self._unguarded = True
                log.warning(
                    "redis: can't check the server's replication history (%s): after a "
                    "failover that lost writes, ids may be handed out twice; allow INFO and "
                    "the key %s to the service's user",
                    exc,
                    failover.REPLICATION_ID_KEY,
                )
            return
        if jumped:
            log.warning(
                "redis: the server's replication history changed (a failover, or a restart "
                "that may have lost writes): ids continue %d further on, so none is reused",
                failover.SEQUENCE_GAP,
            )

    async def _probe_commands(self) -> None:
        """Reconnect the command link in the background (its backoff paces the attempts)."""
        try:
            await self._commands.call("PING")
        except (LinkError, ReplyError, OSError) as exc:
            log.debug("redis command link probe failed: %s", exc)
        finally:
            self._probe = None

    async def _connect(self) -> None:
        try:
            params = await self._locate()
            # The database too: the link reads users' sets (channels span databases).
            link = await open_link(
                params, lambda: _PubSubProtocol(self), self._timeout, select_db=True
            )
            await self._start_tracking(link)
        except (LinkError, ReplyError) as exc:
            raise BrokerUnavailable(str(exc)) from None
        link.address = (params.get("host"), params.get("port"))
        if self._closing or link.closed:
            link.abort()
            if self._closing:
                return
            raise BrokerUnavailable("redis pub/sub connection lost during its set-up")
        self._failures = 0  # AUTH and PING answered: a real round trip
        link.established = True
        self._link = link
        self._outstanding.clear()
        self._confirmed.clear()
        self._forget_snapshots()
        # A new link subscribes what streams read, not what merely lingered.
        self._wanted.difference_update(_names(self._lingering))
        self._lingering.clear()
        wanted = sorted(self._wanted)
        for start in range(0, len(wanted), SUBSCRIBE_BATCH):
            self._send_subscriptions("SUBSCRIBE", wanted[start : start + SUBSCRIBE_BATCH])
        log.info("redis pub/sub connected channels=%d", len(wanted) // 2)

    async def _start_tracking(self, link: _PubSubProtocol) -> None:
        """RESP3 and client-side caching on a new pub/sub link, where the server has
        them; without them every message on ``user:<id>`` reads the set on the command
        link, as before."""
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    await link.request("HELLO", "3")
                    link.resp3 = True
                    await link.request("CLIENT", "TRACKING", "ON")
                    # What a read sends: refused by an ACL, it would break the link later.
                    await link.request("PTTL", channels_key("-"))
                    await link.request("SMEMBERS", channels_key("-"))
                    link.tracking = True
                except ReplyError as exc:
                    if not self._untracked:
                        self._untracked = True
                        log.warning(
                            "redis: no client-side caching (%s): every message on user:<id> "
                            "reads the user's set; allow HELLO, CLIENT TRACKING, PTTL and "
                            "SMEMBERS on the pub/sub connection to the service's user",
                            exc,
                        )
        except TimeoutError:
            link.abort()
            raise LinkError(f"redis did not answer in {self._timeout} s") from None

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
                    log.warning("redis reconnect attempt=%d failed: %s", self._failures, exc)
                    continue
                self.reconnects += 1
                return
        finally:
            self._reconnect_task = None

    def _on_pubsub_lost(self, link: _PubSubProtocol) -> None:
        if link is not self._link:
            return  # a link that never finished its handshake: its opener saw the failure
        self._link = None
        self._confirmed.clear()
        self._outstanding.clear()
        self._forget_snapshots()
        self._fail_waiters()
        if self._closing:
            return
        log.error("redis pub/sub connection lost; reconnecting")
        # Our own duty first: whatever the streams do with the news can't stop it.
        self._schedule_reconnect()
        try:
            self._on_lost()
        except Exception:
            log.exception("a listener of the broker's loss failed")

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, {}
        subscriptions.fail_all(waiters, "redis pub/sub connection lost")

    # Subscriptions ---------------------------------------------------------
    def _send_subscriptions(self, verb: str, names: list[str]) -> None:
        link = self._link
        if link is None or not names:
            return
        for name in names:
            self._outstanding[name] = self._outstanding.get(name, 0) + 1
        link.send((verb, *names))

    def subscribe(self, channels: list[str]) -> None:
        self._track_sets_of(channels)  # lingering ones too: their set may have changed
        lingering = self._lingering
        if lingering:
            # Still subscribed (or on its way): nothing to send.
            channels = [channel for channel in channels if lingering.pop(channel, None) is None]
            if not channels:
                return
        names = _names(channels)
        self._wanted.update(names)
        self._send_subscriptions("SUBSCRIBE", names)

    def _track_sets_of(self, channels: list[str]) -> None:
        """Read the sets of the users whose channels a stream starts reading and that
        aren't kept, in the same write as their SUBSCRIBE: the first notice reads nothing."""
        link = self._link
        if link is None or not link.tracking or link.closed:
            return
        for channel in channels:
            if channel.startswith(USER_CHANNEL_PREFIX):
                user_id = channel[len(USER_CHANNEL_PREFIX) :]
                if user_id not in self._tracked:
                    link.read_set(user_id).add_done_callback(retrieve)

    def unsubscribe(self, channels: list[str]) -> None:
        if self._linger > 0:
            deadline = asyncio.get_running_loop().time() + self._linger
            lingering = self._lingering
            for channel in channels:
                lingering[channel] = deadline
            return
        self._drop(_names(channels))

    def _end_lingering(self, now: float) -> None:
        ended = subscriptions.pop_expired(self._lingering, now)
        if ended:
            self._drop(_names(ended))

    def _drop(self, names: list[str]) -> None:
        self._wanted.difference_update(names)
        rights = self._rights
        for name in names:
            self._confirmed.pop(name, None)
            if name.startswith(USER_CHANNEL_PREFIX):
                # No notice would reach us any more: the set may change unseen.
                user_id = name[len(USER_CHANNEL_PREFIX) :]
                rights.pop(user_id, None)
                self._tracked.pop(user_id, None)  # no notice will ask for it
            # Nobody reads it any more: whoever waited for its confirmation (a refresh
            # whose stream closed) waits no longer; it will never come.
            subscriptions.release(self._waiters, name)
        self._send_subscriptions("UNSUBSCRIBE", names)

    def confirmed_before(self, channels: Iterable[str], position: Position) -> bool:
        return self._confirmed_by(channels, position.confirmations)

    def _confirmed_by(self, channels: Iterable[str], mark: int) -> bool:
        """Both Redis channels of every one of ``channels`` confirmed by the ``mark``-th
        confirmation, and since."""
        if mark <= 0:
            return False
        confirmed = self._confirmed
        for channel in channels:
            number = confirmed.get(channel)
            if number is None or number > mark:
                return False
            number = confirmed.get(sequenced_channel(channel))
            if number is None or number > mark:
                return False
        return True

    async def wait_subscribed(self, channels: Iterable[str]) -> None:
        if self._link is None:
            raise BrokerUnavailable("redis pub/sub is not connected")
        loop = asyncio.get_running_loop()
        futures = []
        for name in _names(channels):
            if name not in self._confirmed:
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(name, []).append(future)
                futures.append(future)
        if futures:
            await asyncio.gather(*futures)

    async def barrier(self) -> None:
        """PING on the pub/sub link: its PONG comes after every message published before."""
        link = self._link
        if link is None:
            raise BrokerUnavailable("redis pub/sub is not connected")
        try:
            await link.request("PING")
        except (LinkError, ReplyError) as exc:
            raise BrokerUnavailable(f"redis pub/sub: {exc}") from None

    def _on_pubsub_message(self, name: bytes, payload: bytes) -> None:
        if name.startswith(SEQUENCED_PREFIX_BYTES):
            envelope = parse_envelope(payload)
            if envelope is None:
                self.malformed = subscriptions.count_malformed(self.malformed, name)
                return
            epoch, seq, time, body = envelope
            channel = name[len(SEQUENCED_PREFIX_BYTES) :].decode("utf-8", "replace")
            if epoch == self._heard_epoch:
                if seq > self._heard:
                    self._heard = seq
            else:
                self._heard_epoch = epoch
                self._heard = seq
            if channel.startswith(USER_CHANNEL_PREFIX):
                self._on_notice(channel)
            self._on_message(channel, body, seq, epoch, time)
            return
        channel = name.decode("utf-8", "replace")
        if channel.startswith(USER_CHANNEL_PREFIX):
            self._on_notice(channel)
        self._on_message(channel, payload, None, None, 0)

    def _on_notice(self, channel: str) -> None:
        """A message on a user's channel: the set may have changed (a read across it
        may be stale too)."""
        self._notices_heard += 1
        if self._rights:
            self._rights.pop(channel[len(USER_CHANNEL_PREFIX) :], None)

    def _on_invalidate(self, keys: list[bytes] | None) -> None:
        """Redis says these keys changed (``None``: a flush of the whole keyspace)."""
        tracked = self._tracked
        if keys is None:
            tracked.clear()
            return
        for key in keys:
            user_id = user_of_channels_key(key.decode("utf-8", "replace"))
            if user_id is not None:
                tracked.pop(user_id, None)

    def _keep_tracked(
        self, link: _PubSubProtocol, user_id: str, members: list[bytes], keep: bool
    ) -> set[str] | None:
        """A set read on the pub/sub link, as its reply is parsed: kept until Redis
        invalidates it, if ``keep`` (it has no time to live) and a notice may still ask
        for it (``user:<id>`` is subscribed). An empty set is an unknown user."""
        self._tracked.pop(user_id, None)
        channels = decode_members(members)
        heard = link is self._link and user_channel(user_id) in self._wanted
        if channels is not None and keep and heard:
            self._tracked[user_id] = channels
        return channels

    def _on_confirmation(self, kind: bytes, name: str) -> None:
        left = self._outstanding.get(name, 0) - 1
        if left > 0:
            self._outstanding[name] = left
            return  # a later (UN)SUBSCRIBE of this channel is still on its way
        self._outstanding.pop(name, None)
        if kind == b"subscribe" and name in self._wanted:
            self._confirmations += 1
            self._confirmed[name] = self._confirmations
            subscriptions.release(self._waiters, name)

    # Commands --------------------------------------------------------------
    async def _call(self, awaitable: Awaitable[T]) -> T:
        # No timeout here: the command link owns it, and aborts a link that misses it.
        try:
            return await awaitable
        except ReplyError as exc:
            raise self._refused(exc) from None
        except (LinkError, OSError) as exc:
            raise BrokerUnavailable(f"redis command failed: {exc or type(exc).__name__}") from None

    def _refused(self, exc: ReplyError) -> BrokerUnavailable:
        if str(exc).startswith("READONLY"):
            # The node was demoted (a failover): the next command finds the master.
            self._commands.close()
        return BrokerUnavailable(f"redis refused a command: {exc}")

    def user_channels_now(self, user_id: str) -> tuple[bool, Set[str] | None]:
        # Asked at a notice's arrival. A set tracked on the pub/sub link is current
        # there: a change before the notice was invalidated before the notice arrived.
        link = self._link
        if link is not None and link.tracking:
            members = self._tracked.get(user_id)
            if members is not None:
                return True, members
        return False, None

    def held_snapshot(self, user_id: str) -> tuple[Set[str] | None, Position] | None:
        """The user's set and a position with no round trip, while both stay true.

        The set: read while ``user:<id>`` was subscribed, with no message on it heard
        between the read's sending and its answer, and none since (every change of a
        set is announced there). The position: the latest snapshot read's, moved on to
        the last sequenced message heard on this link. Every message after it on a
        channel confirmed before that read is still to arrive: it was published after
        that read, or after a message that arrived after it. A message published just
        before this call may still be on its way, and then comes after the position
        (the price of no round trip; see docs/delivery.md).
        """
        members = self._rights.get(user_id)
        known = self._known
        if members is None or known is None:
            return None
        (seq,) = known.seqs
        if self._heard_epoch is not None:
            if self._heard_epoch.decode("ascii", "replace") != known.epoch:
                return None  # the history was renamed since the read: read again
            if self._heard > seq:
                seq = self._heard
        made = self._held_position  # one Position while neither part moves
        if made is None or made[0] is not known or made[1].seqs[0] != seq:
            made = self._held_position = (
                known,
                Position(known.epoch, (seq,), known.oldest, known.confirmations),
            )
        return members, made[1]

    def _remember(self, user_id: str, members: set[str], mark: int, notices: int) -> None:
        """Keep a set read after the ``mark``-th confirmation if it can't be stale."""
        if notices == self._notices_heard and self._confirmed_by([user_channel(user_id)], mark):
            self._rights[user_id] = members

    def _forget_snapshots(self) -> None:
        self._rights.clear()
        self._tracked.clear()  # tracked by a link that is gone, or not tracked yet
        self._known = None
        # What a new link hears is its own: the server may even have lost writes.
        self._heard_epoch = None
        self._heard = 0

    async def user_channels_many(self, user_ids: Sequence[str]) -> list[set[str] | None]:
        # One SMEMBERS per user, all in one write (with whatever else this loop iteration
        # sends): the refresh that every message on user:<id> triggers needs nothing more.
        link = self._link
        if link is not None and link.tracking and not link.closed:
            return await self._read_tracked(link, user_ids)
        mark, notices = self._confirmations, self._notices_heard
        replies = await self._call(
            self._commands.call_all([("SMEMBERS", channels_key(u)) for u in user_ids])
        )
        sets: list[set[str] | None] = []
        for user_id, reply in zip(user_ids, replies, strict=True):
            if isinstance(reply, ReplyError):
                if "WRONGTYPE" not in str(reply):
                    raise self._refused(reply)
                _not_a_set(user_id)
                channels = None
            else:
                channels = decode_members(reply)
            sets.append(self._hand_out(user_id, channels, mark, notices))
        return sets

    def _hand_out(
        self, user_id: str, channels: set[str] | None, mark: int, notices: int
    ) -> set[str] | None:
        """A set just read: kept for connects if it can't be stale (see _remember); the
        caller gets its own copy, since a kept one never changes."""
        if channels is None:
            return None
        self._remember(user_id, channels, mark, notices)
        return set(channels)

    async def _read_tracked(
        self, link: _PubSubProtocol, user_ids: Sequence[str]
    ) -> list[set[str] | None]:
        """The sets read on the pub/sub link, each kept there until Redis invalidates it."""
        mark, notices = self._confirmations, self._notices_heard
        futures = [link.read_set(user_id) for user_id in user_ids]
        sets: list[set[str] | None] = []
        try:
            for user_id, future in zip(user_ids, futures, strict=True):
                try:
                    channels = await future  # decoded, and kept, as the reply was parsed
                except ReplyError:
                    _not_a_set(user_id)
                    channels = None
                sets.append(self._hand_out(user_id, channels, mark, notices))
        except BaseException as exc:
            for future in futures:
                future.add_done_callback(retrieve)  # the rest fail with the link: unread
            if isinstance(exc, LinkError):
                raise BrokerUnavailable(f"redis pub/sub: {exc}") from None
            raise
        return sets

    async def snapshot(self, user_id: str) -> tuple[Set[str] | None, Position]:
        keys = [channels_key(user_id), EPOCH_KEY, SEQUENCE_KEY, TIMELINE_KEY]
        args = [new_epoch(), str(int(self._history_max_age))]
        confirmations = self._confirmations  # the read is sent after this
        notices = self._notices_heard
        kind, epoch, seq, members, oldest = await self._call(
            self._commands.script(SNAPSHOT_SCRIPT, keys, args)
        )
        position = Position(epoch.decode(), (int(seq),), (int(oldest),), confirmations)
        known = self._known
        if confirmations > 0 and (known is None or confirmations >= known.confirmations):
            self._known = position
        if kind not in (b"set", b"none"):
            _not_a_set(user_id)
        channels = decode_members(members)
        if channels is not None:
            self._remember(user_id, channels, confirmations, notices)
        return channels, position

    async def position(self) -> Position:
        async def read() -> tuple[Any, Any]:
            # The first reader names the history: SET NX keeps an existing epoch.
            _, epoch, seq = await asyncio.gather(
                self._commands.call("SET", EPOCH_KEY, new_epoch(), "NX"),
                self._commands.call("GET", EPOCH_KEY),
                self._commands.call("GET", SEQUENCE_KEY),
            )
            return epoch, seq

        epoch, seq = await self._call(read())
        return Position(epoch.decode(), (int(seq or 0),), (int(seq or 0) + 1,))

    async def history(
        self,
        channels: Iterable[str],
        after_seqs: Seqs,
        limit: int,
        max_bytes: int,
        not_before: int | None = None,  # one group: ``after_seqs`` is exact
    ) -> list[ChannelHistory]:
        (after,) = after_seqs
        channels = list(channels)
        keys = [SEQUENCE_KEY, *(history_key(channel) for channel in channels)]
        reply = await self._call(
            self._commands.script(HISTORY_SCRIPT, keys, [after, limit, max_bytes])
        )
        return history_reply(channels, reply)

    async def publish(self, channel: str, payload: bytes) -> EventId:
        return await self._sequenced(channel, payload)

    async def grant(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        return await self._sequenced(user_channel(user_id), notice, ("SADD", user_id, channels))

    async def revoke(self, user_id: str, channels: list[str], notice: bytes) -> EventId:
        return await self._sequenced(user_channel(user_id), notice, ("SREM", user_id, channels))

    async def _sequenced(
        self, channel: str, payload: bytes, rights: tuple[str, str, list[str]] | None = None
    ) -> EventId:
        keys, args = publish_call(
            channel, payload, self._history_size, self._history_max_age, new_epoch(), rights
        )
        epoch, seq, time = await self._call(self._commands.script(PUBLISH_SCRIPT, keys, args))
        return EventId(epoch.decode(), (int(seq),), int(time))
