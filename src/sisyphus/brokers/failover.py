"""No id is handed out twice when Redis loses its latest writes (a failover, a crash).

Redis replicates asynchronously: a replica promoted by Sentinel, or a server restarted
from an append-only file, may lack the last messages the old one acknowledged and sent
out. Their ids are in browsers; if the sequence went on from the new server's lower
value, new messages would reuse those numbers, and a browser resuming from one of them
would skip the new messages that reuse smaller ones, with no ``reset``.

A server whose history diverged gets a new replication id (``master_replid`` in ``INFO
replication``). Each command link, once connected, compares it with the one stored
beside the sequence; if they differ, the sequence jumps ahead by :data:`SEQUENCE_GAP`,
more than any number of messages a replica may lag by, so every id handed out from now
on is above every id the old server handed out. A browser holding a lost id resumes
from it and gets everything published since; one holding an older id resumes as before.
Only the first process to see the new server makes the jump (the script is atomic and
stores the new replication id).
"""

from __future__ import annotations

from sisyphus.brokers.lua import SINGLE_LAYOUT, KeyLayout

REPLICATION_ID_KEY = SINGLE_LAYOUT.replication_id_key
# Far more messages than a replica ever lags by; ids stay far below 19 digits for
# billions of failovers.
SEQUENCE_GAP = 1_000_000_000

# KEYS: the stored replication id, the sequence. ARGV: the server's replication id, the gap.
# Returns 1 when the sequence jumped.
GUARD_SCRIPT = """
local stored = redis.call('GET', KEYS[1])
if stored == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if not stored or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('INCRBY', KEYS[2], ARGV[2])
return 1
"""


def replication_id(info: bytes | str) -> str | None:
    """``master_replid`` from an ``INFO replication`` answer (``None`` if it has none)."""
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else info
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "master_replid" and value.strip():
            return value.strip()
    return None


def guard_call(replid: str, layout: KeyLayout = SINGLE_LAYOUT) -> tuple[str, ...]:
    """The ``EVAL`` command that stores ``replid`` and moves the sequence on if it changed."""
    return ("EVAL", GUARD_SCRIPT, "2", layout.replication_id_key, layout.sequence_key,
            replid, str(SEQUENCE_GAP))  # fmt: skip
