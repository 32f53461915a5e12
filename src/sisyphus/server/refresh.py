"""The rights refresh that a message on ``user:<id>`` triggers, stream by stream.

Owns: holding a user's live streams from the notice on, re-reading the user's
set, dropping removed channels at once, subscribing added ones and replaying
what was published on them since the notice, then handing each stream its
replay and its held messages in sequence order. Each stream is diffed against
its OWN channels, so two tabs of one user each get their new channels' first
messages. When the broker holds the set in-process and the notice adds no
channel, the refresh is done in the notice's own step, with no hold at all.

Passes are queued: one task reads the sets of every user whose pass is due, in
one call (one round trip on Redis), and a burst of notices for one user makes
one pass at a time. Each pass answers only for the streams held when it began,
and releases what they held up to the first notice that arrived while its read
was under way (the read may predate it); a stream held meanwhile waits for the
user's next pass, queued at once. Steady traffic on ``user:<id>`` so delays
messages by about two reads of the set, never indefinitely. A pass that adds a
channel goes on in a task of its own, for the subscription and the replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Set
from typing import Any

from sisyphus.brokers.base import Broker
from sisyphus.config import Settings
from sisyphus.errors import BrokerUnavailable
from sisyphus.hub.hub import Hub
from sisyphus.hub.states import State
from sisyphus.hub.subscriber import Held, Subscriber
from sisyphus.metrics import Metrics
from sisyphus.protocol import sse
from sisyphus.protocol.names import user_channel
from sisyphus.protocol.resume import (
    HistoryEntry,
    Seqs,
    earlier_of,
    later_of,
    parse_event_id,
)
from sisyphus.protocol.rights import readable_channels
from sisyphus.server import replay
from sisyphus.server.lifecycle import Lifecycle

log = logging.getLogger("sisyphus.refresh")


def readable(
    settings: Settings, metrics: Metrics, user_id: str, members: Set[str]
) -> frozenset[str] | None:
    """The channels the user reads, or ``None`` (counted) past the channel limit."""
    channels, _ = readable_channels(user_id, members)  # refused names are logged there
    if len(channels) - 1 > settings.max_channels_per_user:
        metrics.limit_channels += 1
        log.warning("user=%s reads %d channels: over the limit", user_id, len(channels) - 1)
        return None
    return channels


class _Catch:
    """What one refresh pass gathered for one stream: how many of its held messages had
    arrived when the set was read (the notices among them are what the read covers),
    replayed messages and a reset reason."""

    __slots__ = ("covered", "entries", "reset")

    def __init__(self, covered: int) -> None:
        self.covered = covered
        self.entries: dict[tuple[int, int], HistoryEntry] = {}  # by (group, seq)
        self.reset: str | None = None


def _unchanged(
    user_id: str, members: Set[str], known: frozenset[str] | None
) -> frozenset[str] | None:
    """A stream's channels ``known``, if ``members`` are exactly the set they came from
    (the usual read: a personal message changed nothing), else ``None``.

    Those channels were checked when they were taken (names, the limit), so a set of
    the same members needs no check again.
    """
    if known is None:
        return None
    size = len(members) if user_channel(user_id) in members else len(members) + 1
    return known if size == len(known) and members <= known else None


# Seconds before a notice's arrival from which a newly readable channel of another
# sequence group is read again: covers the clocks of Redis primaries and of this host
# disagreeing, and the notice's way here.
GROUPS_CLOCK_MARGIN = 2


def _early(entries: list[HistoryEntry], after: Seqs, held: list[Held]) -> list[Held]:
    """Several groups: the catch-up's messages at or before ``after`` (in their group),
    that the stream did not hold either, as plain messages (they repeat its id)."""
    if len(after) == 1:
        return []
    held_keys = {(m.group, m.seq) for m in held if m.seq is not None}
    return [
        Held(b"", None, e.channel, e.payload, after, e.group, e.time)
        for e in entries
        if e.seq <= after[e.group] and (e.group, e.seq) not in held_keys
    ]


def _seqs_in(epoch: str, event_id: bytes, groups: int) -> Seqs:
    """The position of ``event_id`` if it is of ``epoch``, else zeros (it says nothing
    of this one)."""
    try:
        parsed = parse_event_id(event_id.decode("ascii"))
    except ValueError:  # not an id of ours (nor ASCII): it says nothing
        return (0,) * groups
    if parsed.epoch != epoch or len(parsed.seqs) != groups:
        return (0,) * groups
    return parsed.seqs


class Refresher:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        hub: Hub,
        metrics: Metrics,
        lifecycle: Lifecycle,
        loop: asyncio.AbstractEventLoop,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._wall_clock = wall_clock
        self._broker = broker
        self._hub = hub
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._loop = loop
        self._refreshing: set[str] = set()
        self._again: set[str] = set()
        self._since: dict[str, Seqs] = {}
        # With several sequence groups: when (wall clock) each user's next pass's first
        # notice arrived, and the same for the pass under way (see _catch_up).
        self._since_time: dict[str, int] = {}
        self._pass_time: dict[str, int] = {}
        # Users whose next pass is due: one task reads all their sets together.
        self._queued: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def on_user_message(self, user_id: str, position: Seqs) -> None:
        """A message reached ``user:<id>`` at ``position``: hold its streams, re-read its set.

        Holding starts now, in the same step as the notice's delivery: every later
        message waits until the refresh decided what the stream reads, so removed
        channels deliver nothing after the notice and added ones go in order.
        """
        if user_id not in self._refreshing and self._apply_now(user_id):
            return
        for sub in self._hub.streams_of(user_id):
            self._hub.hold(sub)  # LIVE -> CATCHING_UP; a STARTING stream holds anyway
        self._start_next_pass_by(user_id, position)
        if user_id in self._refreshing:
            self._again.add(user_id)
            return
        self._refreshing.add(user_id)
        self._queue(user_id)

    def _queue(self, user_id: str) -> None:
        """The user's next pass: with every other one queued until the task runs."""
        if not self._queued:
            self._spawn(self._passes())
        self._queued.append(user_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_next_pass_by(self, user_id: str, position: Seqs) -> None:
        """The user's next pass starts at ``position`` or before (the earliest asked)."""
        since = self._since.get(user_id)
        self._since[user_id] = position if since is None else earlier_of(since, position)
        now = int(self._wall_clock())
        self._since_time[user_id] = min(self._since_time.get(user_id, now), now)

    def _apply_now(self, user_id: str) -> bool:
        """The refresh done in the notice's own step, when it can be: True if it was.

        When the broker holds the set in-process, reading it now is reading it right
        after the notice. If it adds no channel to any stream (the usual case: the
        notice is a personal message, or a revoke), nothing needs a replay or a hold:
        removals apply at once and every stream stays live. Anything else (an added
        channel, a stream not live, a set read only by a round trip) takes the full
        refresh.
        """
        known, members = self._broker.user_channels_now(user_id)
        if not known or members is None:
            return False
        streams = self._hub.streams_of(user_id)
        for sub in streams:
            if sub.state is not State.LIVE:
                return False
        channels = self._channels_of(user_id, members, streams[0].channels if streams else None)
        if channels is None:
            return True  # the user's streams were ended
        for sub in streams:
            if not channels <= sub.channels:
                return False
        for sub in streams:
            if channels != sub.channels:
                self._hub.update(sub, channels)
        return True

    def _channels_of(
        self, user_id: str, members: Set[str], known: frozenset[str] | None
    ) -> frozenset[str] | None:
        """The channels ``members`` give (``known`` if they are its source); ``None``
        past the channel limit, the user's streams then ended with `failure`."""
        channels = _unchanged(user_id, members, known)
        if channels is None:
            channels = readable(self._settings, self._metrics, user_id, members)
            if channels is None:
                self._lifecycle.end_user(user_id, sse.Status.FAILURE, "too_many_channels")
        return channels

    def _held_streams(self, user_id: str) -> dict[Subscriber, _Catch]:
        """The streams a pass starting now answers for: those held now, and only them.

        One held while its read is under way (a notice delivered to it live, a tab
        going live after a notice) may need rights the read predates, so it waits,
        held, for the next pass (the hold that marked it also asked for one).
        """
        return {
            sub: _Catch(len(sub.held))
            for sub in self._hub.streams_of(user_id)
            if sub.state is State.CATCHING_UP
        }

    async def _passes(self) -> None:
        """A pass for every queued user, their sets read in one call. A user whose pass
        adds channels goes on in a task of its own; one that needs another pass is
        queued again."""
        users, self._queued = self._queued, []
        passes: list[tuple[str, Seqs, dict[Subscriber, _Catch]]] = []
        for user_id in users:
            self._again.discard(user_id)
            since = self._since.pop(user_id, self._hub.delivered)
            self._pass_time[user_id] = self._since_time.pop(user_id, int(self._wall_clock()))
            catches = self._held_streams(user_id)
            if catches:
                passes.append((user_id, since, catches))
            else:
                self._done(user_id)
        if not passes:
            return
        try:
            async with asyncio.timeout(self._settings.broker_timeout):
                sets = await self._broker.user_channels_many([user for user, _, _ in passes])
        except (BrokerUnavailable, TimeoutError) as exc:
            for user_id, _, _ in passes:
                # Rights can't be checked: close rather than serve possibly revoked channels.
                log.warning("refresh user=%s failed: %s", user_id, exc)
                self._lifecycle.end_user(user_id, sse.Status.ERROR, "broker_unavailable")
                self._done(user_id)
            return
        except BaseException:
            for user_id, _, _ in passes:
                self._done(user_id)
            raise
        for (user_id, since, catches), members in zip(passes, sets, strict=True):
            again = False
            try:
                added_by = self._apply(user_id, members, catches)
                if added_by:
                    self._spawn(self._catch_up_and_release(user_id, since, catches, added_by))
                    continue
                again = added_by is not None and self._after_pass(user_id, since, catches)
            except Exception:
                log.exception("refresh user=%s failed", user_id)
            self._next_or_done(user_id, again)

    async def _catch_up_and_release(
        self,
        user_id: str,
        since: Seqs,
        catches: dict[Subscriber, _Catch],
        added_by: dict[Subscriber, frozenset[str]],
    ) -> None:
        """The rest of a pass that adds channels: their replay, then the release."""
        again = False
        try:
            again = await self._catch_up(user_id, since, catches, added_by) and self._after_pass(
                user_id, since, catches
            )
        except Exception:
            log.exception("refresh user=%s failed", user_id)
        finally:
            self._next_or_done(user_id, again)

    def _next_or_done(self, user_id: str, again: bool) -> None:
        """After a pass: queue the user's next one, or end its refresh."""
        if again:
            self._queue(user_id)
        else:
            self._done(user_id)

    def _done(self, user_id: str) -> None:
        """The user's refresh is over: nothing of it stays, and no stream stays held."""
        self._refreshing.discard(user_id)
        self._again.discard(user_id)
        self._since.pop(user_id, None)
        self._since_time.pop(user_id, None)
        self._pass_time.pop(user_id, None)
        for sub in self._hub.streams_of(user_id):
            if sub.state is State.CATCHING_UP:
                # Only reached after a failure: the client resumes by id instead.
                self._lifecycle.end(sub, sse.Status.ERROR, "broker_unavailable")

    def _after_pass(self, user_id: str, since: Seqs, catches: dict[Subscriber, _Catch]) -> bool:
        """Release what the pass settled; True if the user needs another pass."""
        kept_since = self._release(user_id, since, catches)
        if kept_since is not None:
            # A stream stays held after a notice the read didn't cover: one more
            # pass, from that notice (the notices before it are settled).
            self._start_next_pass_by(user_id, kept_since)
            self._again.add(user_id)
        return user_id in self._again

    def _apply(
        self, user_id: str, members: set[str] | None, catches: dict[Subscriber, _Catch]
    ) -> dict[Subscriber, frozenset[str]] | None:
        """A set just read, applied to the held streams: removals at once. Returns the
        channels each stream gains (empty: none gains any), or ``None`` if the user's
        streams were ended (no channel left, or too many)."""
        lifecycle = self._lifecycle
        if members is None:
            count = lifecycle.end_user(user_id, sse.Status.DISCONNECTED, "no_channels")
            log.info("user=%s has no channel left: %d streams disconnected", user_id, count)
            return None
        known = next(iter(catches)).channels if catches else None
        channels = self._channels_of(user_id, members, known)
        if channels is None:
            return None
        added_by: dict[Subscriber, frozenset[str]] = {}
        for sub in catches:
            if sub.state is not State.CATCHING_UP or sub.channels == channels:
                continue  # ended while the set was read, or nothing changes
            added = channels - sub.channels
            # Removals take effect now; additions are held until the replay is in.
            self._hub.update(sub, channels)
            if added:
                added_by[sub] = added
        return added_by

    async def _catch_up(
        self,
        user_id: str,
        since: Seqs,
        catches: dict[Subscriber, _Catch],
        added_by: dict[Subscriber, frozenset[str]],
    ) -> bool:
        """Subscribe the added channels and gather what they missed since the pass's
        first notice; False if the streams were ended."""
        lifecycle = self._lifecycle
        added_all = frozenset().union(*added_by.values())
        try:
            async with asyncio.timeout(self._settings.broker_timeout):
                await self._broker.wait_subscribed(added_all)
                # With several groups, "published after the notice" is known exactly in
                # the notice's group only: in the others, what the process heard before
                # the notice may have been published after it. Read those from a little
                # before the notice's arrival instead (see _release for their ids).
                not_before = None
                if len(since) > 1:
                    not_before = self._pass_time.get(user_id, 0) - GROUPS_CLOCK_MARGIN
                missed = await replay.read_replay(
                    self._broker, self._settings, self._hub.epoch, added_all, since, not_before
                )
                if missed.entries:
                    await self._broker.barrier()  # as in the handshake: tell held from replayed
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("refresh user=%s: subscribing failed: %s", user_id, exc)
            lifecycle.end_user(user_id, sse.Status.ERROR, "broker_unavailable")
            return False
        for sub, added in added_by.items():
            catch = catches[sub]
            if missed.reset is not None:
                catch.reset = missed.reset
            for entry in missed.entries:
                if entry.channel in added:
                    catch.entries[entry.group, entry.seq] = entry
        return True

    def _release(self, user_id: str, since: Seqs, catches: dict[Subscriber, _Catch]) -> Seqs | None:
        """Hand each stream of the pass its replay and held messages in order.

        What arrived after a notice the read may not cover stays held for the next
        pass (that notice may change the rights again); the rest is written now.
        Returns the position of the earliest notice a stream stays held at (the next
        pass starts there), or ``None`` when every stream of the pass went live.
        """
        kept_since: Seqs | None = None
        epoch = self._hub.epoch
        own = user_channel(user_id)
        for sub, catch in catches.items():
            if sub.state is not State.CATCHING_UP:
                continue
            if not sub.held and not catch.entries and catch.reset is None:
                # The usual pass: nothing arrived while the set was read, nothing missed.
                self._hub.release(sub, [], sub.last_id)
                continue
            try:
                # The pass starts at its first notice, but a stream may already be past
                # it (released by an earlier pass): nothing at or before its own id.
                after = later_of(since, _seqs_in(epoch, sub.last_id, len(since)))
                entries = sorted(catch.entries.values(), key=lambda e: (e.group, e.seq))
                # With several groups, a newly readable channel's messages at or before
                # the stream's position may be new to it (see _catch_up): they go first,
                # under the id it holds, as a plain message does (never moving it).
                early = _early(entries, after, sub.held)
                entries = [e for e in entries if e.seq > after[e.group]]
                # Notices that arrived after the read began: the rights it returned may
                # predate them. Everything up to the first of them (the notice itself is
                # always readable) is released under this pass's rights; what follows
                # waits for the next pass, whose read comes after that notice.
                unsure = {id(m) for m in sub.held[catch.covered :] if m.channel == own}
                messages = early + replay.merge(epoch, entries, sub.held, after)
                notice = next(
                    (i for i, message in enumerate(messages) if id(message) in unsure), None
                )
                cut = len(messages) if notice is None else notice + 1
                keep = None if notice is None else messages[cut:]
                if notice is not None:
                    at = messages[notice].position
                    kept_since = at if kept_since is None else earlier_of(kept_since, at)
                now = [message for message in messages[:cut] if message.channel in sub.channels]
                out: list[bytes] = []
                if catch.reset is not None:
                    self._metrics.resets += 1
                    out.append(
                        sse.encode_status(
                            sub.last_id,
                            sse.Status.RESET,
                            json_flavour=sub.json_flavour,
                            reason=catch.reset,
                        )
                    )
                frames, last_id = replay.frames(now, sub.last_id, sub.json_flavour)
                self._metrics.replayed += len(entries)
                self._hub.release(sub, out + frames, last_id, keep)
            except Exception:
                log.exception("refresh user=%s: catching a stream up failed", user_id)
                self._lifecycle.end(sub, sse.Status.ERROR, "internal_error")
        return kept_since

    async def wait_idle(self) -> None:
        """Wait for running refreshes (used at shutdown)."""
        while self._tasks:  # a first pass may hand a user on to a task of its own
            await asyncio.gather(*self._tasks, return_exceptions=True)
