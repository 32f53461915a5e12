"""The sequence groups of a Redis Cluster: chosen one per primary, stored, read back."""

from __future__ import annotations

import pytest

from sisyphus.brokers import groups
from sisyphus.brokers.slots import SLOT_COUNT, SlotMap, slot_of

A, B, C = ("10.0.0.1", 6379), ("10.0.0.2", 6379), ("10.0.0.3", 6379)


def three_primaries() -> SlotMap:
    third = SLOT_COUNT // 3
    return SlotMap.from_ranges([(0, third - 1, A), (third, 2 * third - 1, B),
                                (2 * third, SLOT_COUNT - 1, C)])  # fmt: skip


def test_one_group_per_primary_each_in_a_slot_it_serves() -> None:
    slot_map = three_primaries()
    tags = groups.initial_tags(slot_map)
    assert [slot_map.owner(slot_of(tag)) for tag in tags] == [A, B, C]
    assert groups.parse(groups.encode(tags)) == tags
    assert [layout.sequence_key for layout in groups.layouts(tags)] == [f"{t}:seq" for t in tags]


def test_every_key_and_envelope_of_a_group_is_in_its_slot() -> None:
    layout = groups.layouts(["{sisyphus.7}"])[0]
    names = [layout.epoch_key, layout.sequence_key, layout.timeline_key,
             layout.replication_id_key, layout.history_key("room:{x} 5"),
             layout.sequenced_channel("room:{x}")]  # fmt: skip
    assert {slot_of(name) for name in names} == {slot_of("{sisyphus.7}")}


@pytest.mark.parametrize(
    "stored",
    [b"", b"{sisyphus.1} {sisyphus.1}", b"{other}", b"sisyphus.1", b"{sisyphus.1}x",
     " ".join(f"{{sisyphus.{n}}}" for n in range(65)).encode()],
)  # fmt: skip
def test_a_value_this_service_did_not_write_is_refused(stored: bytes) -> None:
    with pytest.raises(groups.GroupsError):
        groups.parse(stored)
