"""User ids, channel names and the Redis key names derived from them.

Validation here is what keeps one user's id from reaching another user's keys
or channels: ids like ``1:channels``, ``*`` or ``../2`` never pass.
"""

from __future__ import annotations

import re

MAX_USER_ID_LENGTH = 64
MAX_CHANNEL_LENGTH = 128

# Letters, digits, '_' and '-': no ':' (key separator), no glob or path characters.
_USER_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_USER_ID_LENGTH}}}")
# <singular_name>:<id>, e.g. room:918, folder:627, user:42.
_CHANNEL = re.compile(rf"[A-Za-z][A-Za-z0-9_]{{0,62}}:[A-Za-z0-9_-]{{1,{MAX_USER_ID_LENGTH}}}")

USER_CHANNEL_PREFIX = "user:"


class InvalidName(ValueError):
    """A user id or channel name outside the safe character set or length."""


def is_valid_user_id(user_id: str) -> bool:
    return _USER_ID.fullmatch(user_id) is not None


def is_valid_channel(channel: str) -> bool:
    return len(channel) <= MAX_CHANNEL_LENGTH and _CHANNEL.fullmatch(channel) is not None


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
    if not is_valid_channel(channel):
        raise InvalidName(
            f"invalid channel {channel[:80]!r}: expected <name>:<id> such as room:918 "
            "(letters, digits, _ and -)"
        )
    return channel


def user_channel(user_id: str) -> str:
    """The user's own channel, ``user:<id>``; it always belongs to the user."""
    return USER_CHANNEL_PREFIX + user_id


def channels_key(user_id: str) -> str:
    """The Redis SET listing the channels a user may read, ``user:<id>:channels``."""
    return USER_CHANNEL_PREFIX + user_id + ":channels"


def history_key(channel: str) -> str:
    """The Redis stream that retains a channel's messages for resuming streams."""
    return "sisyphus:history:" + channel


def user_of_channel(channel: str) -> str | None:
    """The user id if ``channel`` is a user channel, else ``None``."""
    if channel.startswith(USER_CHANNEL_PREFIX):
        return channel[len(USER_CHANNEL_PREFIX) :]
    return None
