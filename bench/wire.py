"""Bytes the benchmark sends and the latency histogram it keeps: no I/O here.

Payload layout (ASCII): ``<step> <send time, monotonic ns> <seq> <padding>``. The step
tag lets a subscriber count only the current step's messages with one
``bytes.count(b"data: <step> ")``; the send time gives publish-to-receive latency
(``time.monotonic_ns`` is one clock for every process on the machine).
"""

from __future__ import annotations

import json
import re

HOST = b"127.0.0.1"

# Latency histogram: microseconds, exact below 32 us, then 16 buckets per power of two
# (about 3 % resolution), like HdrHistogram with 4 significant bits.
HIST_SIZE = 16 * 40
TS_PATTERN = r"data: {step} (\d+) "


def step_tag(step: int) -> bytes:
    return b"data: %d " % step


def step_regex(step: int) -> re.Pattern[bytes]:
    return re.compile(TS_PATTERN.format(step=step).encode())


def payload(step: int, sent_ns: int, seq: int, size: int) -> bytes:
    head = b"%d %d %d " % (step, sent_ns, seq)
    return head + b"x" * max(0, size - len(head))


def bucket(us: int) -> int:
    if us < 32:
        return us if us > 0 else 0
    shift = us.bit_length() - 5
    return min(HIST_SIZE - 1, (shift << 4) + (us >> shift))


def bucket_value_us(index: int) -> float:
    """The middle of a bucket, in microseconds."""
    if index < 32:
        return float(index)
    shift = (index >> 4) - 1
    mantissa = index - (shift << 4)
    return ((mantissa << shift) + ((mantissa + 1) << shift)) / 2


def hist_merge(into: dict[int, int], other: dict[int, int] | dict[str, int]) -> None:
    for key, count in other.items():
        into[int(key)] = into.get(int(key), 0) + count


def hist_sparse(hist: list[int]) -> dict[int, int]:
    return {i: n for i, n in enumerate(hist) if n}


def percentile_ms(hist: dict[int, int], fraction: float) -> float | None:
    total = sum(hist.values())
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return bucket_value_us(index) / 1000
    return bucket_value_us(max(hist)) / 1000


def subscribe_request(path: str) -> bytes:
    return (
        b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n\r\n" % (path.encode(), HOST)
    )


def post(path: str, body: bytes, content_type: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(),
        HOST,
        content_type,
        len(body),
        body,
    )


def sisyphus_publish(channel: str, data: bytes) -> bytes:
    # The payload is plain ASCII without quotes or backslashes: no JSON escaping needed.
    body = b'{"channel":"%s","data":"%s"}' % (channel.encode(), data)
    return post("/api/publish", body, b"application/json")


def sisyphus_grant(user: str, channels: list[str]) -> bytes:
    body = json.dumps({"user": user, "channels": channels}).encode()
    return post("/api/grant", body, b"application/json")


def nchan_publish(channel: str, data: bytes) -> bytes:
    return post(f"/pub/{channel}", data, b"text/plain")


def resp_command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def redis_publish(channel: str, data: bytes) -> bytes:
    return resp_command(b"PUBLISH", channel.encode(), data)


def redis_cluster_publish(channel: str, data: bytes) -> bytes:
    # The cluster form of PUBLISH: sent to the primary serving the channel's slot.
    return resp_command(b"SPUBLISH", channel.encode(), data)


PUBLISH_FORMATS = {
    "sisyphus": sisyphus_publish,
    "nchan": nchan_publish,
    "redis": redis_publish,
    "redis-cluster": redis_cluster_publish,
}
