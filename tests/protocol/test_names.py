"""User ids, channel names and the keys derived from them (sisyphus.protocol.names)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sisyphus.protocol import names
from sisyphus.protocol.names import InvalidName

VALID_USER_IDS = [
    "1",
    "42",
    "alice",
    "Alice_Smith-2",
    "_",
    "-",
    "-1",
    "0",
    "a" * 64,
    "0123456789",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-",
]

INVALID_USER_IDS = [
    "",
    "a" * 65,
    "1:channels",
    "42:channels",
    ":",
    "user:42",
    "*",
    "4*",
    "?",
    "[1]",
    "../2",
    "..",
    ".",
    "1/2",
    "1\\2",
    "1 2",
    " 1",
    "1 ",
    "1\n",
    "1\r",
    "1\r\n",
    "\n",
    "1\t",
    "1\x00",
    "1\x0b",
    "1\x0c",
    "1\u00a0",
    "1\u2028",
    "caf\u00e9",
    "\u0661",  # ARABIC-INDIC DIGIT ONE: a digit to str.isdigit(), not to us
    "\uff11",  # FULLWIDTH DIGIT ONE
    "\uff41",  # FULLWIDTH LATIN SMALL LETTER A
    "\u212a",  # KELVIN SIGN, which lower-cases to "k"
    "1.0",
    "a@b",
    "a,b",
    "a+b",
    "%2e%2e",
    "1;2",
    "a'b",
    'a"b',
]


@pytest.mark.parametrize("user_id", VALID_USER_IDS)
def test_valid_user_ids(user_id: str) -> None:
    """Ids of 1 to 64 letters, digits, `_` and `-` are accepted as they are."""
    assert names.is_valid_user_id(user_id)
    assert names.check_user_id(user_id) == user_id


@pytest.mark.parametrize("user_id", INVALID_USER_IDS)
def test_invalid_user_ids(user_id: str) -> None:
    """Ids that could reach other keys (`:`, `*`, `/`, spaces, unicode...) are refused."""
    assert not names.is_valid_user_id(user_id)
    with pytest.raises(InvalidName, match="invalid user id"):
        names.check_user_id(user_id)


def test_invalid_user_id_message_names_the_value_and_the_rule() -> None:
    """The error quotes the bad id and says which characters are allowed."""
    with pytest.raises(InvalidName) as caught:
        names.check_user_id("../2")
    assert str(caught.value) == (
        "invalid user id '../2': use 1 to 64 characters among A-Z a-z 0-9 _ -"
    )


def test_invalid_user_id_message_is_bounded() -> None:
    """A huge hostile id is cut in the error message instead of flooding the log."""
    with pytest.raises(InvalidName) as caught:
        names.check_user_id("x" * 100_000)
    assert len(str(caught.value)) < 200


def test_invalid_name_is_a_value_error() -> None:
    """Callers that catch ValueError also catch a refused name."""
    assert issubclass(InvalidName, ValueError)


VALID_CHANNELS = [
    "room:918",
    "folder:627",
    "user:42",
    "user:alice",
    "user:-1",
    "a:1",
    "Room:1",
    "chat_room:abc-DEF_1",
    "x1:y",
    # The seed "doesn't care about the channels": any printable ASCII without whitespace.
    "news",
    "a",
    "org:5:project:7",
    "project.42",
    "team/alpha",
    "room",
    "room:",
    ":918",
    ":",
    "1:channels",
    "room:918:x",
    "*",
    "room:*",
    "room:9?",
    "room:[1]",
    "../2",
    "my-room:1",
    "_room:1",
    "1room:918",
    'say"hi"',
    "back\\slash",
    "!#$%&'()*+,-./:;<=>?@[]^_`{|}~",
    "Users:42",  # not the user: namespace (it is case-sensitive)
    "x" * 256,  # the longest
]

INVALID_CHANNELS = [
    "",
    "x" * 257,
    "room: 918",
    "room :918",
    " room:918",
    "room:918 ",
    "room:918\n",
    "room:918\r",
    "room:918\r\n",
    "room\n:918",
    "room:9\x0018",
    "room:\t918",
    "room\x7f",
    "room\x0b1",
    "room\x0c1",
    "caf\u00e9:1",
    "room:\u0661",
    "room:\u00a0",
    "\uff52oom:1",
    "room\u2028",
    # The user: namespace holds only user:<valid id>: a message there refreshes that user.
    "user:",
    "user:42:channels",
    "user:*",
    "user:../2",
    "user:" + "1" * 65,
]


@pytest.mark.parametrize("channel", VALID_CHANNELS)
def test_valid_channels(channel: str) -> None:
    """Any name of 1 to 256 printable ASCII characters without whitespace is a channel."""
    assert names.is_valid_channel(channel)
    assert names.check_channel(channel) == channel
    assert names.channel_problem(channel) is None


@pytest.mark.parametrize("channel", INVALID_CHANNELS)
def test_invalid_channels(channel: str) -> None:
    """Empty, too long, whitespace, control or non-ASCII names, and bad user: names are refused."""
    assert not names.is_valid_channel(channel)
    with pytest.raises(InvalidName, match="invalid channel"):
        names.check_channel(channel)


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        (
            "room *",
            "invalid channel 'room *': not printable ASCII, or holds whitespace; "
            "use 1 to 256 printable ASCII characters without whitespace",
        ),
        ("", "invalid channel '': empty; use 1 to 256"),
        ("x" * 257, "invalid channel '" + "x" * 80 + "': longer than 256 characters; use 1 to"),
        (
            "user:1:channels",
            "invalid channel 'user:1:channels': in the user: namespace but not user:<id> "
            "of a valid user id",
        ),
    ],
)
def test_invalid_channel_message_names_the_value_and_the_rule(channel: str, message: str) -> None:
    """The error quotes the bad channel and says why it is refused."""
    with pytest.raises(InvalidName) as caught:
        names.check_channel(channel)
    assert str(caught.value).startswith(message)


def test_invalid_channel_message_is_bounded() -> None:
    """A huge hostile channel name is cut in the error message."""
    with pytest.raises(InvalidName) as caught:
        names.check_channel("room:" + "1" * 100_000)
    assert len(str(caught.value)) < 250


def test_longest_channel_is_the_limit() -> None:
    """The longest accepted channel name is exactly MAX_CHANNEL_LENGTH characters."""
    assert len(VALID_CHANNELS[-1]) == names.MAX_CHANNEL_LENGTH == 256
    assert names.MAX_USER_ID_LENGTH == 64


# Key helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_id", "channel", "key"),
    [
        ("42", "user:42", "user:42:channels"),
        ("alice", "user:alice", "user:alice:channels"),
        ("-", "user:-", "user:-:channels"),
    ],
)
def test_user_keys(user_id: str, channel: str, key: str) -> None:
    """A user reads `user:<id>` and its rights live in the SET `user:<id>:channels`."""
    assert names.user_channel(user_id) == channel
    assert names.channels_key(user_id) == key


@pytest.mark.parametrize(
    ("channel", "key"),
    [("room:918", "sisyphus:history:room:918"), ("user:42", "sisyphus:history:user:42")],
)
def test_history_key(channel: str, key: str) -> None:
    """A channel's retained messages live under `sisyphus:history:<channel>`."""
    assert names.history_key(channel) == key


@pytest.mark.parametrize(
    ("channel", "user_id"),
    [
        ("user:42", "42"),
        ("user:alice", "alice"),
        ("room:42", None),
        ("users:42", None),
        ("User:42", None),
        ("xuser:42", None),
        ("folder:627", None),
    ],
)
def test_user_of_channel(channel: str, user_id: str | None) -> None:
    """Only `user:<id>` channels belong to a user; every other channel belongs to none."""
    assert names.user_of_channel(channel) == user_id


# Properties -----------------------------------------------------------------------

_ANY_TEXT = st.text() | st.from_regex(r"[A-Za-z0-9_:*/ \n-]{0,70}", fullmatch=True)


@given(user_id=_ANY_TEXT)
def test_accepted_user_ids_cannot_escape_their_keys(user_id: str) -> None:
    """An accepted id has no `:`, `*`, `/` or whitespace, so its key is its own."""
    if not names.is_valid_user_id(user_id):
        with pytest.raises(InvalidName):
            names.check_user_id(user_id)
        return
    assert not any(c in user_id for c in ":*/")
    assert not any(c.isspace() for c in user_id)
    assert 1 <= len(user_id) <= names.MAX_USER_ID_LENGTH
    assert names.channels_key(user_id) == "user:" + user_id + ":channels"
    assert names.user_channel(user_id) == "user:" + user_id


@given(user_id=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_a_valid_user_has_a_valid_own_channel(user_id: str) -> None:
    """Every valid user's own channel is a valid channel that maps back to the user."""
    assert names.is_valid_user_id(user_id)
    channel = names.user_channel(user_id)
    assert names.is_valid_channel(channel)
    assert names.user_of_channel(channel) == user_id


@given(channel=_ANY_TEXT)
def test_accepted_channels_are_printable_ascii(channel: str) -> None:
    """An accepted channel is short printable ASCII, and a user: channel names a valid user."""
    if not names.is_valid_channel(channel):
        with pytest.raises(InvalidName):
            names.check_channel(channel)
        return
    assert 1 <= len(channel.encode()) <= names.MAX_CHANNEL_LENGTH
    assert channel.isascii() and channel.isprintable()
    assert not any(c.isspace() for c in channel)
    user_id = names.user_of_channel(channel)
    assert user_id is None or names.is_valid_user_id(user_id)
