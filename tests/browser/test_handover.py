"""sisyphus.js hand-overs in a real headless Chromium: whichever tab takes the stream over,
every tab gets every message once, from where it was, and nobody waits for a stopped tab.

Messages are published while nobody holds the stream: the tabs' stream requests wait at a
gate (a Playwright route) until the test has published what falls in the gap.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from sisyphus.protocol.resume import channel_group
from sisyphus.server.app import Service
from tests.browser.conftest import PageServer, wait_until
from tests.browser.test_client import (
    SECRET,
    cors_service,
    events,
    is_leader,
    messages,
    open_tabs,
    state,
)
from tests.conftest import ServiceFactory, grant, publish

pytestmark = pytest.mark.timeout(180)

WAIT = 30.0  # a generous bound: 2 cores, and other test runs beside these


class StreamGate:
    """Holds the tabs' stream requests (not the module's) while closed."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.held = 0

    async def install(self, context: Any) -> None:
        await context.route(lambda url: "format=json" in url, self._handle)

    def close(self) -> None:
        self.held = 0
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def holding(self) -> bool:
        return self.held > 0

    async def _handle(self, route: Any) -> None:
        if not self._open.is_set():
            self.held += 1
            await self._open.wait()
        await route.continue_()


async def statuses(page: Any) -> list[str]:
    return [e["status"] for e in await events(page, "status")]


async def has_all(page: Any, sent: list[str]) -> bool:
    """At least as many messages as ``sent`` (the exact list is asserted after)."""
    return len(await messages(page)) >= len(sent)


async def wait_leader(page: Any) -> None:
    await wait_until(lambda: is_leader(page), timeout=WAIT)


async def publish_all(port: int, texts: list[str], sent: list[str]) -> None:
    for text in texts:
        await publish(port, "room:1", text)
        sent.append(text)


async def open_tab(context: Any, url: str) -> Any:
    tab = (await open_tabs(context, url, 1))[0]
    await wait_until(lambda: _state_is(tab, "open"), timeout=WAIT)
    return tab


async def _state_is(page: Any, wanted: str) -> bool:
    return await state(page) == wanted


async def test_hand_over_to_a_tab_that_joined_after_the_last_message(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """A holds and gets messages; B and C join after the last one (they had none); A
    closes and messages are published while nobody holds the stream; B takes over from
    A's position: B and C get everything after it, once. Then B closes while messages
    keep coming: C takes over, still nothing lost or doubled."""
    service = await cors_service(make_service, page_server)
    port = service.port
    await grant(port, "42", "room:1")
    context = await browser.new_context()
    gate = StreamGate()
    await gate.install(context)
    url = page_server.harness(port, "/?user=42")
    a = await open_tab(context, url)
    await wait_leader(a)
    before: list[str] = []
    await publish_all(port, [f"before {n}" for n in range(5)], before)
    await wait_until(lambda: has_all(a, before), timeout=WAIT)
    b = await open_tab(context, url)
    c = await open_tab(context, url)
    assert await messages(b) == [] and await messages(c) == []

    gate.close()
    await a.close()
    sent: list[str] = []
    await publish_all(port, [f"gap {n}" for n in range(3)], sent)
    await wait_until(gate.holding, timeout=WAIT)  # the new holder is connecting
    await publish_all(port, [f"gap {n}" for n in range(3, 6)], sent)
    gate.open()
    await wait_leader(b)
    await publish_all(port, [f"after {n}" for n in range(5)], sent)
    for tab in (b, c):
        await wait_until(lambda tab=tab: has_all(tab, sent), timeout=WAIT)
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    assert await messages(b) == sent
    assert await messages(c) == sent

    # Around the next hand-over, messages keep coming.
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        n = 0
        while not stop.is_set():
            await publish_all(port, [f"around {n}"], sent)
            n += 1
            await asyncio.sleep(0.03)

    publishing = asyncio.create_task(keep_publishing())
    await asyncio.sleep(0.3)
    await b.close()
    await wait_leader(c)
    await asyncio.sleep(0.5)
    stop.set()
    await publishing
    await wait_until(lambda: has_all(c, sent), timeout=WAIT)
    await asyncio.sleep(0.5)
    assert await messages(c) == sent
    await context.close()


async def test_new_holder_replays_what_lagging_tabs_lack(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """The tabs are at different positions when the holder changes (C and D joined with
    older lastEventIds than the holder's): the new holder, ahead of them, resumes from
    the least, and each tab gets exactly what it lacked, then the gap, then the rest."""
    service = await cors_service(make_service, page_server)
    port = service.port
    await grant(port, "42", "room:1")
    context = await browser.new_context()
    gate = StreamGate()
    await gate.install(context)
    url = page_server.harness(port, "/?user=42")
    a = await open_tab(context, url)
    await wait_leader(a)
    b = await open_tab(context, url)  # next in line for the stream
    first: list[str] = []
    await publish_all(port, [f"first {n}" for n in range(6)], first)
    for tab in (a, b):
        await wait_until(lambda tab=tab: has_all(tab, first), timeout=WAIT)
    ids = [e["id"] for e in await events(a, "message")]
    c = await open_tab(context, page_server.harness(port, "/?user=42", last=ids[1]))
    d = await open_tab(context, page_server.harness(port, "/?user=42", last=ids[3]))

    gate.close()
    await a.close()
    rest: list[str] = []
    await publish_all(port, [f"gap {n}" for n in range(3)], rest)
    await wait_until(gate.holding, timeout=WAIT)
    await publish_all(port, [f"gap {n}" for n in range(3, 6)], rest)
    gate.open()
    await wait_leader(b)
    await publish_all(port, [f"after {n}" for n in range(5)], rest)
    wanted = {b: first + rest, c: first[2:] + rest, d: first[4:] + rest}
    for tab, texts in wanted.items():
        await wait_until(lambda tab=tab, texts=texts: has_all(tab, texts), timeout=WAIT)
    await asyncio.sleep(0.5)
    for tab, texts in wanted.items():
        assert await messages(tab) == texts
    await context.close()


@pytest.mark.parametrize("broker_kind", ["cluster"])
async def test_a_new_holder_replays_across_sequence_groups(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """On a Redis Cluster ids carry one seq per sequence group: channels of three groups,
    tabs at different positions when the holder changes; each tab gets exactly what it
    lacked, once, every channel in order (across groups the replay follows the clock)."""
    service = await cors_service(make_service, page_server)
    port = service.port
    channels = [next(f"room:{n}" for n in range(99) if channel_group(f"room:{n}", 3) == g)
                for g in range(3)]  # fmt: skip
    await grant(port, "42", *channels)
    context = await browser.new_context()
    gate = StreamGate()
    await gate.install(context)
    url = page_server.harness(port, "/?user=42")
    a = await open_tab(context, url)
    await wait_leader(a)
    b = await open_tab(context, url)

    async def send(texts: list[str], sent: list[str]) -> None:
        for number, text in enumerate(texts):
            await publish(port, channels[number % 3], f"{text} {channels[number % 3]}")
            sent.append(f"{text} {channels[number % 3]}")

    first: list[str] = []
    await send([f"first {n}" for n in range(6)], first)
    for tab in (a, b):
        await wait_until(lambda tab=tab: has_all(tab, first), timeout=WAIT)
    ids = [e["id"] for e in await events(a, "message")]
    assert all(len(i.split("-")[1].split(".")) == 3 for i in ids)
    c = await open_tab(context, page_server.harness(port, "/?user=42", last=ids[1]))
    gate.close()
    await a.close()
    rest: list[str] = []
    await send([f"gap {n}" for n in range(3)], rest)
    await wait_until(gate.holding, timeout=WAIT)
    gate.open()
    await wait_leader(b)
    await send([f"after {n}" for n in range(4)], rest)
    wanted = {b: first + rest, c: first[2:] + rest}
    for tab, texts in wanted.items():
        await wait_until(lambda tab=tab, texts=texts: has_all(tab, texts), timeout=WAIT)
    await asyncio.sleep(0.5)
    for tab, texts in wanted.items():
        got = await messages(tab)
        assert sorted(got) == sorted(texts)  # each once
        for channel in channels:
            assert [t for t in got if t.endswith(channel)] == [
                t for t in texts if t.endswith(channel)
            ]
    await context.close()


async def test_positions_that_do_not_compare_keep_the_later_of_each_group(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """Ids of several sequence groups need not compare (each ahead in a group, as after a
    rewind from the lower seq of each): a tab then holds the later of each group, so a
    message it already delivered is not delivered again when it comes back."""
    service = await cors_service(make_service, page_server)
    await grant(service.port, "42", "room:1")
    context = await browser.new_context()
    tab = await open_tab(context, page_server.harness(service.port, "/?user=42", share="0"))
    for event_id, data in [
        ("zz-10.5-1", "group 0: 10"),
        ("zz-9.6-1", "group 1: 6"),  # another stream's id: behind in group 0
        ("zz-10.6-1", "group 0: 10"),  # the same message again, on that stream
        ("zz-10.7-1", "group 1: 7"),
    ]:
        await tab.evaluate(
            "([id, data]) => window.sub._deliver({kind: 'message', id, data}, false)",
            [event_id, data],
        )
    assert await messages(tab) == ["group 0: 10", "group 1: 6", "group 1: 7"]
    assert await tab.evaluate("window.sub.lastEventId") == "zz-10.7-1"
    await context.close()


@pytest.mark.parametrize("provider", [True, False], ids=["provider-refused", "no-provider"])
async def test_a_tab_that_gives_up_lets_another_take_over(
    make_service: ServiceFactory, page_server: PageServer, browser: Any, provider: bool
) -> None:
    """A holds; its token expires and it can't get a fresh one (its provider's tokens are
    refused, or it has none): A stops, without being closed, and gives the stream up. B,
    waiting with a good token of its own, takes over and gets the messages."""
    service = await cors_service(make_service, page_server, secret=SECRET, leeway=0.0)
    port = service.port
    await grant(port, "42", "room:1")
    page_server.secret = SECRET
    page_server.refused.add("nobody")
    context = await browser.new_context()
    own = {"refresh": "1", "user": "nobody"} if provider else {}
    a = await open_tab(
        context, page_server.harness(port, "/", token=page_server.mint("42", 5), **own)
    )
    await wait_leader(a)
    b_url = page_server.harness(port, "/", token=page_server.mint("42"), refresh="1", user="42")
    b = await open_tab(context, b_url)
    sent: list[str] = []
    await publish_all(port, ["while A holds"], sent)
    await wait_until(lambda: has_all(b, sent), timeout=WAIT)
    await wait_until(lambda: _state_is(a, "closed"), timeout=WAIT)  # A gave up
    await wait_leader(b)
    await wait_until(lambda: _state_is(b, "open"), timeout=WAIT)
    await publish_all(port, [f"after {n}" for n in range(3)], sent)
    await wait_until(lambda: has_all(b, sent), timeout=WAIT)
    await asyncio.sleep(0.3)
    assert await messages(b) == sent
    assert await messages(a) == sent[:1]  # A stopped: it delivers nothing more
    assert await statuses(a) == ["ok", "failure"] + (["failure"] * 2 if provider else [])
    await context.close()


async def test_a_tab_reports_ok_once(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """Tabs that join get `ok` once, and not again when the stream changes hands."""
    service = await cors_service(make_service, page_server)
    await grant(service.port, "42", "room:1")
    context = await browser.new_context()
    url = page_server.harness(service.port, "/?user=42")
    a = await open_tab(context, url)
    await wait_leader(a)
    b = await open_tab(context, url)
    c = await open_tab(context, url)
    await a.close()
    await wait_leader(b)
    await wait_until(lambda: _opened(service, 2), timeout=WAIT)  # B's stream is up
    await publish(service.port, "room:1", "one")
    await b.close()
    await wait_leader(c)
    await wait_until(lambda: _opened(service, 3), timeout=WAIT)
    await publish(service.port, "room:1", "two")
    await wait_until(lambda: has_all(c, ["one", "two"]), timeout=WAIT)
    await asyncio.sleep(0.3)
    assert await statuses(c) == ["ok"]
    assert await messages(c) == ["one", "two"]
    await context.close()


async def _opened(service: Service, count: int) -> bool:
    return service.metrics.connections_opened >= count


async def test_tabs_joining_behind_a_busy_stream_get_every_message_once(
    make_service: ServiceFactory, page_server: PageServer, browser: Any
) -> None:
    """Messages go out at about 100 a second while three tabs join with ids seconds old:
    the holder reads the stream again from each joiner's id, and its live events reach a
    joiner before that replay does. Each joiner must still get every message after its
    own position, once, in order (delivering a live one first would make it drop the
    replay as "already had")."""
    service = await cors_service(make_service, page_server)
    port = service.port
    await grant(port, "42", "room:1")
    context = await browser.new_context()
    url = page_server.harness(port, "/?user=42")
    a = await open_tab(context, url)
    await wait_leader(a)
    sent: list[str] = []
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        n = 0
        while not stop.is_set():
            await publish_all(port, [f"busy {n}"], sent)
            n += 1
            await asyncio.sleep(0.005)

    async def id_now() -> str:
        """The id of the last message the holder delivered (one exists by then)."""
        found = await wait_until(lambda: events(a, "message"), timeout=WAIT)
        return str(found[-1]["id"])

    publishing = asyncio.create_task(keep_publishing())
    positions = []
    for _ in range(3):
        await asyncio.sleep(1.0)
        positions.append(await id_now())
    joiners = []
    # The middle one first, then one older (the holder rewinds again), then the newest.
    for position in (positions[1], positions[0], positions[2]):
        await asyncio.sleep(0.7)
        page = await context.new_page()
        await page.goto(page_server.harness(port, "/?user=42", last=position))
        joiners.append((page, position))
    await asyncio.sleep(1.5)
    stop.set()
    await publishing
    assert len(sent) > 300, f"only {len(sent)} messages published: not busy enough"
    await wait_until(lambda: has_all(a, sent), timeout=WAIT)
    got = await events(a, "message")
    assert [e["data"] for e in got] == sent
    seq_of = {e["data"]: int(e["id"].split("-")[1]) for e in got}
    for page, _ in joiners:  # the last message is live: a tab that lost some gets it too
        await wait_until(lambda page=page: _got(page, sent[-1]), timeout=WAIT)
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    for page, position in joiners:
        start = int(position.split("-")[1])
        wanted = [text for text in sent if seq_of[text] > start]
        found = await events(page, "message")
        seqs = [int(e["id"].split("-")[1]) for e in found]
        assert all(x < y for x, y in itertools.pairwise(seqs)), f"out of order from {position}"
        texts = [e["data"] for e in found]
        missing = [text for text in wanted if text not in texts]
        assert texts == wanted, f"joined at {position}: {len(missing)} missing {missing[:5]}"
        assert await statuses(page) == ["ok"]  # once, though the stream reconnected
    await context.close()


async def _got(page: Any, text: str) -> bool:
    return text in await messages(page)
