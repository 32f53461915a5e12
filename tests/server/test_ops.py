"""/metrics as Prometheus reads it: the library's exposition, histograms that move."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from sisyphus.metrics import COUNTER_HELP, LATENCY_BUCKETS, Buckets
from sisyphus.server.app import Service
from sisyphus.server.ops import GAUGE_HELP, HISTOGRAM_HELP
from tests.conftest import grant, publish
from tests.support.metrics import samples
from tests.support.sse_client import SseClient, status


def scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    """GET /metrics over a real socket: (content type, body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5) as answer:
        return answer.headers["Content-Type"], answer.read().decode()


async def test_exposition_parses_with_help_and_type_for_every_metric(service: Service) -> None:
    """Prometheus's parser reads /metrics; every family has its HELP text and its type."""
    content_type, text = await asyncio.to_thread(scrape, service.port)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name, help in COUNTER_HELP.items():
        assert families[f"sisyphus_{name}"].type == "counter"
        assert families[f"sisyphus_{name}"].documentation == help
    for name, help in GAUGE_HELP.items():
        assert (families[f"sisyphus_{name}"].type, families[f"sisyphus_{name}"].documentation) == (
            "gauge",
            help,
        )
    for name, help in HISTOGRAM_HELP.items():
        family = families[f"sisyphus_{name}"]
        assert (family.type, family.documentation) == ("histogram", help)
        bounds = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
        assert [float(b) for b in bounds] == [*LATENCY_BUCKETS, float("inf")]
    assert "sisyphus_broker_reconnects" in families


async def test_openmetrics_when_the_scraper_asks_for_it(service: Service) -> None:
    """With Accept: application/openmetrics-text the answer is OpenMetrics, ending in # EOF."""
    content_type, text = await asyncio.to_thread(
        scrape, service.port, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    names = {family.name for family in openmetrics_families(text)}
    assert {"sisyphus_messages_in", "sisyphus_delivery_latency_seconds"} <= names


async def test_histograms_move_when_messages_flow(service: Service) -> None:
    """A stream's handshake and each delivered message show in the two histograms."""
    before = samples((await asyncio.to_thread(scrape, service.port))[1])
    assert before["sisyphus_delivery_latency_seconds_count"] == 0
    await grant(service.port, "7", "room:1")
    client = await SseClient.open(service.port, "user=7")
    assert (await client.expect()).data == status("ok")
    for index in range(3):
        await publish(service.port, "room:1", f"m{index}")
        assert (await client.next_message()).data == f"m{index}"
    after = samples((await asyncio.to_thread(scrape, service.port))[1])
    assert after["sisyphus_handshake_duration_seconds_count"] == 1
    assert after["sisyphus_handshake_duration_seconds_sum"] > 0
    # The rights notice of the grant had no listener yet; the three messages had one.
    assert after["sisyphus_delivery_latency_seconds_count"] == 3
    assert after['sisyphus_delivery_latency_seconds_bucket{le="+Inf"}'] == 3
    assert after["sisyphus_delivery_latency_seconds_sum"] > 0
    assert after["sisyphus_messages_out_total"] == 3


def test_buckets_count_each_value_under_the_smallest_bound_it_does_not_exceed() -> None:
    """A value equal to a bound falls in that bound's bucket (Prometheus's `le`)."""
    buckets = Buckets((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 0.01, 3.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("0.001", 2), ("0.01", 4), ("+Inf", 5)]
    assert abs(buckets.sum - 3.0135) < 1e-9
