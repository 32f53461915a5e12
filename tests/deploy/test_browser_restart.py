"""Ten Chromium tabs behind nginx live through a restart of the one Sisyphus process."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any
from urllib.parse import urlencode

import pytest

from sisyphus.client import RedisPublisher
from tests.deploy.conftest import NginxFactory, ServeFactory, token
from tests.support.browser import PageServer, chromium, missing_browser
from tests.support.redis_server import free_port

TABS = 10

PAGE = """<!doctype html><meta charset="utf-8"><title>tab</title>
<script>
window.got = []; window.opens = 0; window.errors = 0;
const params = new URLSearchParams(location.search);
window.source = new EventSource(params.get("stream"), {withCredentials: true});
source.onopen = () => { opens += 1; };
source.onerror = () => { errors += 1; };
source.onmessage = (e) => {
  if (e.data !== "noop" && !e.data.startsWith("<message>")) got.push(e.data);
};
</script>"""

STATE = "({got, opens, errors, readyState: source.readyState})"


@pytest.fixture
def browser_available() -> None:
    reason = missing_browser()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.timeout(150)
async def test_ten_tabs_reconnect_and_miss_nothing_across_a_restart(
    browser_available: None,
    serve: ServeFactory,
    make_nginx: NginxFactory,
    publisher: RedisPublisher,
) -> None:
    """SIGTERM, 5 s down, started again: all 10 tabs come back by themselves and get every
    message published meanwhile, none twice."""
    pages = PageServer(PAGE)
    pages.start()
    port = free_port()
    args = ("--cors-origins", pages.origin, "--keepalive", "5")
    served = await serve(*args, port=port)
    nginx = make_nginx([port])
    sent: list[str] = []

    def publish(count: int) -> None:
        for _ in range(count):
            sent.append(f"m{len(sent)}")
            publisher.publish("room:1", sent[-1])

    try:
        async with chromium() as context:
            tabs = []
            for n in range(TABS):
                user = f"tab{n}"
                publisher.grant(user, ["room:1"])
                stream = f"{nginx.url}/?token={token(user)}"
                page = await context.new_page()
                await page.goto(f"{pages.origin}/tab.html?{urlencode({'stream': stream})}")
                tabs.append(page)
            await _until(tabs, lambda s: s["opens"] >= 1, "every tab open")
            publish(5)
            await _until(tabs, lambda s: len(s["got"]) == len(sent), "live messages")
            served.process.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            stopped_at = loop.time()
            assert await asyncio.wait_for(served.process.wait(), 20) == 0
            while loop.time() < stopped_at + 5:  # five seconds down, publishing meanwhile
                publish(1)
                await asyncio.sleep(0.5)
            served = await serve(*args, port=port)
            publish(5)
            states = await _until(
                tabs, lambda s: len(s["got"]) >= len(sent), "every message", timeout=40
            )
    finally:
        pages.close()
    for state in states:
        assert state["readyState"] != 2, "a tab gave up for good"
        assert state["got"] == sent  # every message, once, in order
        assert state["opens"] >= 2


async def _until(
    tabs: list[Any], condition: Any, what: str, timeout: float = 30
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        states = [await tab.evaluate(STATE) for tab in tabs]
        if all(condition(state) for state in states):
            return states
        if loop.time() > deadline:
            closed = sum(state["readyState"] == 2 for state in states)
            raise AssertionError(
                f"timed out waiting for {what}: {closed} of {len(tabs)} tabs closed for good; "
                + json.dumps(states)[:2000]
            )
        await asyncio.sleep(0.2)
