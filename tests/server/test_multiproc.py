"""Several workers' figures in one shared folder, merged by prometheus-client (real files)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import mark_process_dead

from sisyphus.metrics import Buckets
from sisyphus.server.multiproc import STALE_SECONDS, SharedFigures
from tests.support.metrics import samples


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[SharedFigures, SharedFigures]]:
    """Two workers' views of one folder (pids 11 and 22)."""
    pair = SharedFigures(str(tmp_path), pid=11), SharedFigures(str(tmp_path), pid=22)
    yield pair
    for shared in pair:
        shared.close()


def write(shared: SharedFigures, streams: int, opened: int, ready: int, now: float) -> None:
    latency = Buckets()
    latency.observe(0.002)
    shared.write(
        {"sisyphus_connections_opened": ("streams opened", opened)},
        {
            "sisyphus_streams": ("streams open", streams),
            "sisyphus_ready": ("ready", ready),
        },
        {"sisyphus_delivery_latency_seconds": ("latency", latency)},
        now,
    )


def test_counters_and_histograms_are_summed_gauges_kept_per_worker(
    tmp_path: Path, workers: tuple[SharedFigures, SharedFigures]
) -> None:
    first, second = workers
    write(first, streams=3, opened=5, ready=1, now=100.0)
    write(second, streams=4, opened=7, ready=1, now=100.0)
    write(first, streams=2, opened=6, ready=1, now=101.0)  # absolute values: overwritten
    seen = samples(generate_latest(second.registry).decode())
    assert seen["sisyphus_connections_opened_total"] == 13
    assert seen['sisyphus_streams{pid="11"}'] == 2
    assert seen['sisyphus_streams{pid="22"}'] == 4
    assert seen['sisyphus_delivery_latency_seconds_bucket{le="0.0025"}'] == 2
    assert seen['sisyphus_delivery_latency_seconds_bucket{le="0.001"}'] == 0
    assert seen["sisyphus_delivery_latency_seconds_count"] == 2
    # A dead worker's gauges go; its counters stay, so the sums never go backwards.
    mark_process_dead(11, str(tmp_path))
    seen = samples(generate_latest(second.registry).decode())
    assert 'sisyphus_streams{pid="11"}' not in seen
    assert seen["sisyphus_connections_opened_total"] == 13


def test_ready_only_while_every_live_worker_is_ready_and_fresh(
    tmp_path: Path, workers: tuple[SharedFigures, SharedFigures]
) -> None:
    first, second = workers
    write(first, 0, 0, ready=1, now=100.0)
    write(second, 0, 0, ready=1, now=100.0)
    assert first.all_ready(100.5)
    write(second, 0, 0, ready=0, now=101.0)
    assert not first.all_ready(101.0)
    write(second, 0, 0, ready=1, now=102.0)
    assert first.all_ready(102.0)
    # The first one's loop stopped writing (wedged): not ready once its figures are stale.
    write(second, 0, 0, ready=1, now=100.0 + STALE_SECONDS + 1)
    assert not second.all_ready(100.0 + STALE_SECONDS + 1)
    mark_process_dead(11, str(tmp_path))  # reaped: no longer counted
    assert second.all_ready(100.0 + STALE_SECONDS + 1)
