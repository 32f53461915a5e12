"""Cross-checks in C for the figures a Python load generator can't settle by itself.

    .venv/bin/python bench/native_check.py [--connections 10000] [--churn-seconds 10]

Needs a C compiler (`cc`). Three checks, with the same pinning as bench/run.py (server
on core 0, load on core 1), against Sisyphus (embedded broker) and Nchan:

1. The broadcast floor (native/broadcast_floor.c): one process writing one event to
   each of N loopback connections, no server logic at all. It bounds what any
   single-core server reaches in S2 at 1 msg/s, and so how far below Nchan a p99 can go.
2. S2 at 1 msg/s with C subscribers (native/sse_subscribers.c): if the p99 matches
   bench/run.py's, the Python subscribers are not what it measures.
3. Churn with a C client (native/churn_client.c): bench/run.py's S4 client saturates its
   core before Nchan does, so this shows Nchan's real cycle rate, and whether
   Sisyphus's figure is its own. Also against bare_server.py: uvloop and httptools
   answering `ok` with nothing else, the floor of a Python server's cycle.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import c_client
import procfs
import wire
from c_client import build, run
from targets import STATUS_OK, Nchan, Sisyphus, Target, free_port, pinned, stop_process, wait_port


async def churn(target: Target, binary: Path, users: int, seconds: float, load_cpu: int) -> str:
    target.start()
    try:
        await target.prepare("broadcast", users)
        figures = c_client.churn(target, binary, users, seconds, load_cpu)
        return (
            f"{figures['cycles_per_s']:.0f} cycles/s, server CPU {figures['server_cpu_pct']:.0f} %"
        )
    finally:
        target.close()


async def broadcast(
    target: Target, binary: Path, subscribers: int, messages: int, load_cpu: int
) -> str:
    target.start()
    try:
        await target.prepare("broadcast", subscribers)
        path = target.subscriber("broadcast").replace("{i}", "%d")
        listening = messages + 8.0  # connecting, then one message a second, then slack
        argv = [str(binary), str(target.port), path, str(subscribers), "4", str(listening)]
        reader = await asyncio.create_subprocess_exec(
            *argv, str(load_cpu), stdout=asyncio.subprocess.PIPE
        )
        await asyncio.sleep(5)  # every stream open
        channel = target.channel("broadcast")
        for seq in range(messages):
            await target.publish(channel, wire.payload(7, time.monotonic_ns(), seq, 100))
            await asyncio.sleep(1)
        out, _ = await reader.communicate()
        return out.decode().strip().splitlines()[-1]
    finally:
        target.close()


def churn_bare(binary: Path, users: int, seconds: float, server_cpu: int, load_cpu: int) -> str:
    port = free_port()
    script = Path(__file__).resolve().parent / "bare_server.py"
    with tempfile.TemporaryDirectory(prefix="bench-bare-") as folder:
        log = Path(folder) / "server.log"
        with log.open("wb") as out:
            argv = pinned(server_cpu, [sys.executable, str(script), str(port)])
            server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(port, server, "bare_server.py", log)
            before = procfs.total_cpu([server.pid])
            began = time.monotonic()
            argv = [str(binary), str(port), "/?user=b%d", STATUS_OK, str(users), "2", "64"]
            line = run([*argv, str(seconds), str(load_cpu)])
            cpu = (procfs.total_cpu([server.pid]) - before) / (time.monotonic() - began)
            return f"{line}, server CPU {100 * cpu:.0f} %"
        finally:
            stop_process(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=10, help="S2 check: messages")
    parser.add_argument("--churn-seconds", type=float, default=10.0)
    parser.add_argument("--churn-users", type=int, default=1000)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-native-") as folder:
        floor = build("broadcast_floor", Path(folder))
        client = build("churn_client", Path(folder))
        subscribers = build("sse_subscribers", Path(folder))
        print(f"- server core {args.server_cpu}, load core {args.load_cpu}")
        cpus = [str(args.server_cpu), str(args.load_cpu)]
        line = run([str(floor), str(args.connections), "4", *cpus])
        print(f"- broadcast floor (C writer, no server logic): {line}")
        for target in (Sisyphus(args.server_cpu, 15.0), Nchan(args.server_cpu, 15.0)):
            line = asyncio.run(
                broadcast(target, subscribers, args.connections, args.messages, args.load_cpu)
            )
            print(f"- S2 at 1 msg/s, C subscribers, {target.name}: {line}")
        for target in (Sisyphus(args.server_cpu, 15.0), Nchan(args.server_cpu, 15.0)):
            line = asyncio.run(
                churn(target, client, args.churn_users, args.churn_seconds, args.load_cpu)
            )
            print(f"- churn, C client, {target.name}: {line}")
        line = churn_bare(
            client, args.churn_users, args.churn_seconds, args.server_cpu, args.load_cpu
        )
        print(f"- churn, C client, bare_server.py (uvloop + httptools, no logic): {line}")


if __name__ == "__main__":
    sys.exit(main())
