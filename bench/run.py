"""Benchmark Sisyphus against Nchan: one command, same scenarios, same client.

    .venv/bin/python bench/run.py [--quick] [--only S1,S2,S3,S4,S5]
        [--targets sisyphus,nchan,sisyphus-redis,sisyphus-redis-w2,sisyphus-cluster,nchan-redis]

Every figure has a flag; --quick picks small sizes and short steps (the whole suite in
about three minutes) and explicit flags override it. Writes bench/results/bench-<time>.json
and .md, and prints the markdown. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

import c_client
import report
import uvloop
from pool import LoadPool
from scenarios import Plan, Runner, redis_note
from targets import Target, make_targets, valkey_binary

HERE = Path(__file__).resolve().parent
FULL: dict[str, Any] = {
    "s1_sizes": [1000, 10000, 19900],
    "s1_idle_seconds": 20.0,
    "s2_subscribers": [10000, 1000],
    "s2_rates": [1, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
    "s3_users": 10000,
    "s3_rates": [100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000],
    "step_seconds": 10.0,
    "drain_seconds": 3.0,
    "drain_max_seconds": 30.0,
    "s4_seconds": 10.0,
    "s4_concurrency": 256,
    "s4_users": 1000,
    "payload_bytes": 100,
    "pub_conns": 4,
    "pub_window": 64,
    "sample_every": 0,
    "keep_going": False,
    "connect_concurrency": 128,
    "connect_timeout": 30.0,
    "settle_seconds": 1.0,
}
QUICK: dict[str, Any] = {
    **FULL,
    "s1_sizes": [1000, 5000],
    "s1_idle_seconds": 3.0,
    "s2_subscribers": [1000],
    "s2_rates": [1, 10, 100],
    "s3_users": 1000,
    "s3_rates": [10, 100, 1000],
    "step_seconds": 2.0,
    "drain_seconds": 1.0,
    "drain_max_seconds": 10.0,
    "s4_seconds": 3.0,
    "settle_seconds": 0.5,
}


def numbers(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(part) for part in text.split(",") if part.strip()]

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, short steps (~3 min)")
    p.add_argument("--only", default="S1,S2,S3,S4,S5", help="scenarios to run (default all)")
    p.add_argument("--targets", default="sisyphus,nchan,sisyphus-redis")
    p.add_argument("--server-cpu", type=int, default=0, help="core of the server (taskset)")
    p.add_argument("--load-cpu", type=int, default=1, help="core of the load generator")
    p.add_argument("--redis-cpu", type=int, default=0, help="core of Valkey (default: server's)")
    p.add_argument("--workers", type=int, default=4, help="subscriber processes")
    p.add_argument("--keepalive", type=float, default=15.0, help="keep-alive of both servers")
    p.add_argument(
        "--nchan-buffer", type=int, default=10000, help="nchan_message_buffer_length per channel"
    )
    p.add_argument(
        "--nchan-worker-connections",
        type=int,
        default=20000,
        help="nginx worker_connections (worker_rlimit_nofile stays 20000)",
    )
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument(
        "--no-c-client",
        action="store_true",
        help="S4 without the C churn client (run by default when a C compiler is found)",
    )
    g = p.add_argument_group("scenario sizes (default: full run; --quick: smaller)")
    g.add_argument("--s1-sizes", type=numbers(int), help="S1 streams held, cumulative")
    g.add_argument("--s1-idle-seconds", type=float, help="S1 CPU window per size")
    g.add_argument("--s2-subscribers", type=numbers(int), help="S2 subscriber counts")
    g.add_argument("--s2-rates", type=numbers(float), help="S2 publish rates (msg/s)")
    g.add_argument("--s3-users", type=int, help="S3 users, one channel each")
    g.add_argument("--s3-rates", type=numbers(float), help="S3 publish rates (msg/s)")
    g.add_argument("--step-seconds", type=float, help="publishing time per rate step")
    g.add_argument("--drain-seconds", type=float, help="give up waiting after this silence")
    g.add_argument("--drain-max-seconds", type=float, help="wait at most this after a step")
    g.add_argument("--s4-seconds", type=float, help="S4 churn duration")
    g.add_argument("--s4-concurrency", type=int, help="S4 connections in flight")
    g.add_argument("--s4-users", type=int, help="S4 users cycled through")
    g.add_argument("--payload-bytes", type=int, help="message size")
    g.add_argument("--pub-conns", type=int, help="publisher connections")
    g.add_argument("--pub-window", type=int, help="unanswered publishes per connection")
    g.add_argument("--sample-every", type=int, help="latency from every n-th stream (0: auto)")
    g.add_argument("--keep-going", action="store_true", default=None, help="don't stop a ladder")
    g.add_argument("--connect-concurrency", type=int, help="handshakes in flight per worker")
    g.add_argument("--connect-timeout", type=float, help="seconds for a stream to get ready")
    g.add_argument("--settle-seconds", type=float, help="pause after opening streams")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    preset = QUICK if args.quick else FULL
    chosen = {}
    for f in fields(Plan):
        given = getattr(args, f.name)
        chosen[f.name] = preset[f.name] if given is None else given
    return Plan(**chosen)


def version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout + out.stderr else "?"


def describe(args: argparse.Namespace, plan: Plan, targets: list[Target]) -> dict[str, Any]:
    names = [t.name for t in targets]
    lines = [
        f"server pinned to CPU {args.server_cpu} (taskset -c {args.server_cpu}); load generator "
        f"({args.workers} subscriber processes + 1 publisher + this coordinator) pinned to "
        f"CPU {args.load_cpu}"
        + (f"; Valkey pinned to CPU {args.redis_cpu}" if any("redis" in n for n in names) else ""),
        f"targets: {', '.join(names)}; preset: {'quick' if args.quick else 'full'}",
        f"keep-alive {args.keepalive:g} s on both servers; payload {plan.payload_bytes} bytes; "
        f"{plan.step_seconds:g} s per rate step",
        "verdicts: pass = no loss, publisher on time, p99 < 100 ms; "
        "sustained = no loss, publisher on time, p99 < 1 s",
        f"machine: {os.cpu_count()} CPUs, open-file limit "
        f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, {platform.platform()}",
    ]
    versions = {
        "python": sys.version.split()[0],
        "sisyphus": version(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"]),
        "nginx": version(["nginx", "-v"]),
        "nchan": version(["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan"]),
    }
    if any("redis" in name for name in names):
        versions["valkey"] = version([valkey_binary(), "--version"])
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "describe": lines,
        "versions": versions,
        "plan": plan.__dict__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }


async def run(args: argparse.Namespace) -> int:
    os.sched_setaffinity(0, {args.load_cpu})
    plan = make_plan(args)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    scenarios = [s.strip().upper() for s in args.only.split(",") if s.strip()]
    targets = make_targets(
        names,
        args.server_cpu,
        args.redis_cpu,
        args.keepalive,
        args.nchan_buffer,
        args.nchan_worker_connections,
    )
    meta = describe(args, plan, targets)
    for line in meta["describe"]:
        print(f"# {line}", file=sys.stderr)
    pool = LoadPool(args.workers, args.load_cpu)
    await pool.start()
    results: dict[str, dict[str, Any]] = {s: {} for s in scenarios}
    began = time.monotonic()
    built = tempfile.TemporaryDirectory(prefix="bench-c-")
    churn_client = None
    if "S4" in scenarios and not args.no_c_client and c_client.compiler() is not None:
        churn_client = c_client.build("churn_client", Path(built.name))
    try:
        for scenario in scenarios:
            for target in targets:
                print(
                    f"[{time.monotonic() - began:6.1f}s] {scenario} {target.name}", file=sys.stderr
                )
                try:
                    data = await Runner(plan, pool, target, churn_client).run(scenario)
                    if scenario != "S2":  # S2 is keyed by subscriber count
                        data.update(redis_note(target))
                except Exception as exc:
                    traceback.print_exc()
                    data = {"error": f"{type(exc).__name__}: {exc}"}
                    target.stop()
                results[scenario][target.name] = data
                print(f"         {report.figures(scenario, data)[:3]}", file=sys.stderr)
    finally:
        await pool.stop()
        for target in targets:
            target.close()
        built.cleanup()
    meta["seconds"] = time.monotonic() - began
    json_path, md_path, text = report.write(args.results, meta, results, names)
    print(text)
    print(f"wrote {json_path} and {md_path} in {meta['seconds']:.0f} s", file=sys.stderr)
    return 0


def main() -> None:
    sys.exit(uvloop.run(run(parse_args())))


if __name__ == "__main__":
    main()
