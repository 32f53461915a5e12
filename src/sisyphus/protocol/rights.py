"""What a user may read, and how a change of rights turns into (un)subscriptions."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from sisyphus.protocol.names import is_valid_channel, user_channel


@dataclass(frozen=True, slots=True)
class ChannelDiff:
    """Channels to subscribe and to drop after a refresh."""

    added: frozenset[str]
    removed: frozenset[str]


def readable_channels(user_id: str, members: Iterable[str]) -> tuple[frozenset[str], list[str]]:
    """The channels ``user_id`` reads: its own plus the valid members of its set.

    Returns the channels and the members refused for an invalid name, so the
    caller can log them; an invalid member never becomes a subscription.
    """
    readable = {user_channel(user_id)}
    refused = []
    for member in members:
        if is_valid_channel(member):
            readable.add(member)
        else:
            refused.append(member)
    return frozenset(readable), refused


def diff(current: frozenset[str], wanted: frozenset[str]) -> ChannelDiff:
    """What to subscribe and drop to go from ``current`` to ``wanted``."""
    return ChannelDiff(added=wanted - current, removed=current - wanted)


def rights_notice(change: str, channels: Iterable[str]) -> bytes:
    """The message the API publishes on ``user:<id>`` after a grant or revoke.

    Clients see it like any message on their own channel; Sisyphus refreshes the
    user's subscriptions after forwarding it.
    """
    return json.dumps({"rights": change, "channels": sorted(channels)}).encode()
