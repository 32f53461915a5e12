"""The one Redis script behind every sequenced publish (API, CLI, Python helper).

In one atomic step it takes the next number of the global sequence, appends
the message to the channel's history stream under that number, optionally
changes a rights set first, and publishes the message wrapped in a small
envelope that carries its position. Ids assigned apart from the publish, or
from clocks, are how other hubs lose or duplicate messages; this can't.

The envelope travels on its own Redis channel, ``sisyphus:seq <channel>``,
never on ``<channel>`` itself. Whatever bytes a plain ``PUBLISH <channel>``
carries (payloads relayed from end users included), they are delivered as a
payload: no payload can pose as a sequenced message. The space in the name
keeps it apart from every channel a user can read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sisyphus.protocol.names import channels_key
from sisyphus.protocol.resume import OVER_BUDGET, ChannelHistory, HistoryEntry

EPOCH_KEY = "sisyphus:epoch"
SEQUENCE_KEY = "sisyphus:seq"
# A sorted set: one member per second that saw a publish, the second as score and the
# first seq published in it as member. The retention age is decided from it.
TIMELINE_KEY = "sisyphus:timeline"

# The envelope: RS (0x1e), "s1 <epoch> <seq> <time>\n", then the payload as published.
ENVELOPE_PREFIX = b"\x1es1 "
# Sequenced messages are published on this prefix + the channel name.
SEQUENCED_PREFIX = "sisyphus:seq "
SEQUENCED_PREFIX_BYTES = SEQUENCED_PREFIX.encode("ascii")

_EPOCH_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyz")


_PUBLISH_SCRIPT = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[1], epoch)
end
if ARGV[6] ~= '' then
  redis.call(ARGV[6], KEYS[4], unpack(ARGV, 7))
end
local seq = redis.call('INCR', KEYS[2])
local now = redis.call('TIME')[1]
local newest_here = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local before = '0'
if #newest_here > 0 then
  before = string.match(newest_here[1][1], '^(%d+)')
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], seq .. '-0',
  'p', ARGV[2], 't', now, 'v', before)
redis.call('EXPIRE', KEYS[3], ARGV[4])
local newest = redis.call('ZREVRANGE', KEYS[5], 0, 0, 'WITHSCORES')
if #newest == 0 or tonumber(newest[2]) < tonumber(now) then
  redis.call('ZADD', KEYS[5], now, seq)
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. (tonumber(now) - tonumber(ARGV[4])))
end
redis.call('<PUBLISH>', ARGV[1], '\\30s1 ' .. epoch .. ' ' .. seq .. ' ' .. now .. '\\n' .. ARGV[2])
return {epoch, seq, tonumber(now)}
"""
PUBLISH_SCRIPT = _PUBLISH_SCRIPT.replace("<PUBLISH>", "PUBLISH")
# On a Redis Cluster the envelope goes out on the sequence's shard: a script may only
# publish on a shard channel of the slot its keys are in.
CLUSTER_PUBLISH_SCRIPT = _PUBLISH_SCRIPT.replace("<PUBLISH>", "SPUBLISH")


def sequenced_channel(channel: str) -> str:
    """The Redis channel that carries ``channel``'s sequenced messages."""
    return SEQUENCED_PREFIX + channel


@dataclass(frozen=True)
class KeyLayout:
    """Where the sequence, the histories and the envelopes' channels live.

    On one Redis, under ``sisyphus:``. On a Redis Cluster, one layout per sequence
    group, each in the hash slot of its tag (``{sisyphus.<n>}``, see
    :mod:`sisyphus.brokers.groups`): every script then touches one slot, and a group's
    envelopes are shard channels of that slot, so one pub/sub link hears all of them,
    in seq order. Users' sets keep the seed's names (the main application writes
    them), so they spread over the cluster.
    """

    prefix: str
    # PUBLISH on one Redis, SPUBLISH (a shard channel) on a Cluster.
    publish_verb: str
    publish_script: str

    @property
    def epoch_key(self) -> str:
        return self.prefix + ":epoch"

    @property
    def sequence_key(self) -> str:
        return self.prefix + ":seq"

    @property
    def timeline_key(self) -> str:
        return self.prefix + ":timeline"

    @property
    def replication_id_key(self) -> str:
        return self.prefix + ":replid"

    @property
    def sequenced_prefix(self) -> str:
        return self.prefix + ":seq "

    def history_key(self, channel: str) -> str:
        return self.prefix + ":history:" + channel

    def sequenced_channel(self, channel: str) -> str:
        return self.sequenced_prefix + channel


SINGLE_LAYOUT = KeyLayout("sisyphus", "PUBLISH", PUBLISH_SCRIPT)


# The user's rights set, the current position and the retention edge (the first seq
# published within ARGV[2] seconds), in one round trip. A rights key of another type
# than SET reads as an unknown user (its type is returned for the log).
SNAPSHOT_SCRIPT = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local members = {}
if kind == 'set' then
  members = redis.call('SMEMBERS', KEYS[1])
end
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
local seq = redis.call('GET', KEYS[3]) or '0'
local now = tonumber(redis.call('TIME')[1])
local first = redis.call('ZRANGEBYSCORE', KEYS[4], now - tonumber(ARGV[2]), '+inf', 'LIMIT', 0, 1)
local oldest = first[1] or tostring(tonumber(seq) + 1)
return {kind, epoch, seq, members, oldest}
"""

# SNAPSHOT_SCRIPT without the user's set, for a Redis Cluster (the set is in another
# slot): the current position and the retention edge.
POSITION_SCRIPT = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
local seq = redis.call('GET', KEYS[2]) or '0'
local now = tonumber(redis.call('TIME')[1])
local first = redis.call('ZRANGEBYSCORE', KEYS[3], now - tonumber(ARGV[2]), '+inf', 'LIMIT', 0, 1)
local oldest = first[1] or tostring(tonumber(seq) + 1)
return {epoch, seq, oldest}
"""

# The last seq published before ARGV[1] (Unix seconds), from the timeline (the first seq
# of every second that saw a publish): a group's read back to a moment, not a seq.
REWIND_SCRIPT = """
local first = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, 1)
if first[1] then
  return tonumber(first[1]) - 1
end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""

# Per channel: whether a message after the position was trimmed (the first retained
# entry's `v` names the one before it on the same channel), and the retained entries
# after it. The work is bounded over all channels: once more than
# ARGV[2] entries or ARGV[3] payload bytes are found, it stops and answers {1}
# (over budget); a trimmed channel stops it with {2}. Nothing published since the
# position (the usual case for a fresh connect) costs one GET.
HISTORY_SCRIPT = """
local after = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[3])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current <= after then
  return {}
end
local out = {0}
local found = 0
local size = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[i])
    local fields = {}
    for j = 1, #info, 2 do
      fields[info[j]] = info[j + 1]
    end
    if fields['entries-added'] > fields['length'] and fields['first-entry'] then
      -- The message before the first retained one on this channel was trimmed: its
      -- seq is kept in the first one's 'v' (the sequence is global, so first - 1 is not).
      local first = fields['first-entry']
      local before = nil
      for j = 1, #first[2], 2 do
        if first[2][j] == 'v' then
          before = tonumber(first[2][j + 1])
        end
      end
      if before == nil then
        before = tonumber(string.match(first[1], '^(%d+)')) - 1
      end
      if after < before then
        return {2}
      end
    end
    local entries = redis.call(
      'XRANGE', KEYS[i], '(' .. ARGV[1] .. '-0', '+', 'COUNT', limit - found + 1)
    found = found + #entries
    for j = 1, #entries do
      size = size + #entries[j][2][2]
    end
    if found > limit or size > max_bytes then
      return {1}
    end
    out[#out + 1] = entries
  else
    out[#out + 1] = {}
  end
end
return out
"""


def publish_call(
    channel: str,
    payload: bytes,
    history_size: int,
    history_max_age: float,
    epoch_candidate: str,
    rights: tuple[str, str, list[str]] | None = None,
    layout: KeyLayout = SINGLE_LAYOUT,
) -> tuple[list[str], list[str | bytes]]:
    """KEYS and ARGV for ``layout.publish_script``; ``rights`` is (SADD|SREM, user,
    channels), only on one Redis (on a Cluster the set is in another slot)."""
    history = layout.history_key(channel)
    keys = [layout.epoch_key, layout.sequence_key, history, history, layout.timeline_key]
    args: list[str | bytes] = [
        layout.sequenced_channel(channel),
        payload,
        str(history_size),
        str(max(1, int(history_max_age))),
        epoch_candidate,
        "",
    ]
    if rights is not None:
        if layout is not SINGLE_LAYOUT:
            raise ValueError("on a Redis Cluster, change the set apart from the publish")
        verb, user_id, channels = rights
        keys[3] = channels_key(user_id)
        args[5] = verb
        args.extend(channels)
    return keys, args


def parse_envelope(payload: bytes) -> tuple[bytes, int, int, bytes] | None:
    """(epoch, seq, time, payload) of an enveloped message; ``None`` if it is malformed.

    Strict, because the fields become event ids: an epoch of 1-16 lowercase letters
    or digits, a seq of 1-19 digits, a time of 1-12 digits; never raises.
    """
    if not payload.startswith(ENVELOPE_PREFIX):
        return None
    end = payload.find(b"\n", 0, 64)
    if end < 0:
        return None
    fields = payload[len(ENVELOPE_PREFIX) : end].split(b" ")
    if len(fields) != 3:
        return None
    epoch, seq, time = fields
    if not 0 < len(epoch) <= 16 or not _EPOCH_CHARS.issuperset(epoch):
        return None
    if not (0 < len(seq) <= 19 and seq.isdigit() and 0 < len(time) <= 12 and time.isdigit()):
        return None
    return epoch, int(seq), int(time), payload[end + 1 :]


def history_reply(channels: list[str], reply: list[Any], group: int = 0) -> list[ChannelHistory]:
    """:data:`HISTORY_SCRIPT`'s answer for ``channels`` (of one sequence group)."""
    if not reply:
        return []  # nothing published since the position
    if reply[0] == 1:
        return OVER_BUDGET
    if reply[0] == 2:
        return [ChannelHistory([], trimmed=True)]
    return [
        ChannelHistory([_entry(channel, entry_id, fields, group) for entry_id, fields in entries],
                       trimmed=False)
        for channel, entries in zip(channels, reply[1:], strict=True)
    ]  # fmt: skip


def _entry(channel: str, entry_id: bytes, fields: list[bytes], group: int) -> HistoryEntry:
    """An XRANGE entry as the script returns it: id ``<seq>-0``, fields ``p`` and ``t``."""
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    seq = int(entry_id.split(b"-")[0])
    return HistoryEntry(seq, channel, values[b"p"], int(values.get(b"t", b"0")), group)
