"""The coordinator's side of the load generator: worker processes and who holds what.

Subscriber workers split every set of streams into contiguous id ranges; a separate
publisher worker publishes, so that a slow publish never stalls reading. Every worker
is pinned to the load core and binds its sockets to its own 64 source addresses
(127.0.0.2-65 for the first, 127.0.1.2-65 for the next...): each address has its own
28k ephemeral ports, so neither 19,900 streams nor churn's TIME_WAITs run out.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procfs

LOADGEN = Path(__file__).with_name("loadgen.py")
SOURCES_PER_WORKER = 64


@dataclass
class WorkerProc:
    process: asyncio.subprocess.Process
    sources: list[str]
    ranges: list[tuple[int, int]] = field(default_factory=list)  # ids of the streams held
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        async with self.lock:
            assert self.process.stdin is not None
            assert self.process.stdout is not None
            self.process.stdin.write(json.dumps(cmd).encode() + b"\n")
            await self.process.stdin.drain()
            line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"load worker {self.process.pid} died")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"load worker {self.process.pid}: {answer['error']}")
        return answer


class LoadPool:
    def __init__(self, workers: int, cpu: int) -> None:
        self.size = workers
        self.cpu = cpu
        self.subscribers: list[WorkerProc] = []
        self.publisher: WorkerProc | None = None

    async def _spawn(self, number: int) -> WorkerProc:
        taskset = shutil.which("taskset") or "taskset"
        process = await asyncio.create_subprocess_exec(
            taskset,
            "-c",
            str(self.cpu),
            sys.executable,
            str(LOADGEN),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,
        )
        # worker 0: 127.0.0.2-65, worker 1: 127.0.1.2-65, ... (all of 127/8 is loopback)
        sources = [f"127.0.{number}.{2 + k}" for k in range(SOURCES_PER_WORKER)]
        return WorkerProc(process, sources)

    async def start(self) -> None:
        self.subscribers = [await self._spawn(n) for n in range(self.size)]
        self.publisher = await self._spawn(self.size)

    @property
    def all(self) -> list[WorkerProc]:
        return [*self.subscribers, *([self.publisher] if self.publisher else [])]

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.all]

    def cpu_seconds(self) -> float:
        return procfs.total_cpu(self.pids())

    async def each(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.call(cmd) for w in self.subscribers)))

    async def open(self, start: int, stop: int, spec: dict[str, Any]) -> dict[str, Any]:
        """Open streams with ids [start, stop), split evenly over the subscriber workers."""
        n = stop - start
        calls = []
        lo = start
        for k, worker in enumerate(self.subscribers):
            hi = start + n * (k + 1) // len(self.subscribers)
            if hi > lo:
                worker.ranges.append((lo, hi))
                calls.append(
                    worker.call(
                        {**spec, "cmd": "open", "start": lo, "stop": hi, "sources": worker.sources}
                    )
                )
            lo = hi
        answers = await asyncio.gather(*calls)
        errors: dict[str, int] = {}
        for answer in answers:
            for reason, count in answer["errors"].items():
                errors[reason] = errors.get(reason, 0) + count
        return {
            "opened": sum(a["opened"] for a in answers),
            "errors": errors,
            "seconds": max(a["seconds"] for a in answers),
        }

    async def close(self) -> None:
        await self.each({"cmd": "close"})
        for worker in self.subscribers:
            worker.ranges.clear()

    async def stop(self) -> None:
        for worker in self.all:
            if worker.process.returncode is None:
                assert worker.process.stdin is not None
                worker.process.stdin.write(b'{"cmd": "exit"}\n')
                try:
                    await worker.process.stdin.drain()
                    await asyncio.wait_for(worker.process.wait(), 5)
                except (TimeoutError, ConnectionError):
                    worker.process.kill()
                    await worker.process.wait()

    def ids_in_order(self) -> list[int]:
        """Global stream ids, in the order the workers' counts arrays concatenate."""
        ids: list[int] = []
        for worker in self.subscribers:
            for lo, hi in worker.ranges:
                ids.extend(range(lo, hi))
        return ids
