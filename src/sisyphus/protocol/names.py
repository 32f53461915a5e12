"""User ids, channel names and the Redis key names derived from them.

Validation here is what keeps one user's id from reaching another user's keys
or channels: ids like ``1:channels``, ``*`` or ``../2`` never pass. Channels
are free-form (the service "doesn't care about the channels"): any name of 1 to
256 bytes of printable ASCII without whitespace, except that a name in the
``user:`` namespace must be exactly ``user:<valid id>``, since a message on it
refreshes that user's rights.
"""

from __future__ import annotations

import re

MAX_USER_ID_LENGTH = 64
MAX_CHANNEL_LENGTH = 256

# Letters, digits, '_' and '-': no ':' (key separator), no glob or path characters.
_USER_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_USER_ID_LENGTH}}}")
# Printable ASCII without whitespace: '!' (0x21) to '~' (0x7e). Channels are pub/sub
# names, never key names: their history key is prefixed (see history_key).
_CHANNEL = re.compile(rf"[!-~]{{1,{MAX_CHANNEL_LENGTH}}}")

USER_CHANNEL_PREFIX = "user:"

_CHANNEL_RULE = f"use 1 to {MAX_CHANNEL_LENGTH} printable ASCII characters without whitespace"


class InvalidName(ValueError):
    """A user id or channel name outside the safe character set or length."""


def is_valid_user_id(user_id: str) -> bool:
    return _USER_ID.fullmatch(user_id) is not None


def channel_problem(channel: str) -> str | None:
    """Why ``channel`` is not a channel name, or ``None`` if it is one."""
    if not channel:
        return "empty"
    if len(channel) > MAX_CHANNEL_LENGTH:
        return f"longer than {MAX_CHANNEL_LENGTH} characters"
    if _CHANNEL.fullmatch(channel) is None:
        return "not printable ASCII, or holds whitespace"
    user_id = user_of_channel(channel)
    if user_id is not None and not is_valid_user_id(user_id):
        return "in the user: namespace but not user:<id> of a valid user id"
    return None


def is_valid_channel(channel: str) -> bool:
    return channel_problem(channel) is None


def check_user_id(user_id: str) -> str:
    """Return ``user_id`` if valid, else raise :class:`InvalidName` saying why."""
    if not is_valid_user_id(user_id):
        raise InvalidName(
            f"invalid user id {user_id[:80]!r}: use 1 to {MAX_USER_ID_LENGTH} "
            "characters among A-Z a-z 0-9 _ -"
        )
    return user_id


def check_channel(channel: str) -> str:
    """Return ``channel`` if valid, else raise :class:`InvalidName` saying why."""
    problem = channel_problem(channel)
    if problem is not None:
        raise InvalidName(f"invalid channel {channel[:80]!r}: {problem}; {_CHANNEL_RULE}")
    return channel


def user_channel(user_id: str) -> str:
    """The user's own channel, ``user:<id>``; it always belongs to the user."""
    return USER_CHANNEL_PREFIX + user_id


_CHANNELS_SUFFIX = ":channels"


def channels_key(user_id: str) -> str:
    """The Redis SET listing the channels a user may read, ``user:<id>:channels``."""
    return USER_CHANNEL_PREFIX + user_id + _CHANNELS_SUFFIX


def user_of_channels_key(key: str) -> str | None:
    """The user whose :func:`channels_key` ``key`` is, or ``None`` for any other key."""
    if key.startswith(USER_CHANNEL_PREFIX) and key.endswith(_CHANNELS_SUFFIX):
        return key[len(USER_CHANNEL_PREFIX) : -len(_CHANNELS_SUFFIX)]
    return None


def history_key(channel: str) -> str:
    """The Redis stream that retains a channel's messages for resuming streams."""
    return "sisyphus:history:" + channel


def user_of_channel(channel: str) -> str | None:
    """The user id if ``channel`` is a user channel, else ``None``."""
    if channel.startswith(USER_CHANNEL_PREFIX):
        return channel[len(USER_CHANNEL_PREFIX) :]
    return None
