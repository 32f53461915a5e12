"""What a user may read, and the notice a change of rights publishes.

Turning a new set into (un)subscriptions is the hub's job (``Hub.update``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from sisyphus.protocol.names import is_valid_channel, user_channel


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


def rights_notice(change: str, channels: Iterable[str]) -> bytes:
    """The message the API publishes on ``user:<id>`` after a grant or revoke.

    Clients see it like any message on their own channel; Sisyphus refreshes the
    user's subscriptions after forwarding it.
    """
    return json.dumps({"rights": change, "channels": sorted(channels)}).encode()
