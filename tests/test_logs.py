"""Logs as an operator's pipeline reads them: text by default, JSON lines on request, no secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest

from sisyphus import client as helper
from sisyphus import logs
from tests.server.test_api import raw_request
from tests.support.redis_server import RedisServer
from tests.support.sse_client import SseClient, status
from tests.test_cli import KEY, start_serve, stop_serve

SECRET = "s3cret-that-is-at-least-32-bytes-long!"
WRONG_KEY = "not-the-key-of-16-chars"


def emit(format: str, *args: object, **kwargs: object) -> str:
    """What one log call writes in ``format``."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter() if format == "json" else logs.TextFormatter())
    logger = logging.getLogger("sisyphus.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_json_line_has_stable_fields_from_the_template_and_extras() -> None:
    """A JSON line carries time, level, logger, event, message and the event's own fields."""
    line = json.loads(emit("json", "slow client cut user=%s streams=%d", "42", 3))
    assert line["level"] == "warning"
    assert line["logger"] == "sisyphus.test_logs"
    assert line["event"] == "slow client cut"
    assert line["message"] == "slow client cut user=42 streams=3"
    assert (line["user"], line["streams"]) == ("42", 3)
    assert line["time"].endswith("Z")
    line = json.loads(
        emit(
            "json", "bad request from %s", "1.2.3.4:5", extra={"event": "bad request", "peer": "p"}
        )
    )
    assert (line["event"], line["peer"]) == ("bad request", "p")


@pytest.mark.parametrize("format", ["text", "json"])
def test_credentials_are_scrubbed_whatever_a_call_site_passes(format: str) -> None:
    """A token, a Bearer header, a cookie or a URL password in a message shows as ***."""
    token = helper.mint_token(SECRET, "42")
    text = emit(
        format,
        "oops %s %s %s %s",
        f"/?token={token}",
        "Authorization: Bearer abcdef0123456789",
        "Cookie: sisyphus_token=zzz-cookie-value",
        "redis://:hunter2-password@localhost:6379/0",
    )
    for secret in (token, "abcdef0123456789", "zzz-cookie-value", "hunter2-password"):
        assert secret not in text
    assert "***" in text


@pytest.mark.parametrize(
    ("format", "via"), [("text", "default"), ("json", "flag"), ("json", "variable")]
)
async def test_a_serving_process_logs_no_token_key_or_cookie(format: str, via: str) -> None:
    """A real service's logs, through good and bad tokens, cookies and keys, hold none of them."""
    env = {"SISYPHUS_SECRET": SECRET, "SISYPHUS_API_KEY": KEY}
    flags = ["--log-level", "debug"]
    if via == "flag":
        flags += ["--log-format", format]
    elif via == "variable":
        env["SISYPHUS_LOG_FORMAT"] = format
    served = await start_serve(*flags, env=env)
    token = helper.mint_token(SECRET, "42")
    expired = helper.mint_token(SECRET, "42", ttl=60, now=time.time() - 3600)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    try:
        publisher = helper.HttpPublisher(served.url, api_key=KEY)
        await asyncio.to_thread(publisher.grant, "42", ["room:1"])
        with pytest.raises(helper.SisyphusClientError, match="401"):
            await asyncio.to_thread(
                helper.HttpPublisher(served.url, api_key=WRONG_KEY).publish, "room:1", "x"
            )
        for query, headers in (
            (f"token={token}", {}),
            ("", {"Authorization": f"Bearer {token}"}),
            ("", {"Cookie": f"sisyphus_token={token}"}),
        ):
            stream = await SseClient.open(served.port, query, headers=headers)
            assert (await stream.expect()).data == status("ok")
            await stream.close()
        for bad in (expired, forged, "not-a-token-at-all"):
            stream = await SseClient.open(served.port, f"token={bad}")
            assert (await stream.expect()).data == status("failure")
            await stream.close()
        # A malformed request that carries a token still logs no token.
        await raw_request(
            served.port, b"GET /?token=%s HTTP/1.1\r\nBad Header\r\n\r\n" % token.encode()
        )
    finally:
        await stop_serve(served)
    assert served.process.stderr is not None
    output = (served.log + await served.process.stderr.read()).decode()
    for secret in (SECRET, KEY, WRONG_KEY, token, expired, forged, token.split(".")[2]):
        assert secret not in output
    assert "stream refused" in output
    lines = output.splitlines()
    if format == "json":
        events = [json.loads(line) for line in lines]
        for event in events:
            assert {"time", "level", "logger", "event", "message"} <= event.keys()
        refused = [e for e in events if e["event"] == "stream refused"]
        assert {e["reason"] for e in refused} >= {"expired", "invalid_token"}
        assert any(e["event"] == "bad request" and "peer" in e for e in events)
    else:
        assert not any(line.startswith("{") for line in lines)


def test_other_token_names_basic_auth_and_later_cookies_are_scrubbed() -> None:
    """id_token=, refresh_token=, Basic credentials and a token cookie after another one."""
    text = emit(
        "json",
        "oops %s %s %s",
        "/cb?id_token=idtok-secret&refresh_token=refresh-secret",
        "Authorization: Basic dXNlcjpiYXNpYy1zZWNyZXQ=",
        "Cookie: theme=dark; sisyphus_token=cookie-secret",
    )
    for secret in ("idtok-secret", "refresh-secret", "dXNlcjpiYXNpYy1zZWNyZXQ=", "cookie-secret"):
        assert secret not in text


def test_a_url_password_holding_at_signs_is_scrubbed_whole() -> None:
    """A password may hold "@": nothing of it shows, whatever the URL's scheme."""
    for url in (
        "redis://:p@ss@hunter2@localhost:6379/0",
        "redis://admin:p@ss@hunter2@localhost:6379/0",
        "redis+sentinel://:p@ss@hunter2@h1:26379,h2:26379/mymaster",
        "redis://:p/ss@hunter2@localhost:6379/0",
        "redis://:p#ss?@hunter2@localhost:6379/0",
    ):
        text = emit("text", "connecting to %s", url)
        assert "hunter2" not in text and "ss@" not in text and "ss?" not in text
        assert "localhost:6379/0" in text or "h1:26379,h2:26379/mymaster" in text


async def test_a_serving_process_logs_no_part_of_a_redis_password_with_at_signs() -> None:
    """The startup line names the Redis it uses, never any part of its password."""
    password = "p@ss@hunter2-secret"
    server = RedisServer(password=password)
    server.start()
    served = await start_serve(
        "--redis", f"redis://:{password}@127.0.0.1:{server.port}/0", "--log-level", "debug"
    )
    try:
        publisher = helper.HttpPublisher(served.url)
        await asyncio.to_thread(publisher.publish, "room:1", "x")
    finally:
        await stop_serve(served)
        server.close()
    assert served.process.stderr is not None
    output = (served.log + await served.process.stderr.read()).decode()
    assert f"127.0.0.1:{server.port}/0" in output
    assert "hunter2" not in output and "ss@" not in output
