"""What a user may read and how a change of rights becomes a diff (sisyphus.protocol.rights)."""

from __future__ import annotations

import json
import logging

import pytest

from sisyphus.protocol.rights import RefusalLog, readable_channels, rights_notice


@pytest.mark.parametrize(
    ("members", "readable", "refused"),
    [
        ([], {"user:42"}, []),
        (["room:918"], {"user:42", "room:918"}, []),
        (["room:918", "folder:627"], {"user:42", "room:918", "folder:627"}, []),
        (["user:42"], {"user:42"}, []),
        (["room:918", "room:918"], {"user:42", "room:918"}, []),
        (["user:7"], {"user:42", "user:7"}, []),
        (["news", "org:5:project:7"], {"user:42", "news", "org:5:project:7"}, []),
        (["project.42", "team/alpha"], {"user:42", "project.42", "team/alpha"}, []),
        (["*", "room:*"], {"user:42", "*", "room:*"}, []),
        (["", "room:1 ", "room:1"], {"user:42", "room:1"}, ["", "room:1 "]),
        (["caf\u00e9", "x" * 257], {"user:42"}, ["caf\u00e9", "x" * 257]),
        (["user:42:channels", "user:*"], {"user:42"}, ["user:42:channels", "user:*"]),
        (["bad name", "bad name"], {"user:42"}, ["bad name"]),
    ],
)
def test_readable_channels(members: list[str], readable: set[str], refused: list[str]) -> None:
    """A user reads its own channel plus the valid members of its set; bad ones are reported."""
    channels, refused_members = readable_channels("42", members, RefusalLog())
    assert channels == frozenset(readable)
    assert refused_members == refused


def test_readable_channels_takes_any_iterable() -> None:
    """The members may come as a generator straight from the broker's reply."""
    channels, refused = readable_channels("1", (c for c in ["room:1", "bad one"]), RefusalLog())
    assert channels == {"user:1", "room:1"}
    assert refused == ["bad one"]


def test_each_refused_name_is_logged_once_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bad member is logged once per process with why, however often the set is re-read."""
    refusals = RefusalLog()
    with caplog.at_level(logging.WARNING, logger="sisyphus.rights"):
        for _ in range(3):
            readable_channels("42", ["room:1", "room 1", "user:7:channels"], refusals)
        readable_channels("43", ["room 1"], refusals)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "user=42: ignored channel 'room 1' in its rights set: not printable ASCII, or holds "
        "whitespace (logged once per name)",
        "user=42: ignored channel 'user:7:channels' in its rights set: in the user: namespace "
        "but not user:<id> of a valid user id (logged once per name)",
    ]


def test_refusal_memory_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """Past its limit the refusal log forgets the oldest names instead of growing."""
    refusals = RefusalLog(limit=2)
    with caplog.at_level(logging.WARNING, logger="sisyphus.rights"):
        for name in ["a b", "c d", "e f", "a b"]:
            readable_channels("1", [name], refusals)
        readable_channels("1", ["x" * 100_000], refusals)
        readable_channels("1", ["x" * 100_001], refusals)
    assert len(caplog.records) == 5  # "a b" was forgotten; the two huge names count as one
    assert all(len(record.getMessage()) < 300 for record in caplog.records)


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
