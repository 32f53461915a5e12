"""What a user may read and how a change of rights becomes a diff (sisyphus.protocol.rights)."""

from __future__ import annotations

import json

import pytest

from sisyphus.protocol.rights import readable_channels, rights_notice


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
