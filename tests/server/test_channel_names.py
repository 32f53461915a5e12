"""Free-form channel names over real sockets, on both brokers (the seed doesn't care)."""

from __future__ import annotations

import logging
import uuid

import pytest
import redis

from sisyphus.server.app import Service
from tests.conftest import ServiceFactory, api, grant, publish
from tests.support.redis_server import RedisServer
from tests.support.sse_client import SseClient, status

FREE_FORM = ["news", "org:5:project:7", "project.42", "team/alpha", "a*b?[c]", "x" * 256]


async def test_streams_receive_free_form_channels(service: Service) -> None:
    """Channels such as `news`, `org:5:project:7`, `project.42`, `team/alpha` are delivered."""
    status_code, answer = await api(
        service.port, "/api/grant", {"user": "7", "channels": FREE_FORM}
    )
    assert status_code == 200, answer
    assert answer["granted"] == sorted(FREE_FORM)
    client = await SseClient.open(service.port, "user=7")
    assert (await client.expect()).data == status("ok")
    for channel in FREE_FORM:
        status_code, answer = await api(
            service.port, "/api/publish", {"channel": channel, "data": f"on {channel}"}
        )
        assert status_code == 200, answer
        assert (await client.next_message()).data == f"on {channel}"
    status_code, answer = await api(
        service.port, "/api/revoke", {"user": "7", "channels": ["news"]}
    )
    assert status_code == 200, answer
    await client.next_message()  # the rights notice
    await publish(service.port, "news", "not for you any more")
    await publish(service.port, "team/alpha", "still for you")
    assert (await client.next_message()).data == "still for you"


@pytest.mark.parametrize(
    "channel", ["", "room 5", "x" * 257, "caf\u00e9", "user:7:channels", "user:*"]
)
async def test_api_refuses_names_outside_the_rule(service: Service, channel: str) -> None:
    """The API answers 400 for an empty, spaced, too long, non-ASCII or bad user: channel."""
    status_code, answer = await api(service.port, "/api/publish", {"channel": channel, "data": "x"})
    assert status_code == 400
    assert "invalid channel" in answer["error"]


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_bad_set_members_are_skipped_and_logged_once(
    make_service: ServiceFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A set written by hand with a bad member still works; the member is logged once."""
    service = await make_service()
    bad = f"bad name {uuid.uuid4().hex}"  # unique: the process logs a name only once
    plain = redis.Redis.from_url(redis_server.url)
    plain.sadd("user:8:channels", "news", bad, "user:8:channels")
    plain.close()
    with caplog.at_level(logging.WARNING, logger="sisyphus.rights"):
        first = await SseClient.open(service.port, "user=8")
        second = await SseClient.open(service.port, "user=8")
        for client in (first, second):
            assert (await client.expect()).data == status("ok")
        await grant(service.port, "8", "team/alpha")  # the set is re-read
        await publish(service.port, "news", "hello")
        for client in (first, second):
            assert (await client.next_message()).data.startswith('{"rights": "granted"')
            assert (await client.next_message()).data == "hello"
    refusals = [
        r.getMessage()
        for r in caplog.records
        if r.name == "sisyphus.rights" and bad in r.getMessage()
    ]
    assert len(refusals) == 1
    assert "not printable ASCII, or holds whitespace" in refusals[0]


async def test_api_answer_stays_json_for_quotes_in_a_channel(service: Service) -> None:
    """A channel holding `"` or `\\` gets a publish answer that is valid JSON."""
    for channel in ['say"hi"', "back\\slash"]:
        status_code, answer = await api(
            service.port, "/api/publish", {"channel": channel, "data": "x"}
        )
        assert status_code == 200
        assert answer["channel"] == channel
