"""The wire contract and channel rights, over real sockets, on both brokers."""

from __future__ import annotations

import re

import pytest

from sisyphus.server.app import Service
from tests.conftest import grant, publish, revoke
from tests.support.sse_client import SseClient, status

EXPECTED_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: keep-alive\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"\r\n"
)


async def connect_ok(service: Service, user: str) -> SseClient:
    client = await SseClient.open(service.port, f"user={user}")
    event = await client.next_event()
    assert event is not None
    assert event.data == status("ok")
    return client


@pytest.mark.parametrize(
    "query", ["", "user=", "user=%20", "user=1:channels", "user=*", "user=../2"]
)
async def test_missing_blank_or_invalid_user_gets_failure_and_close(
    service: Service, query: str
) -> None:
    """A client without a usable user id gets `failure`, a retry hint, and the stream closes."""
    client = await SseClient.open(service.port, query)
    assert client.head == EXPECTED_HEAD
    events = await client.until_closed()
    assert [e.data for e in events] == [status("failure")]
    assert events[0].id
    assert events[0].retry is not None and events[0].retry > 0


async def test_unknown_user_gets_failure(service: Service) -> None:
    """A user without a channel set is unknown: `failure`, then the stream closes."""
    client = await SseClient.open(service.port, "user=nobody")
    events = await client.until_closed()
    assert [e.data for e in events] == [status("failure")]


async def test_known_user_gets_exact_headers_and_ok(service: Service) -> None:
    """A known user gets the seed's headers, then `ok` with an id, and the stream stays open."""
    await grant(service.port, "1", "room:5")
    client = await SseClient.open(service.port, "user=1")
    assert client.head == EXPECTED_HEAD
    event = await client.next_event()
    assert event is not None
    assert event.data == status("ok")
    assert re.fullmatch(
        rb"id: [0-9a-f]+-\d+-\d+\ndata: <message><status>ok</status></message>\n\n", client.raw
    )
    noop = await client.next_event()
    assert noop is not None and noop.is_noop  # still open: a keep-alive follows
    await client.close()


async def test_message_on_readable_channel_is_forwarded(service: Service) -> None:
    """A message published on a channel the user may read reaches it, with a fresh id."""
    await grant(service.port, "1", "room:5")
    client = await connect_ok(service, "1")
    ok_id = client.last_event_id
    await publish(service.port, "room:5", "hello")
    event = await client.next_message()
    assert event is not None
    assert event.data == "hello"
    assert event.id is not None
    assert ok_id is not None
    assert int(event.id.split("-")[1]) > int(ok_id.split("-")[1])
    await client.close()


async def test_message_on_own_user_channel_is_forwarded(service: Service) -> None:
    """Messages on user:<id> always reach that user."""
    await grant(service.port, "7", "room:1")
    client = await connect_ok(service, "7")
    await publish(service.port, "user:7", "just for you")
    event = await client.next_message()
    assert event is not None and event.data == "just for you"
    await client.close()


async def test_message_on_unreadable_channel_is_not_forwarded(service: Service) -> None:
    """A message on a channel outside the user's set never arrives: the next event is a noop."""
    await grant(service.port, "1", "room:5")
    await grant(service.port, "2", "room:6")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:6", "secret")
    await publish(service.port, "user:2", "also secret")
    event = await client.next_event()
    assert event is not None and event.is_noop
    await client.close()


async def test_noop_keeps_the_last_event_id(service: Service) -> None:
    """Keep-alives repeat the id of the last event, so they never move the client's position."""
    await grant(service.port, "1", "room:5")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:5", "m")
    message = await client.next_message()
    noop = await client.next_event()
    assert message is not None and noop is not None
    assert noop.is_noop
    assert noop.id == message.id
    await client.close()


@pytest.mark.parametrize(
    ("payload", "wire", "received"),
    [
        ("a\nb", b"data: a\ndata: b\n\n", "a\nb"),
        ("a\r\nb\rc\nd", b"data: a\ndata: b\ndata: c\ndata: d\n\n", "a\nb\nc\nd"),
        ("tail\n", b"data: tail\ndata: \n\n", "tail\n"),
        ("", b"data: \n\n", ""),
        (
            "form\x0cfeed\u2028sep",
            "data: form\x0cfeed\u2028sep\n\n".encode(),
            "form\x0cfeed\u2028sep",
        ),
        (" lead", b"data:  lead\n\n", " lead"),
    ],
)
async def test_payload_lines_become_data_lines(
    service: Service, payload: str, wire: bytes, received: str
) -> None:
    """Each line of a payload is one data: line, so EventSource gives back the same text."""
    await grant(service.port, "1", "room:5")
    client = await connect_ok(service, "1")
    await publish(service.port, "room:5", payload)
    event = await client.next_message()
    assert event is not None
    assert bytes(client.raw).endswith(wire)
    assert event.data == received
    await client.close()


async def test_grant_adds_and_revoke_removes_channels_live(service: Service) -> None:
    """Rights changes reach a live stream: added channels deliver, removed ones stop."""
    await grant(service.port, "1", "room:5")
    client = await connect_ok(service, "1")
    await grant(service.port, "1", "room:6")
    notice = await client.next_message()
    assert notice is not None and '"granted"' in notice.data and "room:6" in notice.data
    # The refresh runs after the notice; a message on room:5 proves the order of delivery.
    await publish(service.port, "room:5", "sync")
    assert (await client.next_message()).data == "sync"
    await publish(service.port, "room:6", "on the new channel")
    assert (await client.next_message()).data == "on the new channel"

    await revoke(service.port, "1", "room:6")
    notice = await client.next_message()
    assert notice is not None and '"revoked"' in notice.data
    await publish(service.port, "room:5", "sync 2")
    assert (await client.next_message()).data == "sync 2"
    await publish(service.port, "room:6", "must not arrive")
    await publish(service.port, "room:5", "still here")
    assert (await client.next_message()).data == "still here"
    await client.close()


async def test_empty_channel_set_disconnects(service: Service) -> None:
    """When the user's last channel is revoked it gets `disconnected` and the stream closes."""
    await grant(service.port, "1", "room:5")
    client = await connect_ok(service, "1")
    await revoke(service.port, "1", "room:5")
    events = [e for e in await client.until_closed() if not e.is_noop]
    assert [e.data for e in events][-1] == status("disconnected")
    assert events[-1].retry is not None


async def test_messages_keep_publication_order(service: Service) -> None:
    """On one channel, a client receives messages in the order they were published."""
    await grant(service.port, "1", "room:5")
    client = await connect_ok(service, "1")
    for i in range(50):
        await publish(service.port, "room:5", str(i))
    received = [(await client.next_message()).data for _ in range(50)]
    assert received == [str(i) for i in range(50)]
    await client.close()


async def test_every_connection_of_a_user_receives(service: Service) -> None:
    """Two tabs of one user both receive each message, and both follow rights changes."""
    await grant(service.port, "1", "room:5")
    tabs = [await connect_ok(service, "1"), await connect_ok(service, "1")]
    await publish(service.port, "room:5", "both")
    for tab in tabs:
        assert (await tab.next_message()).data == "both"
    await revoke(service.port, "1", "room:5")
    for tab in tabs:
        events = [e.data for e in await tab.until_closed() if not e.is_noop]
        assert events[-1] == status("disconnected")


async def test_many_clients_on_one_channel_all_receive(service: Service) -> None:
    """A hundred clients on one channel each receive the one published message."""
    for i in range(100):
        await grant(service.port, f"u{i}", "room:5") if i == 0 else None
    users = [f"u{i}" for i in range(100)]
    for user in users[1:]:
        await grant(service.port, user, "room:5")
    clients = [await connect_ok(service, user) for user in users]
    await publish(service.port, "room:5", "to everyone")
    for client in clients:
        assert (await client.next_message()).data == "to everyone"
        await client.close()


async def test_client_going_away_unsubscribes(service: Service) -> None:
    """When the last client of a channel leaves, the process stops listening to it."""
    await grant(service.port, "1", "room:5")
    client = await connect_ok(service, "1")
    assert "room:5" in service.hub.channels()
    await client.close()
    for _ in range(100):
        if "room:5" not in service.hub.channels():
            break
        await __import__("asyncio").sleep(0.01)
    assert "room:5" not in service.hub.channels()
    assert service.hub.subscribers() == []
