"""What a user may read, and the notice a change of rights publishes.

Turning a new set into (un)subscriptions is the hub's job (``Hub.update``).
A refused member of a rights set is logged here, once per name per process:
the set is re-read on every connect and every rights notice, and the log must
not repeat itself for each of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from sisyphus.protocol.names import MAX_CHANNEL_LENGTH, channel_problem, user_channel

log = logging.getLogger("sisyphus.rights")

# How many refused names the process remembers having logged; past it, the oldest is
# forgotten (and would be logged again), so hostile sets can't grow memory.
MAX_REMEMBERED_REFUSALS = 1024


class RefusalLog:
    """Logs each refused channel name once, remembering at most ``limit`` names."""

    def __init__(self, limit: int = MAX_REMEMBERED_REFUSALS) -> None:
        self._limit = limit
        self._seen: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first

    def first_time(self, user_id: str, name: str, problem: str) -> bool:
        """Log ``name`` unless it was logged before; whether it was new."""
        key = name[: MAX_CHANNEL_LENGTH + 1]  # a huge name costs no more than a long one
        if key in self._seen:
            return False
        if len(self._seen) >= self._limit:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = None
        log.warning(
            "user=%s: ignored channel %r in its rights set: %s (logged once per name)",
            user_id,
            name[:80],
            problem,
        )
        return True


REFUSALS = RefusalLog()


def readable_channels(
    user_id: str, members: Iterable[str], refusals: RefusalLog | None = None
) -> tuple[frozenset[str], list[str]]:
    """The channels ``user_id`` reads: its own plus the valid members of its set.

    Returns the channels and the members refused for an invalid name that this
    process (``refusals``) had not refused before; each refused name is logged
    once, with the reason, so callers need not log them. An invalid member never becomes a
    subscription.
    """
    refusals = REFUSALS if refusals is None else refusals
    readable = {user_channel(user_id)}
    refused = []
    for member in members:
        problem = channel_problem(member)
        if problem is None:
            readable.add(member)
        elif refusals.first_time(user_id, member, problem):
            refused.append(member)
    return frozenset(readable), refused


def rights_notice(change: str, channels: Iterable[str]) -> bytes:
    """The message the API publishes on ``user:<id>`` after a grant or revoke.

    Clients see it like any message on their own channel; Sisyphus refreshes the
    user's subscriptions after forwarding it.
    """
    return json.dumps({"rights": change, "channels": sorted(channels)}).encode()
