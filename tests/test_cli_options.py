"""The `sisyphus` command's options and first-hour mistakes, as an operator meets them."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sisyphus import cli
from tests.support.redis_server import RedisServer, free_port
from tests.test_cli import run_cli, start_serve, stop_serve

ROOT = Path(__file__).parent.parent


# History settings reach the Redis the CLI writes to -------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "ttl"),
    [
        ((), {}, 3600),
        (("--history-max-age", "60"), {}, 60),
        ((), {"SISYPHUS_HISTORY_MAX_AGE": "120"}, 120),
        (("--history-max-age", "30"), {"SISYPHUS_HISTORY_MAX_AGE": "120"}, 30),
    ],
)
async def test_redis_commands_apply_the_history_settings(
    redis_client: redis.Redis, redis_server: RedisServer, args: tuple[str, ...],
    env: dict[str, str], ttl: int,
) -> None:  # fmt: skip
    """`publish|grant --redis` retain messages as long as --history-max-age (or its variable)."""
    target = ("--redis", redis_server.url, *args)
    done = await run_cli("publish", "room:1", "x", *target, env=env)
    assert done.returncode == 0, done.stderr
    done = await run_cli("grant", "9", "news", *target, env=env)
    assert done.returncode == 0, done.stderr
    for key in ("sisyphus:history:room:1", "sisyphus:history:user:9"):
        assert ttl - 5 < redis_client.ttl(key) <= ttl


async def test_redis_url_may_come_from_the_variable(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    """With SISYPHUS_REDIS_URL set, as for `serve`, `grant` writes straight to that Redis."""
    done = await run_cli("grant", "3", "team/alpha", env={"SISYPHUS_REDIS_URL": redis_server.url})
    assert done.returncode == 0, done.stderr
    assert redis_client.smembers("user:3:channels") == {b"team/alpha"}


# First hour: one line naming the flag or variable and the value ------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ("serve", "--redis", "notaurl"),
            {},
            "sisyphus serve: --redis='notaurl' is invalid: Redis URL must specify one of",
        ),
        (
            ("serve",),
            {"SISYPHUS_REDIS_URL": "localhost:6379"},
            "sisyphus serve: SISYPHUS_REDIS_URL='localhost:6379' is invalid: Redis URL must",
        ),
        (
            ("serve", "--redis", "redis://h:abc/0"),
            {},
            "sisyphus serve: --redis='redis://h:abc/0' is invalid: Port could not be cast",
        ),
        (
            ("serve", "--host", "nohost.invalid"),
            {},
            "sisyphus serve: --host='nohost.invalid' is invalid: can't resolve it (",
        ),
        (
            ("serve",),
            {"SISYPHUS_API_KEY": "short"},
            "sisyphus serve: SISYPHUS_API_KEY=<hidden> is invalid: too short: an API key needs "
            "at least 16 characters",
        ),
        (
            ("serve",),
            {"SISYPHUS_PREVIOUS_SECRET": "p" * 32, "SISYPHUS_PREVIOUS_SECRET_UNTIL": "1"},
            "sisyphus serve: SISYPHUS_PREVIOUS_SECRET is set without SISYPHUS_SECRET",
        ),
        (
            ("serve", "--reuse-port", "yes"),
            {},
            "sisyphus serve: SISYPHUS_REUSE_PORT=yes needs SISYPHUS_REDIS_URL",
        ),
        (
            ("serve", "--workers", "2"),
            {},
            "sisyphus serve: SISYPHUS_WORKERS=2 needs SISYPHUS_REDIS_URL: with the embedded "
            "broker, worker processes would not share messages",
        ),
        (
            ("serve",),
            {"SISYPHUS_WORKERS": "2"},
            "sisyphus serve: SISYPHUS_WORKERS=2 needs SISYPHUS_REDIS_URL",
        ),
        (
            ("publish", "room:1", "x", "--redis", "localhost:6379"),
            {},
            "sisyphus publish: --redis='localhost:6379' is invalid: Redis URL must specify",
        ),
        (
            ("grant", "1", "room:1", "--url", "localhost:3001"),
            {},
            "sisyphus grant: --url='localhost:3001' is invalid: use http:// or https://",
        ),
        (
            ("token", "1"),
            {"SISYPHUS_SECRET": "short"},
            "sisyphus token: SISYPHUS_SECRET=<hidden> is invalid: too short",
        ),
    ],
)
async def test_bad_values_are_one_line_naming_the_source(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    """A bad URL, host or key exits 2 with one line naming the flag or variable, no traceback."""
    port = ("--port", str(free_port())) if args[0] == "serve" else ()
    done = await run_cli(*args, *port, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://:S3CRET/pw@127.0.0.1:6399/0",
        "redis://:S3C#RET@127.0.0.1:6399/0",
        "redis://:S3C?RET@127.0.0.1:6399/0",
        "redis+sentinel://:S3CRET/pw@h:26379/m/0",
    ],
)
@pytest.mark.parametrize("command", ["serve", "publish"])
async def test_a_bad_redis_url_with_a_password_shows_none_of_it(command: str, url: str) -> None:
    """A password with an unencoded / ? # breaks the URL: the one-line error says how to
    fix it, and neither the URL shown nor the parser's reason holds any of the password."""
    args = ("serve", "--port", str(free_port())) if command == "serve" else ("publish", "x", "y")
    done = await run_cli(*args, "--redis", url)
    assert done.returncode == 2, done.stderr
    assert "S3C" not in done.stderr and "pw@" not in done.stderr
    assert "percent-encode" in done.stderr
    assert done.stderr.count("\n") == 1


async def test_a_port_in_use_is_named() -> None:
    """A port another process holds stops `serve` with one line naming the address."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = await run_cli("serve", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"sisyphus serve: can't listen on 127.0.0.1:{port}: Address already in use"
    )


# The API key travels as the same bytes from curl and from the CLI ------------------------------


@pytest.fixture
def header_catcher() -> Iterator[tuple[str, list[bytes]]]:
    """A tiny HTTP server that records each request's raw Authorization header and answers 200."""
    seen: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"authorization:"):
                        seen.append(line.split(b":", 1)[1].strip())
                body = b'{"id": "e-1-1"}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body)
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    stop.set()
    thread.join(10)
    server.close()


@pytest.mark.parametrize("key", ["cl\u00e9-\u00e0-accents-0123", "snow\u2603man-0123456789"])
def test_non_ascii_api_key_is_sent_as_curl_sends_it(
    header_catcher: tuple[str, list[bytes]], key: str
) -> None:
    """`sisyphus grant` puts the same Authorization bytes on the wire as curl does (UTF-8)."""
    url, seen = header_catcher
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    subprocess.run(
        [curl, "-s", "-o", "/dev/null", "-H", f"Authorization: Bearer {key}", url],
        check=True,
        timeout=30,
    )
    done = subprocess.run(
        [sys.executable, "-m", "sisyphus", "grant", "1", "room:1", "--url", url],
        env={**os.environ, "SISYPHUS_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert seen == [b"Bearer " + key.encode(), b"Bearer " + key.encode()]


# Help texts -----------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["serve", "publish", "grant", "revoke", "position", "token"])
def test_every_subcommand_and_option_has_help(command: str) -> None:
    """`sisyphus COMMAND --help` has a description, and every argument says what it is."""
    parser = subcommands()[command]
    assert parser.description and len(parser.description) > 40
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    text = parser.format_help()
    assert "default ()" not in text


async def test_help_shows_no_empty_tuple_default() -> None:
    """`sisyphus serve --help` shows an empty list default as `none`, never `()`."""
    done = await run_cli("serve", "--help")
    assert done.returncode == 0
    assert "default ()" not in done.stdout
    assert "env SISYPHUS_CORS_ORIGINS, default none" in " ".join(done.stdout.split())


@pytest.mark.parametrize("command", ["publish", "grant", "revoke", "position"])
async def test_publishing_commands_show_the_shared_variables(command: str) -> None:
    """The publishing commands' help names the variables they share with `serve`."""
    done = await run_cli(command, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for variable in ("SISYPHUS_URL", "SISYPHUS_REDIS_URL", "SISYPHUS_API_KEY",
                     "SISYPHUS_HISTORY_SIZE", "SISYPHUS_HISTORY_MAX_AGE"):  # fmt: skip
        assert f"env {variable}" in text


def test_bare_server_help() -> None:
    """`bench/bare_server.py --help` prints its usage instead of a traceback."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bare_server.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: bare_server.py")
    assert "PORT" in done.stdout


async def test_non_ascii_api_key_is_accepted_by_the_service() -> None:
    """A service keyed with a non-ASCII key accepts the CLI that sends it."""
    key = "cl\u00e9-\u00e0-accents-0123"
    keyed = await start_serve(env={"SISYPHUS_API_KEY": key})
    try:
        done = await run_cli(
            "grant", "1", "room:1", "--url", keyed.url, env={"SISYPHUS_API_KEY": key}
        )
        assert done.returncode == 0, done.stderr
    finally:
        await stop_serve(keyed)
