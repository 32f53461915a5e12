"""sisyphus.js in a real headless Chromium: tab sharing, hand-over, tokens, resume, statuses."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from typing import Any

import pytest

from sisyphus.client import HttpPublisher, RedisPublisher
from sisyphus.server.app import Service
from tests.browser.conftest import PageServer, wait_until
from tests.conftest import ServiceFactory, grant, publish, revoke
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(120)


async def _is_open(page: Any) -> bool:
    return await state(page) == "open"


async def _has(page: Any, count: int, channel: str | None = None) -> bool:
    return len(await messages(page, channel)) >= count


async def events(page: Any, kind: str | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await page.evaluate("window.events || []")
    return [e for e in found if kind is None or e["kind"] == kind]


async def messages(page: Any, channel: str | None = None) -> list[str]:
    """The data of the messages the page's application got (on ``channel`` if given)."""
    found = await events(page, "message")
    return [e["data"] for e in found if channel is None or e["channel"] == channel]


async def state(page: Any) -> str | None:
    value: str | None = await page.evaluate("window.sub ? window.sub.state : null")
    return value


async def is_leader(page: Any) -> bool:
    return bool(await page.evaluate("window.sub ? window.sub.leader : false"))


async def metric(port: int, name: str) -> float:
    """A value from the service's /metrics (fetched from a thread: the service runs here)."""
    return await asyncio.to_thread(_metric, port, name)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def open_tabs(context: Any, url: str, count: int) -> list[Any]:
    pages = []
    for _ in range(count):
        page = await context.new_page()
        await page.goto(url)
        pages.append(page)
    return pages


async def cors_service(make_service: ServiceFactory, pages: PageServer, **settings: Any) -> Service:
    return await make_service(cors_origins=(pages.origin,), **settings)


async def test_eight_tabs_share_one_stream(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """Eight tabs of a user (past HTTP/1.1's six connections) get every message over one stream."""
    service = await cors_service(make_service, page_server)
    await grant(service.port, "42", "room:1")
    context = await browser.new_context()
    tabs = await open_tabs(context, page_server.harness(service.port, "/?user=42"), 8)
    for tab in tabs:
        await wait_until(lambda tab=tab: _is_open(tab))
    sent = [f"message {n}" for n in range(20)]
    for text in sent:
        await publish(service.port, "room:1", text)
    for tab in tabs:
        await wait_until(lambda tab=tab: _has(tab, len(sent)))
        assert await messages(tab) == sent
        assert [e["channel"] for e in await events(tab, "message")] == ["room:1"] * 20
    assert sum([await is_leader(tab) for tab in tabs]) == 1
    assert await metric(service.port, "sisyphus_streams") == 1
    await context.close()


async def test_tabs_rendered_with_different_positions_share_one_stream(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """Pages render their own position into the stream URL (`?lastEventId=`, the recipes'
    way): the tabs still share one stream, and every tab gets what followed its position."""
    service = await cors_service(make_service, page_server)
    await grant(service.port, "42", "room:1")
    context = await browser.new_context()
    tabs = []
    for n in range(7):  # more than HTTP/1.1's six connections per host
        position = await asyncio.to_thread(
            HttpPublisher(f"http://127.0.0.1:{service.port}").position
        )
        page = await context.new_page()
        await page.goto(page_server.harness(service.port, f"/?user=42&lastEventId={position}"))
        await wait_until(lambda page=page: _is_open(page))
        tabs.append(page)
        await publish(service.port, "room:1", f"after tab {n}")
    for n, tab in enumerate(tabs):
        await wait_until(lambda tab=tab, n=n: _has(tab, 7 - n))
        assert await messages(tab) == [f"after tab {k}" for k in range(n, 7)]
    assert await metric(service.port, "sisyphus_streams") == 1
    await context.close()


async def test_a_tab_rendered_before_the_last_messages_gets_them_when_it_joins(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """A page rendered at a position, whose script runs after more messages went out, joins
    the tab that holds the stream: it gets those messages, and no tab gets one twice."""
    service = await cors_service(make_service, page_server)
    await grant(service.port, "42", "room:1")
    base = f"http://127.0.0.1:{service.port}"
    context = await browser.new_context()
    holder = await context.new_page()
    await holder.goto(page_server.harness(service.port, "/?user=42"))
    await wait_until(lambda: _is_open(holder))
    rendered = await asyncio.to_thread(HttpPublisher(base).position)  # the late page's render
    for n in range(3):
        await publish(service.port, "room:1", f"before join {n}")
    await wait_until(lambda: _has(holder, 3))
    late = await context.new_page()
    await late.goto(page_server.harness(service.port, f"/?user=42&lastEventId={rendered}"))
    await wait_until(lambda: _has(late, 3))
    await publish(service.port, "room:1", "after join")
    expected = [f"before join {n}" for n in range(3)] + ["after join"]
    for tab in (holder, late):
        await wait_until(lambda tab=tab: _has(tab, 4))
    await asyncio.sleep(0.5)  # room for a duplicate to show
    assert await messages(holder) == expected
    assert await messages(late) == expected
    assert [e["status"] for e in await events(holder, "status")] == ["ok"]
    assert await metric(service.port, "sisyphus_streams") == 1
    await context.close()


async def test_holder_closed_another_tab_takes_over(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """The tab holding the stream closes: another takes over within 2 s, nothing lost or doubled."""
    service = await cors_service(make_service, page_server)
    await grant(service.port, "42", "room:1")
    context = await browser.new_context()
    tabs = await open_tabs(context, page_server.harness(service.port, "/?user=42"), 3)
    for tab in tabs:
        await wait_until(lambda tab=tab: _is_open(tab))
    sent = [f"before {n}" for n in range(5)]
    for text in sent:
        await publish(service.port, "room:1", text)
    for tab in tabs:
        await wait_until(lambda tab=tab: _has(tab, 5))
    holder = [tab for tab in tabs if await is_leader(tab)]
    assert len(holder) == 1
    rest = [tab for tab in tabs if tab is not holder[0]]
    closed_at = time.monotonic()
    await holder[0].close()
    # Published while the hand-over runs: the new holder must resume them.
    for n in range(5):
        text = f"during {n}"
        sent.append(text)
        await publish(service.port, "room:1", text)

    async def taken_over() -> bool:
        for tab in rest:
            if await is_leader(tab) and await state(tab) == "open":
                return True
        return False

    await wait_until(taken_over, timeout=10)
    took = time.monotonic() - closed_at
    assert took < 2.0, f"the hand-over took {took:.2f} s"
    for n in range(5):
        text = f"after {n}"
        sent.append(text)
        await publish(service.port, "room:1", text)
    for tab in rest:
        await wait_until(lambda tab=tab: _has(tab, len(sent)))
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    for tab in rest:
        assert await messages(tab) == sent
    await wait_until(lambda: _streams_are(service.port, 1))
    await context.close()


async def _streams_are(port: int, count: int) -> bool:
    return await metric(port, "sisyphus_streams") == count


SECRET = "browser-tests-secret-of-enough-length-0123456789"


async def test_expired_token_is_refreshed_without_loss(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """Tokens expire every 2 s: the page gets fresh ones and every message once, no reload."""
    service = await cors_service(make_service, page_server, secret=SECRET, leeway=0.0)
    await grant(service.port, "42", "room:1")
    page_server.secret = SECRET
    page_server.ttl = 2
    context = await browser.new_context()
    url = page_server.harness(
        service.port, "/", user="42", token=page_server.mint("42"), refresh="1"
    )
    page = (await open_tabs(context, url, 1))[0]
    await wait_until(lambda: _is_open(page))
    await page.evaluate("window.loadedOnce = true")
    sent = []
    deadline = time.monotonic() + 5.5  # past two expiries
    n = 0
    while time.monotonic() < deadline:
        sent.append(f"message {n}")
        await publish(service.port, "room:1", sent[-1])
        n += 1
        await asyncio.sleep(0.2)
    await wait_until(lambda: _has(page, len(sent), "room:1"))
    await asyncio.sleep(0.3)
    assert await messages(page, "room:1") == sent
    statuses = [(e["status"], e["reason"]) for e in await events(page, "status")]
    assert ("failure", "expired") in statuses
    assert page_server.tokens_minted >= 1
    assert await page.evaluate("window.loadedOnce") is True  # the same page: no reload
    await context.close()


async def test_expired_token_without_provider_stops(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """Without a tokenProvider an expired token is reported once and the client stops."""
    service = await cors_service(make_service, page_server, secret=SECRET, leeway=0.0)
    await grant(service.port, "42", "room:1")
    page_server.secret = SECRET
    page_server.ttl = 1
    context = await browser.new_context()
    url = page_server.harness(service.port, "/", token=page_server.mint("42"))
    page = (await open_tabs(context, url, 1))[0]
    await wait_until(lambda: _state_is(page, "closed"))
    failures = service.metrics.status_failure
    await asyncio.sleep(2)  # a looping client would have come back by now
    assert service.metrics.status_failure == failures
    statuses = [(e["status"], e["reason"]) for e in await events(page, "status")]
    # Expired on the stream, or already when it connected (on a slow machine).
    assert statuses in ([("ok", None), ("failure", "expired")], [("failure", "expired")])
    await context.close()


async def _state_is(page: Any, wanted: str) -> bool:
    return await state(page) == wanted


async def test_statuses_reach_the_application(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """reset calls onReset, failure and disconnected reach onStatus and stop; noops never show."""
    service = await cors_service(make_service, page_server)
    await grant(service.port, "42", "room:1")
    await grant(service.port, "43", "room:1")
    context = await browser.new_context()
    reset = (
        await open_tabs(
            context,
            page_server.harness(service.port, "/?user=42", last="zzzzzzzz-5-1700000000"),
            1,
        )
    )[0]
    unknown = (await open_tabs(context, page_server.harness(service.port, "/?user=77"), 1))[0]
    revoked = (await open_tabs(context, page_server.harness(service.port, "/?user=43"), 1))[0]
    await wait_until(lambda: _state_is(unknown, "closed"))
    await wait_until(lambda: _is_open(reset))
    assert [e["kind"] for e in await events(reset)][:3] == ["status", "status", "reset"]
    assert [(e["status"], e["reason"]) for e in await events(reset, "status")] == [
        ("ok", None),
        ("reset", "epoch"),
    ]
    assert [(e["status"], e["reason"]) for e in await events(unknown, "status")] == [
        ("failure", "unknown_user")
    ]
    await wait_until(lambda: _is_open(revoked))
    await revoke(service.port, "43", "room:1")
    await wait_until(lambda: _state_is(revoked, "closed"))
    assert [e["status"] for e in await events(revoked, "status")][-1] == "disconnected"
    await asyncio.sleep(1)  # keep-alives every 0.3 s meanwhile
    assert await messages(reset) == []
    assert all(e["kind"] != "message" or "rights" in e["data"] for e in await events(revoked))
    await context.close()


@pytest.mark.parametrize("broker_kind", ["redis"])
async def test_service_restart_resumes_exactly(
    make_service: ServiceFactory,
    page_server: PageServer,
    browser: Any,
    redis_server: RedisServer,
) -> None:
    """The service restarts while the app publishes to Redis: the page gets each message once."""
    service = await cors_service(make_service, page_server)
    port = service.port
    await grant(port, "42", "room:1")
    context = await browser.new_context()
    page = (await open_tabs(context, page_server.harness(port, "/?user=42"), 1))[0]
    await wait_until(lambda: _is_open(page))
    sent = [f"message {n}" for n in range(40)]
    publisher = RedisPublisher(redis_server.url)

    def publish_all() -> None:
        for text in sent:
            publisher.publish("room:1", text)
            time.sleep(0.05)

    publishing = asyncio.create_task(asyncio.to_thread(publish_all))
    await wait_until(lambda: _has(page, 5))
    await service.stop()
    await asyncio.sleep(0.3)  # the page finds nobody there meanwhile
    await cors_service(make_service, page_server, port=port)
    await publishing
    publisher.close()
    await wait_until(lambda: _has(page, len(sent)), timeout=30)
    await asyncio.sleep(0.3)
    assert await messages(page) == sent
    await context.close()
