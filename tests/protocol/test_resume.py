"""Event ids as positions with one seq per sequence group (several on a Redis Cluster)."""

from __future__ import annotations

import pytest

from sisyphus.protocol.resume import (
    MAX_GROUPS,
    RESET_EPOCH,
    RESET_LIMIT,
    RESET_RETENTION,
    ChannelHistory,
    EventId,
    HistoryEntry,
    InvalidEventId,
    channel_group,
    history_name,
    parse_event_id,
    plan_replay,
    start_position,
    wire_size,
)


def test_an_id_carries_one_seq_per_group_and_one_group_reads_as_before() -> None:
    assert parse_event_id("ab12-7-1700000000") == EventId("ab12", (7,), 1700000000)
    grouped = parse_event_id("ab12-7.0.31-1700000000")
    assert grouped == EventId("ab12", (7, 0, 31), 1700000000)
    assert grouped.encode() == b"ab12-7.0.31-1700000000"


@pytest.mark.parametrize(
    "text",
    [
        "ab-1.-5",
        "ab-.1-5",
        "ab-1..2-5",
        "ab-1.2",
        "ab-" + ".".join(["1"] * (MAX_GROUPS + 1)) + "-5",
    ],
)
def test_malformed_or_too_many_groups_are_refused(text: str) -> None:
    with pytest.raises(InvalidEventId):
        parse_event_id(text)


def test_the_history_name_covers_every_group() -> None:
    assert history_name(["only"]) == "only"
    both = history_name(["a1", "b2"])
    assert both != history_name(["a1", "b3"]) and both != history_name(["b2", "a1"])
    assert len(both) <= 16 and both.isalnum()


def test_a_channel_keeps_its_group() -> None:
    assert channel_group("room:5", 1) == 0
    assert channel_group("room:5", 3) == channel_group("room:5", 3) < 3
    assert {channel_group(f"room:{n}", 3) for n in range(30)} == {0, 1, 2}


def test_a_stream_starts_where_its_id_says_group_by_group() -> None:
    current, oldest = (10, 20, 30), (1, 1, 25)
    assert start_position(None, "e", current, oldest) == (current, None)
    assert start_position(EventId("e", (9, 20, 29), 0), "e", current, oldest) == ((9, 20, 29), None)
    # An id ahead of the broker in any group, of another history, or of another group count.
    assert start_position(EventId("e", (9, 21, 29), 0), "e", current, oldest)[1] == RESET_EPOCH
    assert start_position(EventId("x", (9, 20, 29), 0), "e", current, oldest)[1] == RESET_EPOCH
    assert start_position(EventId("e", (9, 20), 0), "e", current, oldest)[1] == RESET_EPOCH
    # Behind the retention edge of one group: messages it missed there are gone.
    assert start_position(EventId("e", (9, 20, 10), 0), "e", current, oldest)[1] == RESET_RETENTION


def entry(seq: int, channel: str, group: int, time: int = 100) -> HistoryEntry:
    return HistoryEntry(seq, channel, f"{channel} {seq}".encode(), time, group)


def test_a_replay_keeps_each_groups_order_and_interleaves_groups_by_time() -> None:
    histories = [
        ChannelHistory([entry(3, "a", 0, 100), entry(7, "a", 0, 102)], trimmed=False),
        ChannelHistory([entry(5, "b", 0, 101)], trimmed=False),
        ChannelHistory([entry(40, "c", 1, 101), entry(41, "c", 1, 103)], trimmed=False),
    ]
    replay = plan_replay(histories, "e", 100, 1 << 20, (0, 0))
    assert [(e.group, e.seq) for e in replay.entries] == [(0, 3), (0, 5), (1, 40), (0, 7), (1, 41)]


def test_a_replay_is_bounded_with_the_ids_other_groups_counted() -> None:
    entries = [entry(seq, "a", 0) for seq in range(1, 11)]
    one_group = sum(wire_size("e", e) for e in entries)
    histories = [ChannelHistory(entries, trimmed=False)]
    assert plan_replay(histories, "e", 100, one_group, (0,)).reset is None
    # With two groups, each id also carries the other group's seq: more bytes.
    assert plan_replay(histories, "e", 100, one_group, (0, 12345)).reset == RESET_LIMIT
