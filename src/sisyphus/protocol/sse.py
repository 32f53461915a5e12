"""Server-Sent Events encoding (WHATWG HTML, "Server-sent events").

Owns the exact bytes of every event Sisyphus sends: messages, statuses and
keep-alives. Must not know about connections or brokers.
"""

from __future__ import annotations

import enum
import json
import re

# The standard ends a line at CRLF, a lone CR or a lone LF, and nothing else.
# str.splitlines() would also split at form feeds, NEL and Unicode separators.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# Byte values, not one-byte strings: `10 in data` is a memchr (17 ns here), while
# `b"\n" in data` goes through the buffer protocol (160 ns). This runs per message.
_LF, _CR, _NUL = ord("\n"), ord("\r"), 0


class Status(enum.Enum):
    """The statuses: ``OK`` and ``RESET`` keep the stream open, the others close it."""

    OK = "ok"
    FAILURE = "failure"  # the user can't be identified
    ERROR = "error"  # the broker is unreachable
    DISCONNECTED = "disconnected"  # the user's channel set became empty
    RESET = "reset"  # missed messages can't be replayed: reload state; the stream goes on


def status_body(status: Status) -> bytes:
    """The seed-compatible XML body of a status event."""
    return b"<message><status>" + status.value.encode("ascii") + b"</status></message>"


def data_lines(payload: bytes) -> bytes:
    """The ``data:`` lines for ``payload``: one per line of it, one for an empty payload."""
    if _LF not in payload and _CR not in payload:
        return b"data: " + payload + b"\n"
    return b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(payload))


def encode_event(
    event_id: bytes, payload: bytes, retry_ms: int | None = None, event: bytes | None = None
) -> bytes:
    """One complete event: ``id:``, optional ``retry:`` and ``event:``, data lines, blank line.

    ``event_id`` must be non-empty (an empty ``id:`` resets the browser's
    Last-Event-ID) and hold no line break.
    """
    if not event_id or _LF in event_id or _CR in event_id or _NUL in event_id:
        raise ValueError(f"invalid event id {event_id!r}")
    if retry_ms is None and event is None and _LF not in payload and _CR not in payload:
        return b"id: %b\ndata: %b\n\n" % (event_id, payload)  # every message: one format
    head = b"id: " + event_id + b"\n"
    if retry_ms is not None:
        if retry_ms < 0:
            raise ValueError(f"retry must be >= 0 ms, got {retry_ms}")
        head += b"retry: %d\n" % retry_ms
    if event is not None:
        head += b"event: " + event + b"\n"
    return head + data_lines(payload) + b"\n"


def encode_status(
    event_id: bytes,
    status: Status,
    retry_ms: int | None = None,
    *,
    json_flavour: bool = False,
    reason: str | None = None,
) -> bytes:
    """A status event; closing statuses should carry ``retry_ms`` so clients back off.

    The default flavour is the seed's XML body. The JSON flavour is an
    ``event: status`` whose data is ``{"status": ..., "reason": ...}``.
    """
    if not json_flavour:
        return encode_event(event_id, status_body(status), retry_ms)
    body: dict[str, str] = {"status": status.value}
    if reason is not None:
        body["reason"] = reason
    return encode_event(event_id, _json(body), retry_ms, event=b"status")


NOOP_PAYLOAD = b"noop"


def encode_noop(event_id: bytes, *, json_flavour: bool = False) -> bytes:
    """The keep-alive event; clients discard it (the JSON flavour names it ``noop``)."""
    if json_flavour:
        return encode_event(event_id, b"{}", event=b"noop")
    return encode_event(event_id, NOOP_PAYLOAD)


def encode_json_message(event_id: bytes, channel: str, payload: bytes) -> bytes:
    """A message in the JSON flavour: one data line ``{"channel": ..., "data": ...}``."""
    text = payload.decode("utf-8", "replace")
    return encode_event(event_id, _json({"channel": channel, "data": text}))


def _json(value: object) -> bytes:
    # ensure_ascii keeps every line break escaped, so the body is always one data line.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")
