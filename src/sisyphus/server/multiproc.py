"""The whole service's figures when it runs as several workers (``serve --workers N``).

The supervisor gives every worker the same fresh folder in ``PROMETHEUS_MULTIPROC_DIR``.
Each worker writes its own figures there, as absolute values read from its plain
counters, once per tick and whenever it answers ``/metrics`` or ``/readyz``; any worker
reads every worker's files back, so a scrape or a probe answers for the whole service
whichever worker the kernel hands it to. The hot path is untouched: it still only adds
to integers, and a single process (no such folder) never comes here.

The files are prometheus-client's own multiprocess format (one memory-mapped file per
kind and pid), so its ``MultiProcessCollector`` merges them: counters and histograms
are summed over every worker that ever ran (a dead worker's file stays, so the sums
never go backwards), gauges carry a ``pid`` label per live worker (``liveall``: the
supervisor's ``mark_process_dead`` removes a dead worker's gauges).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from sisyphus.metrics import Buckets

# The folder's variable: prometheus-client's own name for it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Gauges per live worker, with a pid label, removed when the supervisor reaps the worker.
GAUGE_MODE = "liveall"

# A worker whose figures are older than this has a wedged event loop: not ready. Far
# above the tick (at most 1 s), so a busy machine doesn't make readiness flap.
STALE_SECONDS = 10.0

READY_GAUGE = "sisyphus_ready"

Figures = Mapping[str, tuple[str, float]]  # metric name -> (HELP, value)


class SharedFigures:
    """One worker's figures in the shared folder, and every worker's read back."""

    def __init__(self, path: str, pid: int | None = None) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self._files: dict[str, MmapedDict] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, path)  # type: ignore[no-untyped-call]

    def _file(self, prefix: str) -> MmapedDict:
        found = self._files.get(prefix)
        if found is None:
            name = os.path.join(self.path, f"{prefix}_{self.pid}.db")
            found = self._files[prefix] = MmapedDict(name)  # type: ignore[no-untyped-call]
        return found

    def write(
        self,
        counters: Figures,
        gauges: Figures,
        histograms: Mapping[str, tuple[str, Buckets]],
        now: float,
    ) -> None:
        """Store this worker's figures; ``now`` (a clock all processes share) dates them."""
        file = self._file("counter")
        for name, (help, value) in counters.items():
            _put(file, mmap_key(name, name + "_total", [], [], help), value, now)
        file = self._file(f"gauge_{GAUGE_MODE}")
        for name, (help, value) in gauges.items():
            _put(file, mmap_key(name, name, [], [], help), value, now)
        file = self._file("histogram")
        for name, (help, buckets) in histograms.items():
            # Per-bucket counts, not cumulative: the collector accumulates when it merges.
            bounds = (*buckets.bounds, float("inf"))
            for bound, count in zip(bounds, buckets.counts, strict=True):
                key = mmap_key(name, name + "_bucket", ["le"], [floatToGoString(bound)], help)  # type: ignore[no-untyped-call]
                _put(file, key, count, now)
            _put(file, mmap_key(name, name + "_sum", [], [], help), buckets.sum, now)

    def close(self) -> None:
        """Close this worker's files (a later write opens them again)."""
        for file in self._files.values():
            file.close()  # type: ignore[no-untyped-call]
        self._files.clear()

    def all_ready(self, now: float) -> bool:
        """Whether every live worker said it is ready, within the last STALE_SECONDS."""
        for path in glob.glob(os.path.join(self.path, f"gauge_{GAUGE_MODE}_*.db")):
            try:
                values = list(MmapedDict.read_all_values_from_file(path))  # type: ignore[no-untyped-call]
            except FileNotFoundError:
                continue  # the supervisor just reaped that worker
            for key, value, stamp, _ in values:
                if json.loads(key)[1] == READY_GAUGE:
                    if value != 1 or now - stamp > STALE_SECONDS:
                        return False
                    break
        return True


def _put(file: MmapedDict, key: str, value: float, now: float) -> None:
    file.write_value(key, float(value), now)  # type: ignore[no-untyped-call]
