"""One load-generator process: holds SSE streams, churns them, or publishes.

Driven by ``run.py`` over stdin/stdout, one JSON object per line each way; every
answer carries ``cpu``, this process's CPU seconds so far. Commands:

    open     open streams [start, stop) on path_fmt.format(i=id), bound to source IPs
    step     count only messages tagged with this step from now on; zero the counters
    total    messages of the step received so far (for draining)
    collect  per-stream counts, the latency histogram, streams lost since the step began
    close    close every stream
    churn    connect, wait for the stream to be ready, close; for `seconds`
    publish  publish at `rate` for `seconds` on pipelined connections; per-channel acks
    exit

Run it as ``python bench/loadgen.py`` (run.py does, pinned with taskset).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from collections import Counter
from functools import partial
from typing import Any

import redis
import uvloop
import wire
from clients import HttpPipe, Pipe, RespPipe, Shard, SseStream, open_pipe
from redis.crc import key_slot

Command = dict[str, Any]
MIN_SLEEP = 0.001


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"[:120]


def cluster_owners(host: str, port: int) -> list[int]:
    """Slot -> the port of the primary serving it, as CLUSTER SLOTS says."""
    client = redis.Redis(host=host, port=port, protocol=2)
    try:
        reply = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    owners = [0] * 16384
    for start, end, primary, *_ in reply:
        owners[start : end + 1] = [int(primary[1])] * (end - start + 1)
    return owners


class Worker:
    def __init__(self) -> None:
        self.shard = Shard()
        self.streams: list[SseStream | None] = []

    async def _open_one(
        self, shard: Shard, index: int, cmd: Command, gid: int, sampled: bool
    ) -> SseStream:
        loop = asyncio.get_running_loop()
        sources = cmd["sources"]
        ready: asyncio.Future[None] = loop.create_future()
        marker = cmd["ready"].encode() if cmd["ready"] else None
        # Bound to a source address first (any port): each address has its own ports.
        # uvloop's create_connection costs half the CPU of sock_connect + sock=.
        transport, stream = await loop.create_connection(
            lambda: SseStream(shard, index, marker, ready, sampled),
            cmd["host"],
            cmd["port"],
            local_addr=(sources[gid % len(sources)], 0),
        )
        transport.write(wire.subscribe_request(cmd["path_fmt"].format(i=gid)))
        try:
            await asyncio.wait_for(ready, cmd["timeout"])
        except BaseException:
            stream.closing = True
            transport.abort()
            raise
        return stream

    async def open(self, cmd: Command) -> Command:
        start, stop = cmd["start"], cmd["stop"]
        base = len(self.streams)
        self.streams.extend([None] * (stop - start))
        self.shard.counts.extend([0] * (stop - start))
        every = max(1, cmd.get("sample_every", 1))
        ids = iter(range(start, stop))
        errors: Counter[str] = Counter()
        began = time.monotonic()

        async def runner() -> None:
            for gid in ids:
                index = base + gid - start
                try:
                    self.streams[index] = await self._open_one(
                        self.shard, index, cmd, gid, index % every == 0
                    )
                except Exception as exc:
                    errors[_reason(exc)] += 1
                    self.shard.failed.add(index)

        await asyncio.gather(*(runner() for _ in range(cmd["concurrency"])))
        return {
            "opened": stop - start - sum(errors.values()),
            "errors": dict(errors),
            "seconds": time.monotonic() - began,
        }

    def step(self, cmd: Command) -> Command:
        self.shard.set_step(cmd["step"])
        gone = sorted(self.shard.failed | self.shard.dropped)
        return {"not_alive": gone}

    def total(self, cmd: Command) -> Command:
        return {"total": sum(self.shard.counts), "last_ns": self.shard.last_ns}

    def collect(self, cmd: Command) -> Command:
        shard = self.shard
        return {
            "counts": shard.counts,
            "hist": wire.hist_sparse(shard.hist),
            "last_ns": shard.last_ns,
            "dropped": sorted(shard.dropped),
        }

    def close(self, cmd: Command) -> Command:
        closed = 0
        for stream in self.streams:
            if stream is not None:
                stream.close()
                closed += 1
        self.streams = []
        self.shard = Shard()
        return {"closed": closed}

    async def churn(self, cmd: Command) -> Command:
        deadline = time.monotonic() + cmd["seconds"]
        start, stop, concurrency = cmd["start"], cmd["stop"], cmd["concurrency"]
        shard = Shard()
        shard.counts = [0]
        hist = [0] * wire.HIST_SIZE
        errors: Counter[str] = Counter()
        cycles = 0
        began = time.monotonic()

        async def runner(k: int) -> None:
            nonlocal cycles
            while time.monotonic() < deadline:
                gid = start + k % (stop - start)
                k += concurrency
                t = time.monotonic_ns()
                try:
                    stream = await self._open_one(shard, 0, cmd, gid, False)
                except Exception as exc:
                    errors[_reason(exc)] += 1
                    await asyncio.sleep(0.01)  # a refusing server must not spin us
                    continue
                stream.close()
                cycles += 1
                hist[wire.bucket((time.monotonic_ns() - t) // 1000)] += 1

        await asyncio.gather(*(runner(k) for k in range(concurrency)))
        return {
            "cycles": cycles,
            "errors": dict(errors),
            "seconds": time.monotonic() - began,
            "hist": wire.hist_sparse(hist),
        }

    async def publish(self, cmd: Command) -> Command:
        mode = cmd["mode"]
        build = wire.PUBLISH_FORMATS[mode]
        kind: type[Pipe] = RespPipe if mode.startswith("redis") else HttpPipe
        window, rate, step, size = cmd["window"], cmd["rate"], cmd["step"], cmd["payload_bytes"]
        channels = [cmd["channel_fmt"].format(i=i) for i in range(cmd["channels"])]
        if mode == "redis-cluster":
            # One set of pipes per primary; each channel goes to the one serving its slot.
            owners = cluster_owners(cmd["host"], cmd["port"])
            by_node = {
                port: [await open_pipe(kind, cmd["host"], port) for _ in range(cmd["conns"])]
                for port in sorted(set(owners))
            }
            pipes = [pipe for group in by_node.values() for pipe in group]
            routes = [by_node[owners[key_slot(channel.encode())]] for channel in channels]
        else:
            pipes = [await open_pipe(kind, cmd["host"], cmd["port"]) for _ in range(cmd["conns"])]
            routes = [pipes] * len(channels)
        drawn: int | None = None  # a channel drawn while its pipes were full: sent next
        total = max(1, round(rate * cmd["seconds"]))
        rng = random.Random(cmd.get("seed", step))  # noqa: S311 (load pattern, not a secret)
        acked = [0] * len(channels)
        lags: list[int] = []
        failed = 0
        last_ack = 0
        wake = asyncio.Event()
        everything = asyncio.get_running_loop().create_future()
        interval = 1e9 / rate
        t0 = time.monotonic_ns() + 1_000_000
        send_lag_max = 0

        def done(channel: int, due: int, ok: bool) -> None:
            nonlocal failed, last_ack
            now = time.monotonic_ns()
            last_ack = now
            lags.append(now - due)
            if ok:
                acked[channel] += 1
            else:
                failed += 1
            wake.set()
            if len(lags) == total and not everything.done():
                everything.set_result(None)

        sent = 0
        turn = 0
        while sent < total:
            now = time.monotonic_ns()
            due_count = min(total, int((now - t0) / interval) + 1) if now >= t0 else 0
            blocked = False
            while sent < due_count:
                if drawn is None:
                    drawn = rng.randrange(len(channels)) if len(channels) > 1 else 0
                channel = drawn
                route = routes[channel]
                for _ in range(len(route)):
                    pipe = route[turn % len(route)]
                    turn += 1
                    if len(pipe.pending) < window:
                        break
                else:
                    blocked = True
                    break
                drawn = None
                due = t0 + int(sent * interval)
                send_lag_max = max(send_lag_max, now - due)
                pipe.queue(
                    build(channels[channel], wire.payload(step, now, sent, size)),
                    partial(done, channel, due),
                )
                sent += 1
            for pipe in pipes:
                pipe.flush()
            if blocked:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 1.0)
            elif sent < total:
                wait = (t0 + sent * interval - time.monotonic_ns()) / 1e9
                # at least a millisecond: the loop timer resolution; due messages go as a batch
                await asyncio.sleep(max(MIN_SLEEP, wait))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everything, cmd.get("ack_timeout", 30))
        zero = sum(p.zero_receivers for p in pipes if isinstance(p, RespPipe))
        for pipe in pipes:
            if pipe.transport is not None:
                pipe.transport.close()
        lags.sort()

        def lag_ms(q: float) -> float | None:
            return lags[min(len(lags) - 1, int(q * len(lags)))] / 1e6 if lags else None

        return {
            "planned": total,
            "sent": sent,
            "acked": sum(acked),
            "failed": failed,
            "unanswered": total - len(lags),
            "zero_receivers": zero,
            "per_channel": acked,
            "t0_ns": t0,
            "last_ack_ns": last_ack,
            "send_lag_max_ms": send_lag_max / 1e6,
            "ack_lag_ms": {"p50": lag_ms(0.5), "p99": lag_ms(0.99), "max": lag_ms(1.0)},
        }


async def serve() -> None:
    worker = Worker()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    while line := await reader.readline():
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "exit":
            break
        method = getattr(worker, name)
        try:
            answer = method(cmd)
            if asyncio.iscoroutine(answer):
                answer = await answer
        except Exception as exc:
            answer = {"error": _reason(exc)}
        answer["cpu"] = time.process_time()
        out.write(json.dumps(answer).encode() + b"\n")
        out.flush()
    worker.close({})


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve())


if __name__ == "__main__":
    main()
