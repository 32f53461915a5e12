"""The one Redis script behind every sequenced publish (API, CLI, Python helper).

In one atomic step it takes the next number of the global sequence, appends
the message to the channel's history stream under that number, optionally
changes a rights set first, and publishes the message wrapped in a small
envelope that carries its position. Ids assigned apart from the publish, or
from clocks, are how other hubs lose or duplicate messages; this can't.
"""

from __future__ import annotations

from sisyphus.protocol.names import channels_key, history_key

EPOCH_KEY = "sisyphus:epoch"
SEQUENCE_KEY = "sisyphus:seq"

# The envelope: RS (0x1e), "s1 <epoch> <seq> <time>\n", then the payload as published.
ENVELOPE_PREFIX = b"\x1es1 "

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
        channel,
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
    """(epoch, seq, time, payload) of an enveloped message; ``None`` for a plain PUBLISH."""
    if not payload.startswith(ENVELOPE_PREFIX):
        return None
    end = payload.find(b"\n")
    if end < 0:
        return None
    fields = payload[len(ENVELOPE_PREFIX) : end].split(b" ")
    if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
        return None
    return fields[0], int(fields[1]), int(fields[2]), payload[end + 1 :]
