"""Catch-up order (sisyphus.server.replay): replayed and held messages, each once, ids forward."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sisyphus.hub.subscriber import Held
from sisyphus.protocol.resume import EventId, HistoryEntry
from sisyphus.server.replay import frames, merge


def held(seq: int, channel: str = "room:1", payload: bytes = b"x") -> Held:
    return Held(EventId("ep", (seq,), 5).encode(), seq, channel, payload, (seq,), 0, 5)


def plain(after: int, channel: str = "room:1", payload: bytes = b"p") -> Held:
    return Held(b"", None, channel, payload, (after,))


def entry(seq: int, channel: str = "room:2", payload: bytes = b"r") -> HistoryEntry:
    return HistoryEntry(seq, channel, payload, 5)


def test_replayed_messages_go_before_later_held_ones() -> None:
    """A new channel's replay (seq 4) is written before a live message with a higher seq (6)."""
    merged = merge("ep", [entry(4)], [held(6)], after=(3,))
    assert [m.seq for m in merged] == [4, 6]


def test_a_message_both_replayed_and_held_comes_once() -> None:
    """A message that arrived live during the history read is not written twice."""
    merged = merge("ep", [entry(4, "room:1"), entry(5, "room:1")], [held(5), held(7)], after=(3,))
    assert [m.seq for m in merged] == [4, 5, 7]


def test_held_messages_the_client_already_has_are_dropped() -> None:
    """A held message at or before the resume position is not delivered again."""
    assert [m.seq for m in merge("ep", [], [held(2), held(3), held(4)], after=(3,))] == [4]


def test_a_plain_publish_goes_right_after_the_seq_it_arrived_behind() -> None:
    """Plain messages keep their place among sequenced ones on the same channel."""
    merged = merge("ep", [entry(5), entry(7)], [plain(5), held(6), plain(7)], after=(4,))
    assert [(m.seq, m.position[0]) for m in merged] == [
        (5, 5),
        (None, 5),
        (6, 6),
        (7, 7),
        (None, 7),
    ]


def test_a_plain_publish_repeats_the_id_before_it() -> None:
    """A plain PUBLISH never moves the stream's position: it carries the previous id."""
    out, last = frames([plain(3), held(4), plain(4)], b"ep-3-5", json_flavour=False)
    assert out == [
        b"id: ep-3-5\ndata: p\n\n",
        b"id: ep-4-5\ndata: x\n\n",
        b"id: ep-4-5\ndata: p\n\n",
    ]
    assert last == b"ep-4-5"


@given(
    replayed=st.sets(st.integers(1, 60), max_size=20),
    live=st.sets(st.integers(1, 60), max_size=20),
    plains=st.lists(st.integers(0, 60), max_size=10),
    after=st.integers(0, 30),
)
def test_ids_never_go_backwards_and_nothing_repeats(
    replayed: set[int], live: set[int], plains: list[int], after: int
) -> None:
    """Whatever was replayed and held, the catch-up's seqs rise strictly and none repeats."""
    entries = [entry(seq) for seq in sorted(s for s in replayed if s > after)]
    arrivals = sorted([(seq, 0) for seq in live] + [(p, 1) for p in plains])
    held_messages = [held(seq) if kind == 0 else plain(seq) for seq, kind in arrivals]
    merged = merge("ep", entries, held_messages, (after,))
    seqs = [m.seq for m in merged if m.seq is not None]
    assert seqs == sorted(set(seqs))
    assert set(seqs) == {s for s in replayed if s > after} | {s for s in live if s > after}
    assert sum(1 for m in merged if m.seq is None) == len(plains)
    positions = [m.position for m in merged]
    assert positions == sorted(positions)
    _, last = frames(merged, b"ep-0-5", json_flavour=False)
    assert last == (EventId("ep", (max(seqs),), 5).encode() if seqs else b"ep-0-5")


def grouped(seq: int, group: int, channel: str = "room:1") -> Held:
    return Held(b"held", seq, channel, b"%d" % seq, (), group, 5)


def test_with_groups_each_group_merges_by_seq_held_in_arrival_order() -> None:
    """Several sequence groups: no order across them but arrival, so each group's replayed
    and held messages merge by seq (each once), the held ones in their arrival order, and
    each id moves forward group by group."""
    replayed = [
        HistoryEntry(4, "a", b"4", 5, 0),
        HistoryEntry(20, "b", b"20", 5, 1),
        HistoryEntry(5, "a", b"5", 5, 0),
    ]
    held = [grouped(5, 0), grouped(21, 1), plain(0), grouped(3, 0), grouped(6, 0)]
    merged = merge("ep", replayed, held, after=(3, 19))
    order = [(m.group, m.seq) for m in merged]
    assert order == [(0, 4), (0, 5), (1, 20), (1, 21), (0, None), (0, 6)]
    assert [m.event_id for m in merged if m.seq is not None] == [
        b"ep-4.19-5",
        b"ep-5.19-5",
        b"ep-5.20-5",
        b"ep-5.21-5",
        b"ep-6.21-5",
    ]
    plain_one = next(m for m in merged if m.seq is None)
    assert plain_one.position == (5, 21)  # after what came before it


def test_with_groups_a_refresh_keeps_what_its_old_channels_held() -> None:
    """A rights refresh replays the added channel only (``c``); a message of a channel the
    stream already read (``a``, same group, a lower seq) held meanwhile is kept, in order."""
    replayed = [HistoryEntry(4, "c", b"c4", 5, 0)]
    held = [grouped(3, 0, "a"), grouped(5, 0, "a")]
    merged = merge("ep", replayed, held, after=(2, 0))
    assert [(m.channel, m.seq) for m in merged] == [("a", 3), ("c", 4), ("a", 5)]
    assert [m.event_id for m in merged] == [b"ep-3.0-5", b"ep-4.0-5", b"ep-5.0-5"]
