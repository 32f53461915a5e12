"""The exact bytes of every event: messages, statuses, keep-alives (sisyphus.protocol.sse)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sisyphus.protocol import sse
from sisyphus.protocol.sse import Status

# A small WHATWG "Server-sent events" parser ----------------------------------
# Written from the standard's "Interpreting an event stream" section, independently of
# the encoder, so the round-trip checks what a browser's EventSource would hand over.

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class ParsedEvent:
    data: bytes
    event_type: bytes
    last_event_id: bytes


@dataclass
class ParsedStream:
    events: list[ParsedEvent]
    retry: int | None


def parse_stream(stream: bytes) -> ParsedStream:
    """Parse a complete stream as EventSource does; an unterminated last event is dropped."""
    if stream.startswith(b"\xef\xbb\xbf"):
        stream = stream[3:]
    lines = _LINE_END.split(stream)
    lines.pop()  # what follows the last line end is an incomplete line: never processed
    events: list[ParsedEvent] = []
    data = b""
    event_type = b""
    last_id = b""
    retry: int | None = None
    for line in lines:
        if line == b"":
            # Dispatch.
            if data == b"":
                event_type = b""
                continue
            if data.endswith(b"\n"):
                data = data[:-1]
            events.append(ParsedEvent(data, event_type or b"message", last_id))
            data = b""
            event_type = b""
            continue
        if line.startswith(b":"):
            continue  # comment
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data += value + b"\n"
        elif name == b"event":
            event_type = value
        elif name == b"id":
            if b"\x00" not in value:
                last_id = value
        elif name == b"retry" and value.isdigit():
            retry = int(value)
    return ParsedStream(events, retry)


def normalise_line_breaks(payload: bytes) -> bytes:
    return _LINE_END.sub(b"\n", payload)


# data_lines / encode_event ------------------------------------------------------

DATA_LINES = [
    (b"hello", b"data: hello\n"),
    (b"", b"data: \n"),
    (b" x", b"data:  x\n"),
    (b"  two spaces", b"data:   two spaces\n"),
    (b"a\nb", b"data: a\ndata: b\n"),
    (b"a\r\nb", b"data: a\ndata: b\n"),
    (b"a\rb", b"data: a\ndata: b\n"),
    (b"a\r\nb\rc\nd", b"data: a\ndata: b\ndata: c\ndata: d\n"),
    (b"a\n", b"data: a\ndata: \n"),
    (b"a\r\n", b"data: a\ndata: \n"),
    (b"a\r", b"data: a\ndata: \n"),
    (b"\n", b"data: \ndata: \n"),
    (b"\r\n", b"data: \ndata: \n"),
    (b"\r", b"data: \ndata: \n"),
    (b"\n\r", b"data: \ndata: \ndata: \n"),
    (b"a\r\r\nb", b"data: a\ndata: \ndata: b\n"),
    (b"a\n\nb", b"data: a\ndata: \ndata: b\n"),
    (b"\na", b"data: \ndata: a\n"),
    (b"a\n b", b"data: a\ndata:  b\n"),
    (b"a\x0cb", b"data: a\x0cb\n"),
    (b"a\x0bb", b"data: a\x0bb\n"),
    (b"a\x1cb\x1db\x1eb", b"data: a\x1cb\x1db\x1eb\n"),
    ("a\x85b".encode(), b"data: a\xc2\x85b\n"),
    ("a\u2028b".encode(), b"data: a\xe2\x80\xa8b\n"),
    ("a\u2029b".encode(), b"data: a\xe2\x80\xa9b\n"),
    ("caf\u00e9 \U0001f600".encode(), "data: caf\u00e9 \U0001f600\n".encode()),
    (b"data: nested", b"data: data: nested\n"),
    (b":not a comment", b"data: :not a comment\n"),
    (b"a\x00b", b"data: a\x00b\n"),
    (b"\xff\xfe not utf-8", b"data: \xff\xfe not utf-8\n"),
    (b"<message><status>ok</status></message>", b"data: <message><status>ok</status></message>\n"),
]


@pytest.mark.parametrize(("payload", "expected"), DATA_LINES)
def test_data_lines(payload: bytes, expected: bytes) -> None:
    """A payload becomes one `data:` line per line, split only at CRLF, CR or LF."""
    assert sse.data_lines(payload) == expected


@pytest.mark.parametrize(("payload", "expected"), DATA_LINES)
def test_encode_event_wraps_data_lines(payload: bytes, expected: bytes) -> None:
    """An event is its `id:` line, its data lines and one blank line."""
    assert sse.encode_event(b"7", payload) == b"id: 7\n" + expected + b"\n"


ENCODE_EVENT = [
    ({"event_id": b"1", "payload": b"x"}, b"id: 1\ndata: x\n\n"),
    ({"event_id": b"ab-12-1700000000", "payload": b"x"}, b"id: ab-12-1700000000\ndata: x\n\n"),
    ({"event_id": b"1", "payload": b""}, b"id: 1\ndata: \n\n"),
    ({"event_id": b"1", "payload": b"x", "retry_ms": 5000}, b"id: 1\nretry: 5000\ndata: x\n\n"),
    ({"event_id": b"1", "payload": b"x", "retry_ms": 0}, b"id: 1\nretry: 0\ndata: x\n\n"),
    (
        {"event_id": b"1", "payload": b"x", "event": b"status"},
        b"id: 1\nevent: status\ndata: x\n\n",
    ),
    (
        {"event_id": b"1", "payload": b"a\nb", "retry_ms": 60000, "event": b"status"},
        b"id: 1\nretry: 60000\nevent: status\ndata: a\ndata: b\n\n",
    ),
    ({"event_id": b" spaced", "payload": b"x"}, b"id:  spaced\ndata: x\n\n"),
]


@pytest.mark.parametrize(("kwargs", "expected"), ENCODE_EVENT)
def test_encode_event(kwargs: dict[str, object], expected: bytes) -> None:
    """`id:`, then `retry:` and `event:` when given, then the data lines and a blank line."""
    assert sse.encode_event(**kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "event_id",
    [b"", b"\n", b"\r", b"\x00", b"a\nb", b"a\rb", b"a\r\nb", b"a\x00b", b"1\n", b"\r1"],
)
def test_invalid_event_ids_are_refused(event_id: bytes) -> None:
    """An empty id or one with a line break or NUL would corrupt the stream: ValueError."""
    with pytest.raises(ValueError, match="invalid event id"):
        sse.encode_event(event_id, b"x")


@pytest.mark.parametrize(
    "encode",
    [
        lambda event_id: sse.encode_status(event_id, Status.OK),
        lambda event_id: sse.encode_status(event_id, Status.OK, json_flavour=True),
        lambda event_id: sse.encode_noop(event_id),
        lambda event_id: sse.encode_noop(event_id, json_flavour=True),
        lambda event_id: sse.encode_json_message(event_id, "room:1", b"x"),
    ],
)
@pytest.mark.parametrize("event_id", [b"", b"a\nb", b"a\rb", b"a\x00b"])
def test_every_encoder_refuses_invalid_ids(
    encode: Callable[[bytes], bytes], event_id: bytes
) -> None:
    """Statuses, keep-alives and JSON messages refuse a bad id just like messages."""
    with pytest.raises(ValueError, match="invalid event id"):
        encode(event_id)


@pytest.mark.parametrize("retry_ms", [-1, -5000])
def test_negative_retry_is_refused(retry_ms: int) -> None:
    """A negative reconnect delay is a programming error: ValueError."""
    with pytest.raises(ValueError, match="retry must be >= 0 ms"):
        sse.encode_event(b"1", b"x", retry_ms)


# Statuses -----------------------------------------------------------------------

STATUS_BODIES = [
    (Status.OK, b"<message><status>ok</status></message>"),
    (Status.FAILURE, b"<message><status>failure</status></message>"),
    (Status.ERROR, b"<message><status>error</status></message>"),
    (Status.DISCONNECTED, b"<message><status>disconnected</status></message>"),
    (Status.RESET, b"<message><status>reset</status></message>"),
]


@pytest.mark.parametrize(("status", "body"), STATUS_BODIES)
def test_status_body(status: Status, body: bytes) -> None:
    """Each status has the seed client's exact XML body."""
    assert sse.status_body(status) == body


@pytest.mark.parametrize(("status", "body"), STATUS_BODIES)
def test_xml_status_event(status: Status, body: bytes) -> None:
    """A status event is `id:` and one data line holding the XML body."""
    assert sse.encode_status(b"5", status) == b"id: 5\ndata: " + body + b"\n\n"


@pytest.mark.parametrize(("status", "body"), STATUS_BODIES)
def test_xml_status_event_with_retry(status: Status, body: bytes) -> None:
    """A status with a reconnect hint carries a `retry:` line before its data."""
    expected = b"id: 5\nretry: 60000\ndata: " + body + b"\n\n"
    assert sse.encode_status(b"5", status, 60000) == expected


def test_xml_status_ignores_reason() -> None:
    """The seed's XML body has no room for a reason, so none is sent."""
    assert sse.encode_status(b"5", Status.RESET, reason="epoch") == (
        b"id: 5\ndata: <message><status>reset</status></message>\n\n"
    )


@pytest.mark.parametrize(
    ("status", "retry_ms", "reason", "expected"),
    [
        (Status.OK, None, None, b'id: 9\nevent: status\ndata: {"status":"ok"}\n\n'),
        (
            Status.FAILURE,
            60000,
            None,
            b'id: 9\nretry: 60000\nevent: status\ndata: {"status":"failure"}\n\n',
        ),
        (
            Status.ERROR,
            5000,
            "broker",
            b'id: 9\nretry: 5000\nevent: status\ndata: {"status":"error","reason":"broker"}\n\n',
        ),
        (
            Status.RESET,
            None,
            "epoch",
            b'id: 9\nevent: status\ndata: {"status":"reset","reason":"epoch"}\n\n',
        ),
        (
            Status.DISCONNECTED,
            None,
            'line\nbreak "quoted" \u00e9',
            b"id: 9\nevent: status\n"
            b'data: {"status":"disconnected","reason":"line\\nbreak \\"quoted\\" \\u00e9"}\n\n',
        ),
    ],
)
def test_json_status_event(
    status: Status, retry_ms: int | None, reason: str | None, expected: bytes
) -> None:
    """The JSON flavour names the event `status` and keeps its body on one data line."""
    encoded = sse.encode_status(b"9", status, retry_ms, json_flavour=True, reason=reason)
    assert encoded == expected


# Keep-alives and JSON messages ----------------------------------------------------


def test_noop() -> None:
    """The keep-alive is `data: noop` under the stream's last id."""
    assert sse.encode_noop(b"ab-3-17") == b"id: ab-3-17\ndata: noop\n\n"


def test_noop_json_flavour() -> None:
    """The JSON flavour's keep-alive is a named `noop` event with an empty object."""
    assert sse.encode_noop(b"ab-3-17", json_flavour=True) == (
        b"id: ab-3-17\nevent: noop\ndata: {}\n\n"
    )


def test_noop_payload_constant() -> None:
    """The keep-alive payload the clients discard is exactly `noop`."""
    assert sse.NOOP_PAYLOAD == b"noop"


@pytest.mark.parametrize(
    ("channel", "payload", "data"),
    [
        ("room:1", b"hello", b'{"channel":"room:1","data":"hello"}'),
        ("room:1", b"", b'{"channel":"room:1","data":""}'),
        ("room:1", b"a\nb\r\nc\rd", b'{"channel":"room:1","data":"a\\nb\\r\\nc\\rd"}'),
        ("room:1", "caf\u00e9".encode(), b'{"channel":"room:1","data":"caf\\u00e9"}'),
        ("room:1", "\u2028".encode(), b'{"channel":"room:1","data":"\\u2028"}'),
        ("room:1", b"\xff", b'{"channel":"room:1","data":"\\ufffd"}'),
        ("user:42", b'{"a": 1}', b'{"channel":"user:42","data":"{\\"a\\": 1}"}'),
    ],
)
def test_json_message(channel: str, payload: bytes, data: bytes) -> None:
    """A JSON-flavour message is one ASCII data line naming the channel and the text."""
    assert sse.encode_json_message(b"4", channel, payload) == b"id: 4\ndata: " + data + b"\n\n"


# Round trips through a WHATWG parser ------------------------------------------------


@pytest.mark.parametrize(("payload", "_expected"), DATA_LINES)
def test_table_round_trips_through_eventsource(payload: bytes, _expected: bytes) -> None:
    """EventSource hands the client each table payload back, line breaks as LF."""
    parsed = parse_stream(sse.encode_event(b"1", payload))
    assert parsed.events == [ParsedEvent(normalise_line_breaks(payload), b"message", b"1")]


@given(payload=st.text())
def test_text_payload_round_trips(payload: str) -> None:
    """Any text published comes out of EventSource the same, its line breaks as LF."""
    encoded = sse.encode_event(b"0-1-2", payload.encode())
    expected = re.sub("\r\n|\r|\n", "\n", payload).encode()
    assert parse_stream(encoded).events == [ParsedEvent(expected, b"message", b"0-1-2")]


@given(payload=st.binary())
def test_binary_payload_round_trips(payload: bytes) -> None:
    """Any bytes published come back byte for byte, apart from line breaks becoming LF."""
    encoded = sse.encode_event(b"7", payload)
    assert parse_stream(encoded).events == [
        ParsedEvent(normalise_line_breaks(payload), b"message", b"7")
    ]


@given(
    payloads=st.lists(st.text(alphabet=st.sampled_from("ab \r\n\x85\u2028"), max_size=8)),
    retry_ms=st.none() | st.integers(min_value=0, max_value=10**9),
)
def test_concatenated_events_parse_one_by_one(payloads: list[str], retry_ms: int | None) -> None:
    """Events written back to back (one coalesced write) parse as separate events in order."""
    stream = b"".join(
        sse.encode_event(b"%d" % i, text.encode(), retry_ms) for i, text in enumerate(payloads)
    )
    parsed = parse_stream(stream)
    assert parsed.events == [
        ParsedEvent(re.sub("\r\n|\r|\n", "\n", text).encode(), b"message", b"%d" % i)
        for i, text in enumerate(payloads)
    ]
    assert parsed.retry == (retry_ms if payloads else None)


@given(
    event_id=st.binary(min_size=1).filter(
        lambda b: not any(c in b for c in (b"\n", b"\r", b"\x00"))
    )
)
def test_any_valid_id_reaches_last_event_id(event_id: bytes) -> None:
    """Any accepted id is what EventSource reports as lastEventId."""
    parsed = parse_stream(sse.encode_noop(event_id))
    assert parsed.events == [ParsedEvent(b"noop", b"message", event_id)]


@pytest.mark.parametrize("status", list(Status))
def test_json_status_parses_as_a_status_event(status: Status) -> None:
    """A JSON-flavour client gets a `status` event whose data is the JSON object."""
    parsed = parse_stream(sse.encode_status(b"1", status, 1000, json_flavour=True, reason="r"))
    assert len(parsed.events) == 1
    assert parsed.events[0].event_type == b"status"
    assert json.loads(parsed.events[0].data) == {"status": status.value, "reason": "r"}
    assert parsed.retry == 1000


@given(channel=st.text(), payload=st.binary())
def test_json_message_is_always_one_data_line(channel: str, payload: bytes) -> None:
    """Whatever the payload, a JSON-flavour message parses back to channel and text."""
    parsed = parse_stream(sse.encode_json_message(b"1", channel, payload))
    assert len(parsed.events) == 1
    assert json.loads(parsed.events[0].data) == {
        "channel": channel,
        "data": payload.decode("utf-8", "replace"),
    }
