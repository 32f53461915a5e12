"""The C load clients of bench/native/: built on demand, run pinned to the load core."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import procfs
from targets import STATUS_OK, Target

NATIVE = Path(__file__).resolve().parent / "native"
CHURN_CONCURRENCY = 64  # connections in flight, over two client processes
CYCLES_PER_S = re.compile(r"([0-9.]+) cycles/s")


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def build(name: str, into: Path) -> Path:
    cc = compiler()
    if cc is None:
        raise SystemExit("no C compiler: apt-get install gcc")
    binary = into / name
    source = NATIVE / f"{name}.c"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def run(argv: list[str]) -> str:
    """Run a client to its end; its last line of output."""
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def churn(
    target: Target, binary: Path, users: int, seconds: float, load_cpu: int
) -> dict[str, float]:
    """S4's cycle by the C client on a running, prepared target: cycles/s, and the CPU of
    the server and of its Redis over the run (%)."""
    path = target.subscriber("broadcast").replace("{i}", "%d")
    marker = STATUS_OK if target.ready_marker else "\r\n\r\n"
    server = procfs.total_cpu(target.server_pids())
    side = procfs.total_cpu(target.side_pids())
    began = time.monotonic()
    argv = [str(binary), str(target.port), path, marker, str(users), "2"]
    line = run([*argv, str(CHURN_CONCURRENCY), str(seconds), str(load_cpu)])
    wall = time.monotonic() - began
    found = CYCLES_PER_S.search(line)
    figures = {
        "cycles_per_s": float(found.group(1)) if found else 0.0,
        "server_cpu_pct": 100 * (procfs.total_cpu(target.server_pids()) - server) / wall,
    }
    if target.side_pids():
        figures["redis_cpu_pct"] = 100 * (procfs.total_cpu(target.side_pids()) - side) / wall
    return figures
