"""The four scenarios, each on a freshly started target.

    S1 idle       hold 1k, 10k, 19,900 streams (opened cumulatively); RSS per stream
                  over the empty process, and CPU while nothing is published
    S2 broadcast  n subscribers on one channel, publish at rising rates
    S3 unicast    n users each on a channel of its own, messages to random users
    S4 churn      connect, wait for the stream to be ready, close; as fast as possible

A step at rate r publishes r*seconds messages on a schedule, waits until every
message arrived (or nothing arrived for `drain` seconds), then compares, stream by
stream, what it received with what was published to it. Verdicts of a step:

    sustained  no loss, publisher on time (every publish answered within 1 s of its
               scheduled time), p99 < 1 s
    pass       sustained and p99 < 100 ms
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import c_client
import procfs
import wire
from pool import LoadPool
from targets import SisyphusRedis, Target

PASS_P99_MS = 100.0
SUSTAINED_P99_MS = 1000.0
ON_TIME_MS = 1000.0
LOAD_SATURATED_PCT = 90.0
AUTO_SAMPLED_STREAMS = 1000
STEPS = itertools.count(1)


@dataclass
class Plan:
    s1_sizes: list[int]
    s1_idle_seconds: float
    s2_subscribers: list[int]
    s2_rates: list[float]
    s3_users: int
    s3_rates: list[float]
    step_seconds: float
    drain_seconds: float
    drain_max_seconds: float
    s4_seconds: float
    s4_concurrency: int
    s4_users: int
    payload_bytes: int
    pub_conns: int
    pub_window: int
    sample_every: int
    keep_going: bool
    connect_concurrency: int
    connect_timeout: float
    settle_seconds: float


class Meter:
    """CPU of the server, of its side processes (Redis) and of the load over a window."""

    def __init__(self, target: Target, pool: LoadPool) -> None:
        self.target = target
        self.pool = pool
        self.began = time.monotonic()
        self.server = procfs.total_cpu(target.server_pids())
        self.side = procfs.total_cpu(target.side_pids())
        self.load = self._load()

    def _load(self) -> float:
        return self.pool.cpu_seconds() + sum(os.times()[:2])

    def read(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self.began)
        figures = {
            "server_cpu_pct": 100
            * (procfs.total_cpu(self.target.server_pids()) - self.server)
            / wall,
            "load_cpu_pct": 100 * (self._load() - self.load) / wall,
            "seconds": wall,
        }
        if self.target.side_pids():
            side = procfs.total_cpu(self.target.side_pids()) - self.side
            figures["redis_cpu_pct"] = 100 * side / wall
        return figures


class Runner:
    def __init__(
        self, plan: Plan, pool: LoadPool, target: Target, churn_client: Path | None = None
    ) -> None:
        self.plan = plan
        self.pool = pool
        self.target = target
        # The C churn client (bench/native/churn_client.c), if built: S4 runs it too.
        self.churn_client = churn_client

    def stream_spec(self, kind: str, count: int = 1) -> dict[str, Any]:
        every = self.plan.sample_every
        if every <= 0:  # auto: about 1,000 sampled broadcast streams; every unicast one
            every = max(1, count // AUTO_SAMPLED_STREAMS) if kind == "broadcast" else 1
        return {
            "host": "127.0.0.1",
            "port": self.target.port,
            "path_fmt": self.target.subscriber(kind),
            "ready": self.target.ready_marker,
            "concurrency": self.plan.connect_concurrency,
            "timeout": self.plan.connect_timeout,
            "sample_every": every,
        }

    async def fresh(self, kind: str, users: int) -> None:
        self.target.stop()
        self.target.start()
        await self.target.prepare(kind, users)

    async def finish(self) -> None:
        await self.pool.close()
        self.target.stop()

    def extra(self) -> dict[str, Any]:
        try:
            return self.target.extra()
        except Exception as exc:  # a figure we could not read is reported, not fatal
            return {"extra_error": repr(exc)}

    # S1
    async def idle(self) -> dict[str, Any]:
        plan = self.plan
        sizes = sorted(plan.s1_sizes)
        await self.fresh("broadcast", sizes[-1])
        pids = self.target.server_pids()
        await asyncio.sleep(plan.settle_seconds)
        base_rss = procfs.total_rss_kib(pids)
        rows = []
        held = 0
        try:
            for size in sizes:
                opened = await self.pool.open(held, size, self.stream_spec("broadcast"))
                held = size
                await asyncio.sleep(plan.settle_seconds)
                meter = Meter(self.target, self.pool)
                await asyncio.sleep(plan.s1_idle_seconds)
                cpu = meter.read()
                states = await self.pool.each({"cmd": "step", "step": next(STEPS)})
                alive = size - sum(len(s["not_alive"]) for s in states)
                rss = procfs.total_rss_kib(self.target.server_pids())
                rows.append(
                    {
                        "size": size,
                        "opened_now": opened["opened"],
                        "alive": alive,
                        "errors": opened["errors"],
                        "connect_seconds": opened["seconds"],
                        "connect_rate": opened["opened"] / max(1e-9, opened["seconds"]),
                        "rss_kib": rss,
                        "base_rss_kib": base_rss,
                        "rss_per_conn_kib": (rss - base_rss) / alive if alive else None,
                        "server_fds": sum(procfs.open_fds(p) for p in pids),
                        **cpu,
                        **self.extra(),
                    }
                )
        finally:
            await self.finish()
        return {"rows": rows}

    # S2 and S3
    async def ladder(self, kind: str, count: int, rates: list[float]) -> dict[str, Any]:
        await self.fresh(kind, count)
        try:
            opened = await self.pool.open(0, count, self.stream_spec(kind, count))
            await asyncio.sleep(self.plan.settle_seconds)
            warm = self.target.channel(kind).format(i=0)
            await self.target.publish(warm, wire.payload(0, time.monotonic_ns(), 0, 16))
            await asyncio.sleep(0.2)
            steps = []
            for rate in rates:
                step = await self.step(kind, count, rate)
                steps.append(step)
                if not step["sustained"] and not self.plan.keep_going:
                    break
        finally:
            await self.finish()
        passing = [s["rate"] for s in steps if s["pass"]]
        sustained = [s["rate"] for s in steps if s["sustained"]]
        return {
            "subscribers": count,
            "opened": opened["opened"],
            "open_errors": opened["errors"],
            "steps": steps,
            "highest_pass": max(passing) if passing else None,
            "highest_sustained": max(sustained) if sustained else None,
        }

    async def step(self, kind: str, count: int, rate: float) -> dict[str, Any]:
        plan = self.plan
        step = next(STEPS)
        states = await self.pool.each({"cmd": "step", "step": step})
        meter = Meter(self.target, self.pool)
        channels = 1 if kind == "broadcast" else count
        assert self.pool.publisher is not None
        pub = await self.pool.publisher.call(
            {
                "cmd": "publish",
                **self.target.publisher(),
                "conns": plan.pub_conns,
                "window": plan.pub_window,
                "rate": rate,
                "seconds": plan.step_seconds,
                "step": step,
                "payload_bytes": plan.payload_bytes,
                "channel_fmt": self.target.channel(kind),
                "channels": channels,
                "ack_timeout": max(10.0, plan.step_seconds),
            }
        )
        per_channel: list[int] = pub["per_channel"]

        def expected(gid: int) -> int:
            return per_channel[0] if kind == "broadcast" else per_channel[gid]

        alive_ids: list[list[int]] = []
        want = 0
        for worker, state in zip(self.pool.subscribers, states, strict=True):
            ids = [gid for lo, hi in worker.ranges for gid in range(lo, hi)]
            gone = set(state["not_alive"])
            alive_ids.append([-1 if j in gone else gid for j, gid in enumerate(ids)])
            want += sum(expected(gid) for j, gid in enumerate(ids) if j not in gone)
        drain_seconds = await self.drain(want)
        answers = await self.pool.each({"cmd": "collect"})
        cpu = meter.read()
        missing = extra = received = dropped = 0
        hist: dict[int, int] = {}
        last_ns = 0
        for ids, answer in zip(alive_ids, answers, strict=True):
            wire.hist_merge(hist, answer["hist"])
            last_ns = max(last_ns, answer["last_ns"])
            dropped += sum(1 for j in answer["dropped"] if ids[j] >= 0)
            for gid, got in zip(ids, answer["counts"], strict=True):
                if gid < 0:
                    continue
                received += got
                missing += max(0, expected(gid) - got)
                extra += max(0, got - expected(gid))
        # Deliveries over the publishing window, or until the last one if they trail it.
        span = max(plan.step_seconds, (last_ns - pub["t0_ns"]) / 1e9)
        pub_span = max(1e-9, (pub["last_ack_ns"] - pub["t0_ns"]) / 1e9)
        p50 = wire.percentile_ms(hist, 0.50)
        p99 = wire.percentile_ms(hist, 0.99)
        lag_max = pub["ack_lag_ms"]["max"]
        on_time = (
            pub["failed"] == 0
            and pub["unanswered"] == 0
            and lag_max is not None
            and lag_max <= ON_TIME_MS
        )
        lossless = missing == 0 and dropped == 0 and received > 0
        sustained = lossless and on_time and p99 is not None and p99 < SUSTAINED_P99_MS
        return {
            "rate": rate,
            "published": pub["acked"],
            "publish_failed": pub["failed"] + pub["unanswered"],
            "publish_rate": pub["acked"] / pub_span,
            "publish_ack_lag_ms": pub["ack_lag_ms"],
            "publisher_on_time": on_time,
            "redis_zero_receivers": pub["zero_receivers"],
            "expected": want,
            "received": received,
            "missing": missing,
            "extra": extra,
            "dropped_streams": dropped,
            "deliveries_per_s": received / span,
            "latency_samples": sum(hist.values()),
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": wire.percentile_ms(hist, 1.0),
            "drain_seconds": drain_seconds,
            "sustained": sustained,
            "pass": sustained and p99 is not None and p99 < PASS_P99_MS,
            "load_saturated": cpu["load_cpu_pct"] >= LOAD_SATURATED_PCT,
            **cpu,
            **self.extra(),
        }

    async def drain(self, want: int) -> float:
        """Wait until ``want`` messages arrived, none arrived for drain_seconds, or
        drain_max_seconds passed."""
        began = last_change = time.monotonic()
        seen = -1
        while True:
            totals = await self.pool.each({"cmd": "total"})
            got = sum(t["total"] for t in totals)
            now = time.monotonic()
            if got >= want:
                return now - began
            if got != seen:
                seen, last_change = got, now
            elif now - last_change >= self.plan.drain_seconds:
                return now - began
            if now - began >= self.plan.drain_max_seconds:
                return now - began  # still trickling in: what is missing now counts as lost
            await asyncio.sleep(0.1)

    async def broadcast(self) -> dict[str, Any]:
        runs = {}
        for count in self.plan.s2_subscribers:
            runs[str(count)] = await self.ladder("broadcast", count, self.plan.s2_rates)
        return runs

    async def unicast(self) -> dict[str, Any]:
        return await self.ladder("unicast", self.plan.s3_users, self.plan.s3_rates)

    # S5: S3's load on each user's own channel (for Nchan the same as S3's channels)
    async def personal(self) -> dict[str, Any]:
        return await self.ladder("personal", self.plan.s3_users, self.plan.s3_rates)

    # S4
    async def churn(self) -> dict[str, Any]:
        plan = self.plan
        await self.fresh("broadcast", plan.s4_users)
        try:
            await asyncio.sleep(plan.settle_seconds)
            spec = self.stream_spec("broadcast")
            per_worker = max(1, plan.s4_concurrency // len(self.pool.subscribers))
            meter = Meter(self.target, self.pool)
            churning = asyncio.gather(
                *(
                    worker.call(
                        {
                            **spec,
                            "cmd": "churn",
                            "start": 0,
                            "stop": plan.s4_users,
                            "concurrency": per_worker,
                            "seconds": plan.s4_seconds,
                            "sources": worker.sources,
                        }
                    )
                    for worker in self.pool.subscribers
                )
            )
            await asyncio.sleep(plan.s4_seconds / 2)
            extra = self.extra()  # mid-churn, while streams are subscribed
            answers = await churning
            cpu = meter.read()
            by_c: dict[str, float] = {}
            if self.churn_client is not None:
                # The Python client saturates its core before Nchan does: the C client
                # shows each server's own rate, on the same running target.
                by_c = await asyncio.to_thread(
                    c_client.churn,
                    self.target,
                    self.churn_client,
                    plan.s4_users,
                    plan.s4_seconds,
                    self.pool.cpu,
                )
        finally:
            await self.finish()
        hist: dict[int, int] = {}
        errors: dict[str, int] = {}
        for answer in answers:
            wire.hist_merge(hist, answer["hist"])
            for reason, n in answer["errors"].items():
                errors[reason] = errors.get(reason, 0) + n
        cycles = sum(a["cycles"] for a in answers)
        seconds = max(a["seconds"] for a in answers)
        return {
            "cycles": cycles,
            "cycles_per_s": cycles / seconds,
            "errors": errors,
            "handshake_p50_ms": wire.percentile_ms(hist, 0.5),
            "handshake_p99_ms": wire.percentile_ms(hist, 0.99),
            "concurrency": per_worker * len(self.pool.subscribers),
            **cpu,
            **extra,
            **{f"c_client_{name}": value for name, value in by_c.items()},
        }

    async def run(self, scenario: str) -> dict[str, Any]:
        if scenario == "S1":
            return await self.idle()
        if scenario == "S2":
            return await self.broadcast()
        if scenario == "S3":
            return await self.unicast()
        if scenario == "S4":
            return await self.churn()
        if scenario == "S5":
            return await self.personal()
        raise SystemExit(f"unknown scenario {scenario!r}: S1, S2, S3, S4 or S5")


def redis_note(target: Target) -> dict[str, Any]:
    if isinstance(target, SisyphusRedis):
        return {"redis_pubsub_conns_max": target.valkey.max_pubsub}
    return {}
