"""The sequenced-message envelope (sisyphus.brokers.lua): strict, never raising, own channel."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sisyphus.brokers.lua import (
    ENVELOPE_PREFIX,
    SEQUENCED_PREFIX,
    parse_envelope,
    publish_call,
    sequenced_channel,
)
from sisyphus.protocol.names import is_valid_channel


def test_a_well_formed_envelope_gives_its_fields_and_the_payload_untouched() -> None:
    """epoch, seq, time and the payload bytes after the first line."""
    payload = ENVELOPE_PREFIX + b"ab12 42 1700000000\nline 1\nline 2"
    assert parse_envelope(payload) == (b"ab12", 42, 1700000000, b"line 1\nline 2")


@pytest.mark.parametrize(
    "payload",
    [
        b"hello",
        ENVELOPE_PREFIX + b"ab\r 1 1\nx",  # a CR in the epoch once raised in the callback
        ENVELOPE_PREFIX + b"AB 1 1\nx",  # upper case: not an epoch this service makes
        ENVELOPE_PREFIX + b"ab -1 1\nx",
        ENVELOPE_PREFIX + b"ab 1\nx",
        ENVELOPE_PREFIX + b"ab 1 1 1\nx",
        ENVELOPE_PREFIX + b" 1 1\nx",
        ENVELOPE_PREFIX + b"ab 1 1",  # no end of line
        ENVELOPE_PREFIX + b"a" * 17 + b" 1 1\nx",
        ENVELOPE_PREFIX + b"ab " + b"9" * 20 + b" 1\nx",
        ENVELOPE_PREFIX + b"ab \xd9\xa1 1\nx",  # a non-ASCII digit
    ],
)
def test_malformed_envelopes_are_refused_not_raised(payload: bytes) -> None:
    """Anything but the exact form reads as malformed (None)."""
    assert parse_envelope(payload) is None


@given(st.binary(max_size=80))
def test_no_bytes_make_the_parser_raise(payload: bytes) -> None:
    """Arbitrary bytes, with or without the marker, never raise."""
    parse_envelope(payload)
    parse_envelope(ENVELOPE_PREFIX + payload)


def test_sequenced_messages_travel_on_a_channel_no_user_can_read() -> None:
    """The script publishes on `sisyphus:seq <channel>`, a name that is never a valid channel."""
    keys, args = publish_call("room:1", b"x", 10, 60.0, "ep")
    assert args[0] == sequenced_channel("room:1") == SEQUENCED_PREFIX + "room:1"
    assert not is_valid_channel(sequenced_channel("room:1"))
    assert keys[2] == keys[3]  # history key, twice, without rights
