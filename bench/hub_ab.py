"""The hot path's Python cost, the working tree's hub against the hub of a git revision.

    python bench/hub_ab.py --base REV [--subscribers 10000] [--messages 50] [--trials 30]

Both hubs run in one process, trial after trial in turn, on subscribers of their own, so
a busy shared machine slows both alike; the minimum over many trials is the number to
compare (the median shows the noise). Used to price a change to ``hub.py`` itself; only
``hub.py`` is taken from REV, the rest of the package is the working tree's.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from null_transport import NullTransport

import sisyphus.hub.hub
from sisyphus.hub.subscriber import Subscriber
from sisyphus.metrics import Metrics

PAYLOAD = b'{"event":"changed","id":12345,"ts":1795869851.123}'


class Sink:
    def subscribe(self, channels: list[str]) -> None:
        return None

    def unsubscribe(self, channels: list[str]) -> None:
        return None


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup(module: ModuleType, subscribers: int) -> tuple[object, list[Callable[[], None]]]:
    scheduled: list[Callable[[], None]] = []
    hub = module.Hub(
        Sink(), scheduled.append, time.monotonic, Metrics(), lambda u, p: None, time.time
    )
    for index in range(subscribers):
        sub = Subscriber(NullTransport(), f"u{index}", b"e-0-0", 1 << 40, 0.0)
        hub.add(sub, ["room:1"])
        sub.go_live(b"", b"e-0-0", 0.0)
    return hub, scheduled


def trial(
    hub: object, scheduled: list[Callable[[], None]], messages: int, subscribers: int
) -> float:
    """ns per delivery for ``messages`` messages, one per loop iteration."""
    dispatch = hub.dispatch  # type: ignore[attr-defined]
    start = time.perf_counter()
    for seq in range(messages):
        dispatch("room:1", PAYLOAD, seq + 1, b"e", 1)
        for callback in scheduled:
            callback()
        scheduled.clear()
    return (time.perf_counter() - start) * 1e9 / (messages * subscribers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the hub to compare with")
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    source = Path(sisyphus.hub.hub.__file__)
    base = subprocess.run(
        ["git", "show", f"{args.base}:src/sisyphus/hub/hub.py"],  # noqa: S607 - git from PATH
        capture_output=True,
        check=True,
        cwd=source.parent,
    ).stdout
    with tempfile.NamedTemporaryFile(suffix=".py") as copy:
        copy.write(base)
        copy.flush()
        modules = {"base": load(Path(copy.name), "hub_base"), "tree": sisyphus.hub.hub}
        hubs = {name: setup(module, args.subscribers) for name, module in modules.items()}
        results: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(args.trials):
            for name, (hub, scheduled) in hubs.items():
                results[name].append(trial(hub, scheduled, args.messages, args.subscribers))
    for name, values in results.items():
        print(
            f"{name} ({args.base if name == 'base' else 'working tree'}): "
            f"min {min(values):.1f} ns, median {statistics.median(values):.1f} ns per delivery"
        )
    base_min, tree_min = min(results["base"]), min(results["tree"])
    ratio = statistics.median(results["tree"]) / statistics.median(results["base"])
    print(
        f"{args.subscribers} subscribers, {args.trials} trials of {args.messages} messages: "
        f"tree/base {tree_min / base_min:.3f} (min), {ratio:.3f} (median)"
    )


if __name__ == "__main__":
    sys.exit(main())
