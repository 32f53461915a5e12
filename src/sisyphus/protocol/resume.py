"""Event ids as a client hands them back (``Last-Event-ID``), without I/O.

For now an id is the decimal number of the last message a stream got; this
module only checks what a client may send back, so a hostile value is refused
with a clear 400 before it reaches anything else.
"""

from __future__ import annotations

from sisyphus.protocol.http import Request


class InvalidEventId(ValueError):
    """A ``Last-Event-ID`` that is too long or not an id Sisyphus could have sent."""


def last_event_id(request: Request, max_bytes: int) -> str | None:
    """The ``Last-Event-ID`` header, else the ``lastEventId`` query parameter (polyfills)."""
    value = request.headers.get("last-event-id")
    if value is None:
        value = request.query_value("lastEventId")
    if value is None or value == "":
        return None
    if len(value) > max_bytes:
        raise InvalidEventId(f"Last-Event-ID longer than {max_bytes} bytes")
    if not (value.isascii() and value.isdigit()):
        raise InvalidEventId("Last-Event-ID is not an id this service sent")
    return value
