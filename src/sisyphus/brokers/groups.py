"""The sequence groups of a Redis Cluster: which sequence each channel's messages take.

On one Redis, one sequence orders every message. On a cluster one sequence would put
every sequenced publish, history and envelope on one primary, so the channels are
spread over several sequences, "groups": each group's sequence, histories and
envelopes share a hash tag (``{sisyphus.<n>}``), so each script touches one slot and
each group's envelopes reach a process on one link, in seq order. A channel belongs to
group ``crc32(name) % G`` (:func:`~sisyphus.protocol.resume.channel_group`), and an id
carries one seq per group.

The groups are chosen once, by the first process or publisher that finds the cluster
without them: one per primary, each tag in a slot that primary serves then, so the
sequenced load starts spread (slots may move later; the groups stay). They are stored
under ``sisyphus:groups`` (tags separated by spaces) and every process and publisher
reads them from there, so all agree; ``SET NX`` settles a race.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from sisyphus.brokers.lua import CLUSTER_PUBLISH_SCRIPT, KeyLayout
from sisyphus.brokers.slots import Address, SlotMap, slot_of
from sisyphus.protocol.resume import MAX_GROUPS

GROUPS_KEY = "sisyphus:groups"
_TAG = re.compile(r"\{sisyphus\.[0-9]{1,6}\}")
# Tags tried per primary before giving up (a primary with very few slots).
_SEARCH = 1_000_000


class GroupsError(ValueError):
    """``sisyphus:groups`` holds something this service did not write."""


def choose_tags(
    owner_of: Callable[[int], Address | None], primaries: Sequence[Address]
) -> list[str]:
    """One tag per primary (in the order given), each hashing to a slot it serves."""
    wanted = set(primaries)
    found: dict[Address, str] = {}
    for number in range(_SEARCH):
        if len(found) == len(wanted):
            break
        tag = f"{{sisyphus.{number}}}"
        owner = owner_of(slot_of(tag))
        if owner in wanted and owner not in found:
            found[owner] = tag
    tags = [found[primary] for primary in primaries if primary in found]
    return tags[:MAX_GROUPS]


def initial_tags(slot_map: SlotMap) -> list[str]:
    """The groups of a cluster that has none yet: one per primary, in slot order."""
    primaries = sorted(slot_map.primaries(), key=slot_map.first_slot)
    return choose_tags(slot_map.owner, primaries)


def encode(tags: Sequence[str]) -> str:
    return " ".join(tags)


def parse(value: bytes | str) -> list[str]:
    """The tags stored under ``sisyphus:groups``; :class:`GroupsError` if malformed."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    tags = text.split()
    if not 0 < len(tags) <= MAX_GROUPS or len(set(tags)) != len(tags):
        raise GroupsError(f"{GROUPS_KEY} must hold 1 to {MAX_GROUPS} distinct tags: {text[:80]!r}")
    for tag in tags:
        if _TAG.fullmatch(tag) is None:
            raise GroupsError(f"{GROUPS_KEY} holds {tag[:40]!r}, not a tag like {{sisyphus.0}}")
    return tags


def layouts(tags: Sequence[str]) -> list[KeyLayout]:
    """Each group's keys and envelope channels."""
    return [KeyLayout(tag, "SPUBLISH", CLUSTER_PUBLISH_SCRIPT) for tag in tags]
