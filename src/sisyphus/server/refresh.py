"""The rights refresh that a message on ``user:<id>`` triggers, stream by stream.

Owns: holding a user's live streams from the notice on, re-reading the user's
set, dropping removed channels at once, subscribing added ones and replaying
what was published on them since the notice, then handing each stream its
replay and its held messages in sequence order. Each stream is diffed against
its OWN channels, so two tabs of one user each get their new channels' first
messages. When the broker holds the set in-process and the notice adds no
channel, the refresh is done in the notice's own step, with no hold at all. A
burst of notices for one user runs one refresh task. Each pass answers only for
the streams held when it began, and releases what they held up to the first
notice that arrived while its read was under way (the read may predate it);
a stream held meanwhile waits for the next pass. Steady traffic on
``user:<id>`` so delays messages by about two reads of the set, never
indefinitely.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Set

from sisyphus.brokers.base import Broker
from sisyphus.config import Settings
from sisyphus.errors import BrokerUnavailable
from sisyphus.hub.hub import Hub
from sisyphus.hub.states import State
from sisyphus.hub.subscriber import Subscriber
from sisyphus.metrics import Metrics
from sisyphus.protocol import sse
from sisyphus.protocol.names import user_channel
from sisyphus.protocol.resume import HistoryEntry, parse_event_id
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
        self.entries: dict[int, HistoryEntry] = {}
        self.reset: str | None = None


def _seq_in(epoch: str, event_id: bytes) -> int:
    """The seq of ``event_id`` if it is of ``epoch``, else 0 (it says nothing of this one)."""
    try:
        parsed = parse_event_id(event_id.decode("ascii"))
    except ValueError:  # not an id of ours (nor ASCII): it says nothing
        return 0
    return parsed.seq if parsed.epoch == epoch else 0


class Refresher:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        hub: Hub,
        metrics: Metrics,
        lifecycle: Lifecycle,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._hub = hub
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._loop = loop
        self._refreshing: set[str] = set()
        self._again: set[str] = set()
        self._since: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_user_message(self, user_id: str, position: int) -> None:
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
        task = self._loop.create_task(self._refresh(user_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_next_pass_by(self, user_id: str, position: int) -> None:
        """The user's next pass starts at ``position`` or before (the earliest asked)."""
        since = self._since.get(user_id)
        self._since[user_id] = position if since is None else min(since, position)

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
        channels = readable(self._settings, self._metrics, user_id, members)
        if channels is None:
            self._lifecycle.end_user(user_id, sse.Status.FAILURE, "too_many_channels")
            return True
        for sub in streams:
            if not channels <= sub.channels:
                return False
        for sub in streams:
            if channels != sub.channels:
                self._hub.update(sub, channels)
        return True

    async def _refresh(self, user_id: str) -> None:
        try:
            while True:
                self._again.discard(user_id)
                since = self._since.pop(user_id, self._hub.delivered)
                # This pass answers for the streams held now, and only for them: one held
                # while its read is under way (a notice delivered to it live, a tab going
                # live after a notice) may need rights the read predates, so it waits,
                # held, for the next pass (the hold that marked it also asked for one).
                catches = {
                    sub: _Catch(len(sub.held))
                    for sub in self._hub.streams_of(user_id)
                    if sub.state is State.CATCHING_UP
                }
                if not catches:
                    break
                if not await self._pass(user_id, since, catches):
                    return  # the streams were ended
                kept_since = self._release(user_id, since, catches)
                if kept_since is not None:
                    # A stream stays held after a notice the read didn't cover: one more
                    # pass, from that notice (the notices before it are settled).
                    self._start_next_pass_by(user_id, kept_since)
                    self._again.add(user_id)
                if user_id not in self._again:
                    break
        except Exception:
            log.exception("refresh user=%s failed", user_id)
        finally:
            self._refreshing.discard(user_id)
            self._again.discard(user_id)
            self._since.pop(user_id, None)
            for sub in self._hub.streams_of(user_id):
                if sub.state is State.CATCHING_UP:
                    # Only reached after a failure: the client resumes by id instead.
                    self._lifecycle.end(sub, sse.Status.ERROR, "broker_unavailable")

    async def _pass(self, user_id: str, since: int, catches: dict[Subscriber, _Catch]) -> bool:
        """One read of the set applied to every held stream; False if they were ended."""
        lifecycle = self._lifecycle
        try:
            async with asyncio.timeout(self._settings.broker_timeout):
                members = await self._broker.user_channels(user_id)
        except (BrokerUnavailable, TimeoutError) as exc:
            # Rights can't be checked: close rather than keep serving possibly revoked channels.
            log.warning("refresh user=%s failed: %s", user_id, exc)
            lifecycle.end_user(user_id, sse.Status.ERROR, "broker_unavailable")
            return False
        if members is None:
            count = lifecycle.end_user(user_id, sse.Status.DISCONNECTED, "no_channels")
            log.info("user=%s has no channel left: %d streams disconnected", user_id, count)
            return False
        channels = readable(self._settings, self._metrics, user_id, members)
        if channels is None:
            lifecycle.end_user(user_id, sse.Status.FAILURE, "too_many_channels")
            return False
        added_by: dict[Subscriber, frozenset[str]] = {}
        for sub in catches:
            if sub.state is not State.CATCHING_UP:
                continue  # ended while the set was read
            added = channels - sub.channels
            # Removals take effect now; additions are held until the replay is in.
            self._hub.update(sub, channels)
            if added:
                added_by[sub] = added
        if not added_by:
            return True
        added_all = frozenset().union(*added_by.values())
        try:
            async with asyncio.timeout(self._settings.broker_timeout):
                await self._broker.wait_subscribed(added_all)
                missed = await replay.read_replay(
                    self._broker, self._settings, self._hub.epoch, added_all, since
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
                    catch.entries[entry.seq] = entry
        return True

    def _release(self, user_id: str, since: int, catches: dict[Subscriber, _Catch]) -> int | None:
        """Hand each stream of the pass its replay and held messages in order.

        What arrived after a notice the read may not cover stays held for the next
        pass (that notice may change the rights again); the rest is written now.
        Returns the position of the earliest notice a stream stays held at (the next
        pass starts there), or ``None`` when every stream of the pass went live.
        """
        kept_since: int | None = None
        epoch = self._hub.epoch
        own = user_channel(user_id)
        for sub, catch in catches.items():
            if sub.state is not State.CATCHING_UP:
                continue
            try:
                # The pass starts at its first notice, but a stream may already be past
                # it (released by an earlier pass): nothing at or before its own id.
                after = max(since, _seq_in(epoch, sub.last_id))
                entries = sorted(e for e in catch.entries.values() if e.seq > after)
                # Notices that arrived after the read began: the rights it returned may
                # predate them. Everything up to the first of them (the notice itself is
                # always readable) is released under this pass's rights; what follows
                # waits for the next pass, whose read comes after that notice.
                unsure = {id(m) for m in sub.held[catch.covered :] if m.channel == own}
                messages = replay.merge(epoch, entries, sub.held, after)
                notice = next(
                    (i for i, message in enumerate(messages) if id(message) in unsure), None
                )
                cut = len(messages) if notice is None else notice + 1
                keep = None if notice is None else messages[cut:]
                if notice is not None:
                    at = messages[notice].position
                    kept_since = at if kept_since is None else min(kept_since, at)
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
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
