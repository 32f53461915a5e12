"""The `sisyphus` command as an operator runs it: a real process, real sockets."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import redis

from tests.support.redis_server import RedisServer, free_port
from tests.support.sse_client import SseClient, status

SISYPHUS = [sys.executable, "-m", "sisyphus"]
KEY = "k3y-of-16-chars!"


async def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short `sisyphus` command in a thread so the test's loop stays free."""
    return await asyncio.to_thread(
        subprocess.run,
        [*SISYPHUS, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


class Served:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = b""


async def start_serve(
    *args: str, env: dict[str, str] | None = None, port: int | None = None
) -> Served:
    port = port or free_port()
    process = await asyncio.create_subprocess_exec(
        *SISYPHUS, "serve", "--port", str(port), "--keepalive", "0.5", *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    served = Served(process, port)
    assert process.stderr is not None
    while b"listening on" not in served.log:
        line = await asyncio.wait_for(process.stderr.readline(), 20)
        if not line:
            raise AssertionError(f"sisyphus serve exited: {served.log.decode()}")
        served.log += line
    return served


async def stop_serve(served: Served) -> None:
    """Stop the process if it still runs (a second signal stops a drain at once)."""
    if served.process.returncode is None:
        served.process.terminate()
        try:
            await asyncio.wait_for(served.process.wait(), 10)
        except TimeoutError:
            served.process.kill()
            await served.process.wait()


@pytest.fixture
async def embedded() -> AsyncIterator[Served]:
    served = await start_serve()
    yield served
    await stop_serve(served)


async def test_serve_embedded_then_grant_publish_revoke_via_cli(embedded: Served) -> None:
    """The README walk-through: serve, grant, connect, publish, see the event, revoke."""
    assert b"embedded broker" in embedded.log
    granted = await run_cli("grant", "42", "room:918", "--url", embedded.url)
    assert granted.returncode == 0, granted.stderr
    client = await SseClient.open(embedded.port, "user=42")
    assert (await client.expect()).data == status("ok")
    published = await run_cli("publish", "room:918", "hello from the CLI", "--url", embedded.url)
    assert published.returncode == 0, published.stderr
    position = await run_cli("position", "--url", embedded.url)
    assert position.returncode == 0, position.stderr
    assert position.stdout.split("-")[:2] == published.stdout.split("-")[:2]
    message = await client.next_message()
    assert message.data == "hello from the CLI"
    assert message.id == published.stdout.strip()
    revoked = await run_cli("revoke", "42", "room:918", "--url", embedded.url)
    assert revoked.returncode == 0, revoked.stderr
    events = [e.data for e in await client.until_closed() if not e.is_noop]
    assert events[-1] == status("disconnected")


async def test_publish_reads_standard_input(embedded: Served) -> None:
    """`sisyphus publish CHANNEL -` sends what it reads on standard input."""
    await run_cli("grant", "1", "room:1", "--url", embedded.url)
    client = await SseClient.open(embedded.port, "user=1")
    await client.next_event()
    done = await asyncio.to_thread(
        subprocess.run,
        [*SISYPHUS, "publish", "room:1", "-", "--url", embedded.url],
        input="line one\nline two",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (await client.next_message()).data == "line one\nline two"


async def test_cli_errors_are_clear_and_exit_nonzero(embedded: Served) -> None:
    """Bad names and an unreachable service give a one-line error and exit status 1."""
    bad = await run_cli("grant", "../2", "room:1", "--url", embedded.url)
    assert bad.returncode == 1
    assert "invalid user id" in bad.stderr
    bad = await run_cli("publish", "no channel", "x", "--url", embedded.url)
    assert bad.returncode == 1
    assert "invalid channel" in bad.stderr
    down = await run_cli("publish", "room:1", "x", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert "can't reach Sisyphus" in down.stderr


async def test_api_key_from_environment(embedded: Served) -> None:
    """The CLI sends SISYPHUS_API_KEY; a service with a key refuses calls without it."""
    keyed = await start_serve("--api-key", KEY)
    try:
        refused = await run_cli("grant", "1", "room:1", "--url", keyed.url)
        assert refused.returncode == 1
        assert "401" in refused.stderr
        accepted = await run_cli(
            "grant", "1", "room:1", "--url", keyed.url, env={"SISYPHUS_API_KEY": KEY}
        )
        assert accepted.returncode == 0, accepted.stderr
    finally:
        await stop_serve(keyed)


async def test_bad_configuration_names_the_variable() -> None:
    """A bad SISYPHUS_* value stops `serve` at once with a message naming it."""
    done = await run_cli("serve", env={"SISYPHUS_KEEPALIVE": "-1"})
    assert done.returncode == 2
    assert "SISYPHUS_KEEPALIVE='-1' is invalid" in done.stderr
    done = await run_cli("serve", "--port", "99999")
    assert done.returncode == 2
    assert "--port='99999' is invalid" in done.stderr


async def test_serve_on_redis_with_cli_writing_straight_to_redis(redis_server: RedisServer) -> None:
    """`serve --redis URL` follows rights and messages written by `sisyphus ... --redis URL`."""
    redis.Redis.from_url(redis_server.url).flushall()
    served = await start_serve("--redis", redis_server.url)
    try:
        assert b"redis" in served.log
        granted = await run_cli("grant", "9", "room:9", "--redis", redis_server.url)
        assert granted.returncode == 0, granted.stderr
        assert redis.Redis.from_url(redis_server.url).smembers("user:9:channels") == {b"room:9"}
        client = await SseClient.open(served.port, "user=9")
        assert (await client.expect()).data == status("ok")
        published = await run_cli("publish", "room:9", "via redis", "--redis", redis_server.url)
        assert published.returncode == 0, published.stderr
        assert (await client.next_message()).data == "via redis"
        await client.close()
    finally:
        await stop_serve(served)


async def test_token_command_mints_a_token_the_service_accepts() -> None:
    """`sisyphus token 42` prints a token that opens user 42's stream."""
    secret = "cli-secret-long-enough-for-hs256-0123456789"
    served = await start_serve(env={"SISYPHUS_SECRET": secret})
    try:
        await run_cli("grant", "42", "room:1", "--url", served.url)
        minted = await run_cli("token", "42", "--ttl", "60", env={"SISYPHUS_SECRET": secret})
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        client = await SseClient.open(served.port, f"token={token}")
        assert (await client.expect()).data == status("ok")
        refused = await SseClient.open(served.port, "user=42")
        assert [e.data for e in await refused.until_closed()] == [status("failure")]
    finally:
        await stop_serve(served)
    missing = await run_cli("token", "42", env={"SISYPHUS_SECRET": ""})
    assert missing.returncode == 2
    assert "SISYPHUS_SECRET" in missing.stderr
