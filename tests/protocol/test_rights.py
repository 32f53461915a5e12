"""What a user may read and how a change of rights becomes a diff (sisyphus.protocol.rights)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sisyphus.protocol.rights import ChannelDiff, diff, readable_channels, rights_notice


@pytest.mark.parametrize(
    ("members", "readable", "refused"),
    [
        ([], {"user:42"}, []),
        (["room:918"], {"user:42", "room:918"}, []),
        (["room:918", "folder:627"], {"user:42", "room:918", "folder:627"}, []),
        (["user:42"], {"user:42"}, []),
        (["room:918", "room:918"], {"user:42", "room:918"}, []),
        (["user:7"], {"user:42", "user:7"}, []),
        (["*"], {"user:42"}, ["*"]),
        (["room:*", "room:1"], {"user:42", "room:1"}, ["room:*"]),
        (["1:channels", "../2", "", "room:1 "], {"user:42"}, ["1:channels", "../2", "", "room:1 "]),
        (["user:42:channels"], {"user:42"}, ["user:42:channels"]),
    ],
)
def test_readable_channels(members: list[str], readable: set[str], refused: list[str]) -> None:
    """A user reads its own channel plus the valid members of its set; bad ones are reported."""
    channels, refused_members = readable_channels("42", members)
    assert channels == frozenset(readable)
    assert refused_members == refused


def test_readable_channels_takes_any_iterable() -> None:
    """The members may come as a generator straight from the broker's reply."""
    channels, refused = readable_channels("1", (c for c in ["room:1", "bad"]))
    assert channels == {"user:1", "room:1"}
    assert refused == ["bad"]


@pytest.mark.parametrize(
    ("current", "wanted", "added", "removed"),
    [
        (set(), set(), set(), set()),
        (set(), {"room:1"}, {"room:1"}, set()),
        ({"room:1"}, set(), set(), {"room:1"}),
        ({"room:1"}, {"room:1"}, set(), set()),
        ({"user:1", "room:1", "room:2"}, {"user:1", "room:2", "room:3"}, {"room:3"}, {"room:1"}),
        ({"a:1", "b:1"}, {"c:1", "d:1"}, {"c:1", "d:1"}, {"a:1", "b:1"}),
    ],
)
def test_diff(current: set[str], wanted: set[str], added: set[str], removed: set[str]) -> None:
    """A refresh subscribes exactly the new channels and drops exactly the removed ones."""
    assert diff(frozenset(current), frozenset(wanted)) == ChannelDiff(
        added=frozenset(added), removed=frozenset(removed)
    )


_CHANNEL_SETS = st.frozensets(st.sampled_from([f"room:{i}" for i in range(8)]))


@given(current=_CHANNEL_SETS, wanted=_CHANNEL_SETS)
def test_applying_a_diff_reaches_the_wanted_set(
    current: frozenset[str], wanted: frozenset[str]
) -> None:
    """Subscribing `added` and dropping `removed` leaves exactly the wanted channels."""
    change = diff(current, wanted)
    assert (current - change.removed) | change.added == wanted
    assert not change.added & change.removed
    assert change.added.isdisjoint(current)
    assert change.removed <= current


def test_channel_diff_is_immutable() -> None:
    """A diff is a value: it can't be changed after the fact."""
    change = diff(frozenset(), frozenset({"room:1"}))
    with pytest.raises(AttributeError):
        change.added = frozenset()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "channels", "expected"),
    [
        ("grant", ["room:2", "room:1"], b'{"rights": "grant", "channels": ["room:1", "room:2"]}'),
        ("revoke", ["room:1"], b'{"rights": "revoke", "channels": ["room:1"]}'),
        ("set", [], b'{"rights": "set", "channels": []}'),
    ],
)
def test_rights_notice(change: str, channels: list[str], expected: bytes) -> None:
    """The notice on `user:<id>` names the change and the channels, sorted."""
    assert rights_notice(change, channels) == expected


def test_rights_notice_takes_a_set() -> None:
    """Channels given as a set come out in a stable, sorted order."""
    notice = rights_notice("grant", {"folder:627", "room:918", "a:1"})
    assert json.loads(notice) == {"rights": "grant", "channels": ["a:1", "folder:627", "room:918"]}
