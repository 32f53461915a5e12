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

from sisyphus.protocol.names import channels_key, history_key

EPOCH_KEY = "sisyphus:epoch"
SEQUENCE_KEY = "sisyphus:seq"

# The envelope: RS (0x1e), "s1 <epoch> <seq> <time>\n", then the payload as published.
ENVELOPE_PREFIX = b"\x1es1 "
# Sequenced messages are published on this prefix + the channel name.
SEQUENCED_PREFIX = "sisyphus:seq "
SEQUENCED_PREFIX_BYTES = SEQUENCED_PREFIX.encode("ascii")

_EPOCH_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyz")


def sequenced_channel(channel: str) -> str:
    """The Redis channel that carries ``channel``'s sequenced messages."""
    return SEQUENCED_PREFIX + channel


PUBLISH_SCRIPT = """
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
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'p', ARGV[2], 't', now)
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('PUBLISH', ARGV[1], '\\30s1 ' .. epoch .. ' ' .. seq .. ' ' .. now .. '\\n' .. ARGV[2])
return {epoch, seq, tonumber(now)}
"""


# The user's rights set and the current position, in one round trip. A rights key of
# another type than SET reads as an unknown user (its type is returned for the log).
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
return {kind, epoch, redis.call('GET', KEYS[3]) or '0', members}
"""

# Per channel: whether messages after the position may have been trimmed, and up to
# ARGV[2] retained entries after it. Nothing published since the position (the usual
# case for a fresh connect) costs one GET.
HISTORY_SCRIPT = """
local after = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {}
if current <= after then
  return out
end
for i = 2, #KEYS do
  local trimmed = 0
  local entries = {}
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[i])
    local fields = {}
    for j = 1, #info, 2 do
      fields[info[j]] = info[j + 1]
    end
    if fields['entries-added'] > fields['length'] and fields['first-entry'] then
      local first = tonumber(string.match(fields['first-entry'][1], '^(%d+)'))
      if after < first - 1 then
        trimmed = 1
      end
    end
    entries = redis.call('XRANGE', KEYS[i], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
  end
  out[#out + 1] = trimmed
  out[#out + 1] = entries
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
) -> tuple[list[str], list[str | bytes]]:
    """KEYS and ARGV for :data:`PUBLISH_SCRIPT`; ``rights`` is (SADD|SREM, user, channels)."""
    history = history_key(channel)
    keys = [EPOCH_KEY, SEQUENCE_KEY, history, history]
    args: list[str | bytes] = [
        sequenced_channel(channel),
        payload,
        str(history_size),
        str(max(1, int(history_max_age))),
        epoch_candidate,
        "",
    ]
    if rights is not None:
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
